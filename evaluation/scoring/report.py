"""Report-generation scoring: BLEU-1..4, ROUGE-L, METEOR (nltk, rouge_score) and BERTScore.

* Tokens: lower-cased ``\\w+`` runs (punctuation dropped), for BLEU and METEOR.
* ``bleu_1``..``bleu_4``: corpus-level BLEU (nltk ``corpus_bleu``, cumulative uniform weights
  1/n, no smoothing), as report-generation papers compute it (pycocoevalcap style).
* ``rouge_l``: mean ROUGE-L F-measure of ``rouge_score`` (its own tokeniser, no stemming).
* ``meteor``: mean nltk ``meteor_score`` per report. METEOR's synonym stage needs the WordNet
  corpus, which nltk does not ship and which cannot be downloaded here. It is looked up in
  ``--nltk-data DIR`` first, then ``$NLTK_DATA`` and nltk's default folders
  (``~/nltk_data``, ``<venv>/nltk_data``, ``/usr/share/nltk_data``, ...). When it is absent,
  ``meteor`` is ``null`` with a note saying how to provide it; the other metrics are still
  computed (no PyPI package ships the corpus in nltk's format).
* ``bertscore_f1``: see :mod:`evaluation.scoring.bertscore`; ``null`` with a note unless a
  local model directory is given.

All values in percent. A missing prediction is scored as the empty report.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

from shared.errors import MedAlignError
from shared.records import answer_text

from evaluation.scoring.bertscore import BertScoreConfig, bertscore
from evaluation.scoring.join import Joined

REPORT_KEYS: tuple[str, ...] = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "meteor",
                                "bertscore_f1")
_WORD = re.compile(r"\w+")
WORDNET_HELP = ("provide it with --nltk-data DIR (a folder holding corpora/wordnet.zip or "
                "corpora/wordnet/) or the NLTK_DATA environment variable; on a machine with "
                "internet access: python -m nltk.downloader -d DIR wordnet")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens: ``"No acute findings."`` -> ``["no", "acute", "findings"]``."""
    return _WORD.findall(str(text).lower())


def corpus_bleu_n(references: list[list[str]], hypotheses: list[list[str]]) -> dict[str, float]:
    """Cumulative corpus BLEU-1..4 (fractions). Returns ``{"bleu_1": ..., "bleu_4": ...}``."""
    from nltk.translate.bleu_score import corpus_bleu

    refs = [[r] for r in references]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in range(1, 5):
            out[f"bleu_{n}"] = float(corpus_bleu(refs, hypotheses, weights=(1.0 / n,) * n))
    return out


def rouge_l(references: list[str], hypotheses: list[str]) -> list[float]:
    """Per-pair ROUGE-L F-measure (fractions)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hypotheses)]


def find_wordnet(nltk_data: str | Path | None = None):
    """Return nltk's WordNet reader, or None when the corpus is not installed anywhere nltk looks.

    ``nltk_data``, when given, must be an existing folder; it is searched first.
    """
    import nltk

    if nltk_data is not None:
        d = Path(nltk_data)
        if not d.is_dir():
            raise MedAlignError(f"--nltk-data: not a directory: {d}")
        if str(d) not in nltk.data.path:
            nltk.data.path.insert(0, str(d))
    for resource in ("corpora/wordnet.zip", "corpora/wordnet"):
        try:
            nltk.data.find(resource)
            break
        except LookupError:
            continue
    else:
        return None
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except (LookupError, OSError):
        return None
    return wordnet


def meteor(references: list[list[str]], hypotheses: list[list[str]], wordnet) -> list[float]:
    """Per-pair nltk METEOR (fractions) with the given WordNet reader (or a stand-in with
    ``synsets(word)``)."""
    from nltk.translate.meteor_score import meteor_score

    return [float(meteor_score([r], h, wordnet=wordnet)) for r, h in zip(references, hypotheses)]


def score_reports(joined: Joined, *, nltk_data: str | Path | None = None,
                  bertscore_cfg: BertScoreConfig | None = None, wordnet=None) -> dict[str, Any]:
    """Score generated reports against the gpt turn of each ground-truth record.

    Returns ``{"report": {key: percent or None}, "num_reports": n, "notes": [...],
    "bertscore": {...} (when computed)}``. ``wordnet`` overrides the WordNet lookup (tests).
    """
    refs_text = [answer_text(rec) or "" for rec, _ in joined.pairs]
    hyps_text = ["" if p is None else p for _, p in joined.pairs]
    refs_tok = [tokenize(t) for t in refs_text]
    hyps_tok = [tokenize(t) for t in hyps_text]
    notes: list[str] = []
    res: dict[str, float | None] = dict.fromkeys(REPORT_KEYS)
    out: dict[str, Any] = {"report": res, "num_reports": len(refs_text), "notes": notes}
    if not refs_text:
        notes.append("no ground-truth reports to score")
        return out
    res.update({k: 100 * v for k, v in corpus_bleu_n(refs_tok, hyps_tok).items()})
    res["rouge_l"] = 100 * math.fsum(rouge_l(refs_text, hyps_text)) / len(refs_text)
    wn = wordnet if wordnet is not None else find_wordnet(nltk_data)
    if wn is None:
        notes.append("meteor not computed: the NLTK WordNet corpus was not found; " + WORDNET_HELP)
    else:
        res["meteor"] = 100 * math.fsum(meteor(refs_tok, hyps_tok, wn)) / len(refs_tok)
    if bertscore_cfg is None:
        notes.append("bertscore_f1 not computed: pass --bertscore-model DIR (a local encoder "
                     "directory, e.g. a saved roberta-large or a biomedical BERT)")
    else:
        bs = bertscore(hyps_text, refs_text, bertscore_cfg)
        res["bertscore_f1"] = 100 * bs["f1"]
        out["bertscore"] = {"precision": 100 * bs["precision"], "recall": 100 * bs["recall"],
                            "f1": 100 * bs["f1"], "layer": bs["layer"],
                            "model_dir": bs["model_dir"], "idf": False, "rescaled": False}
    return out
