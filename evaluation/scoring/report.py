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
  computed (no PyPI package ships the corpus in nltk's format). Offline fallback: Debian/Ubuntu's
  ``wordnet-base`` + ``wordnet-sense-index`` packages install the same WordNet 3.0 database in
  ``/usr/share/wordnet``; when present it is copied once into nltk's layout under
  ``$XDG_CACHE_HOME/medalign/nltk_data`` (default ``~/.cache/...``; nltk refuses symlinks out of
  its data folders) with the standard 45-line ``lexnames`` file that Debian does not ship.
* ``bertscore_f1``: see :mod:`evaluation.scoring.bertscore`; ``null`` with a note unless a
  local model directory is given.

All values in percent. A missing prediction is scored as the empty report.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
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


SYSTEM_WORDNET_DIRS: tuple[Path, ...] = (Path("/usr/share/wordnet"),)
"""Where Debian/Ubuntu's ``wordnet-base`` and ``wordnet-sense-index`` put the WordNet 3.0 files."""
_WORDNET_FILES = ("cntlist.rev", "index.sense", "index.adj", "index.adv", "index.noun",
                  "index.verb", "data.adj", "data.adv", "data.noun", "data.verb", "adj.exc",
                  "adv.exc", "noun.exc", "verb.exc")
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
_LEX_POS = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def default_wordnet_cache() -> Path:
    """``$XDG_CACHE_HOME/medalign/nltk_data`` (``~/.cache/medalign/nltk_data`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medalign" / "nltk_data"


def system_wordnet_as_nltk_data(cache_root: Path | None = None,
                                sources: tuple[Path, ...] | None = None) -> Path | None:
    """Copy a system WordNet 3.0 database into nltk's layout (``ROOT/corpora/wordnet``), once.

    Returns the nltk data root to search, or None when no source folder holds every file nltk
    needs. The copy is made in a temporary folder and renamed into place, so an interrupted
    copy is never used.
    """
    sources = SYSTEM_WORDNET_DIRS if sources is None else sources
    src = next((d for d in sources if all((d / f).is_file() for f in _WORDNET_FILES)), None)
    if src is None:
        return None
    root = Path(cache_root) if cache_root is not None else default_wordnet_cache()
    dest = root / "corpora" / "wordnet"
    if (dest / "lexnames").is_file():
        return root
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=dest.parent))
        for f in _WORDNET_FILES:
            shutil.copyfile(src / f, tmp / f)
        (tmp / "lexnames").write_text("".join(
            f"{i:02d}\t{name}\t{_LEX_POS[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES)))
        (tmp / "SOURCE.txt").write_text(f"WordNet 3.0 database copied from {src}\n")
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return None
    return root if (dest / "lexnames").is_file() else None


def _nltk_has_wordnet() -> bool:
    import nltk

    for resource in ("corpora/wordnet.zip", "corpora/wordnet"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            continue
    return False


def find_wordnet(nltk_data: str | Path | None = None, *, system_fallback: bool = True):
    """Return nltk's WordNet reader, or None when the corpus is not found.

    Search order: ``nltk_data`` (must be an existing folder), ``$NLTK_DATA`` and nltk's default
    folders, then (``system_fallback``) a system copy, see :func:`system_wordnet_as_nltk_data`.
    """
    import nltk

    if nltk_data is not None:
        d = Path(nltk_data)
        if not d.is_dir():
            raise MedAlignError(f"--nltk-data: not a directory: {d}")
        if str(d) not in nltk.data.path:
            nltk.data.path.insert(0, str(d))
    if not _nltk_has_wordnet():
        root = system_wordnet_as_nltk_data() if system_fallback else None
        if root is None:
            return None
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
        if not _nltk_has_wordnet():
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
        if getattr(wn, "root", None) is not None:
            out["meteor_wordnet"] = str(wn.root)
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
