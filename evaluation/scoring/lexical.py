"""The lexical report metrics with the settings of MedHEval's ``run_all_metrics.py``.

Per pair (hypothesis = generated report, reference = ground truth), then the mean over pairs:

* ``bleu``: nltk ``sentence_bleu([ref_tokens], hyp_tokens)`` with nltk's default weights
  (0.25 x 4, i.e. BLEU-4) and ``SmoothingFunction().method4``; tokens from
  ``nltk.word_tokenize`` (case-sensitive). Not corpus BLEU.
* ``meteor``: nltk ``meteor_score([ref_tokens], hyp_tokens)`` (alpha 0.9, beta 3, gamma 0.5;
  nltk lower-cases inside), same tokens, WordNet synonyms.
* ``rouge_{1,2,l}_{precision,recall,f1}``: ``rouge_score`` with ``use_stemmer=True``. The
  reference calls ``scorer.score(model_answer, ground_truth)``, but the signature is
  ``score(target, prediction)``: its "precision" is overlap / reference length (the recall) and
  its "recall" is the precision. ``swapped=True`` reproduces that (the ``medheval`` block);
  ``swapped=False`` passes the reference as target (the ``strict`` block). F1 is the same.

Values are fractions. An empty hypothesis scores 0 on BLEU and METEOR (nltk's own results).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

ROUGE_TYPES: tuple[tuple[str, str], ...] = (("rouge1", "rouge_1"), ("rouge2", "rouge_2"),
                                           ("rougeL", "rouge_l"))
ROUGE_KEYS: tuple[str, ...] = tuple(f"{k}_{p}" for _, k in ROUGE_TYPES
                                    for p in ("precision", "recall", "f1"))
LEXICAL_KEYS: tuple[str, ...] = ("bleu", "meteor", *ROUGE_KEYS)


def mean(values: Sequence[float]) -> float | None:
    """``math.fsum`` mean (row order cannot change it); None for no values."""
    return math.fsum(values) / len(values) if values else None


def sentence_bleu4(ref: list[str], hyp: list[str]) -> float:
    """nltk sentence BLEU-4 with smoothing method 4, one reference."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method4))


def meteor(refs: list[list[str]], hyps: list[list[str]], wordnet) -> list[float]:
    """Per-pair nltk METEOR with the given WordNet reader (or a stand-in with ``synsets``)."""
    from nltk.translate.meteor_score import meteor_score

    return [float(meteor_score([r], h, wordnet=wordnet)) for r, h in zip(refs, hyps)]


def rouge(hyps: list[str], refs: list[str], *, swapped: bool) -> dict[str, list[float]]:
    """Per-pair ROUGE-1/2/L precision, recall, F1 with stemming (see the module docstring)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([t for t, _ in ROUGE_TYPES], use_stemmer=True)
    out: dict[str, list[float]] = {k: [] for k in ROUGE_KEYS}
    for h, r in zip(hyps, refs):
        s = scorer.score(h, r) if swapped else scorer.score(r, h)
        for t, key in ROUGE_TYPES:
            out[f"{key}_precision"].append(float(s[t].precision))
            out[f"{key}_recall"].append(float(s[t].recall))
            out[f"{key}_f1"].append(float(s[t].fmeasure))
    return out


def lexical_scores(hyps: list[str], refs: list[str], *, tokenize: Callable[[str], list[str]],
                   wordnet, swapped_rouge: bool) -> dict[str, dict]:
    """``{"per_report": {key: [...]}, "mean": {key: value or None}}`` for :data:`LEXICAL_KEYS`.
    ``wordnet`` None leaves METEOR out of ``per_report`` and None in ``mean``."""
    if len(hyps) != len(refs):
        raise ValueError("hypotheses and references differ in length")
    hyp_tok = [tokenize(h) for h in hyps]
    ref_tok = [tokenize(r) for r in refs]
    per: dict[str, list[float]] = {"bleu": [sentence_bleu4(r, h) for r, h in zip(ref_tok, hyp_tok)]}
    if wordnet is not None:
        per["meteor"] = meteor(ref_tok, hyp_tok, wordnet)
    per.update(rouge(hyps, refs, swapped=swapped_rouge))
    return {"per_report": per, "mean": {k: mean(per[k]) if k in per else None for k in LEXICAL_KEYS}}
