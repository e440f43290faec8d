"""VQA scoring: the LLaVA-Med / MedAlign evaluator reproduced exactly, plus a strict variant.

Paper-compatible block (``llava_med``). Sources read and re-written here:
microsoft/LLaVA-Med ``llava/eval/run_eval.py`` and ``llava/eval/eval_metrics/evaluate_metrics.py``
(``calculate_exactmatch``, ``calculate_f1score``), with the later variant of ``run_eval.py``
used by MedAlign-style follow-ups (no candidate-set "open accuracy", a 0 appended for every
closed miss, ``num_open``/``num_close`` counted per type, multiple choice by ``difflib``).
Both answer and prediction are lower-cased and normalised once (:func:`normalize_answer`);
exact match and F1 normalise them a second time, as the reference does.

* ``exact match score`` (OPEN): number of *distinct* answer words that occur in the prediction,
  divided by the number of prediction words (with repeats). Not string equality.
* ``precision`` / ``recall`` / ``f1 score`` (OPEN): over word counts, with the reference's
  ``tp`` = the *prediction's* count of each shared word, ``fp`` = prediction count of words not
  in the answer, ``fn`` = answer count of words not in the prediction. So repeating an answer
  word raises recall ("left left left" vs "left lung": tp 3, fn 1, recall 0.75). Zero when
  either side is empty or nothing is shared.
* ``bleu_score`` / ``bleu_score_1..3`` (OPEN): nltk ``sentence_bleu`` on whitespace tokens,
  default weights (0.25 x 4) and (1,0,0,0), (0,1,0,0), (0,0,1,0); no smoothing, so a one-word
  answer has ``bleu_score`` ~ 0.
* ``yes/no accuracy`` (CLOSED): a hit when the normalised prediction contains ``"yes"`` or
  ``"no"`` *as substrings* and contains the normalised answer as a substring. So "no" is found
  in "normal", "nodule", "not", "know"; "yes, there is no ..." matches both answers; and an
  answer other than yes/no ("left") needs a stray "no"/"yes" somewhere in the prediction.
* ``answer_type`` picks OPEN or CLOSED (normalised for case/spaces here; the reference compares
  raw strings). A record without ``answer_type`` counts as CLOSED, as in the reference; other
  types are skipped and counted in ``num_skipped``.
* Multiple choice (records with ``option_A``, ``option_B`` [``option_C`` [``option_D``]]): the
  option most similar (``difflib.SequenceMatcher.ratio``, first maximum, strictly > 0) to the raw
  prediction is compared with the option most similar to the label (the record's ``answer``
  field as given, else the lower-cased gpt turn). If neither resembles any option, both indices
  are None and the reference counts that as correct; so do we.

Every metric is averaged over its questions with ``math.fsum`` (row order cannot change the
result) and reported in percent; a metric with no questions is ``null`` (the reference prints 0).
A missing prediction is scored as the empty answer.

Strict block (``strict``): the same normalisation, but whole tokens instead of substrings.
* ``yes/no accuracy`` (CLOSED): for a yes/no answer, a hit when that word is a token of the
  prediction and the opposite word is not (so "normal" is not "no", and "yes ... no ..." is
  wrong); for any other answer, its token sequence must occur contiguously in the prediction.
* ``precision`` / ``recall`` / ``f1 score`` (OPEN): clipped token overlap
  ``sum_w min(pred_w, ans_w)`` over prediction length / answer length.
* ``exact match score`` (OPEN): normalised prediction == normalised answer.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from shared.records import answer_text, answer_type, first_turn, record_id

from evaluation.scoring.join import Joined, normalize_id
from evaluation.scoring.normalize import normalize_answer, normalize_word, word_counts

BLEU_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bleu_score": (0.25, 0.25, 0.25, 0.25),
    "bleu_score_1": (1, 0, 0, 0),
    "bleu_score_2": (0, 1, 0, 0),
    "bleu_score_3": (0, 0, 1, 0),
}
LLAVA_MED_KEYS: tuple[str, ...] = (
    "exact match score", "f1 score", "precision", "recall",
    "bleu_score", "bleu_score_1", "bleu_score_2", "bleu_score_3", "yes/no accuracy",
)
STRICT_KEYS: tuple[str, ...] = ("exact match score", "f1 score", "precision", "recall", "yes/no accuracy")
MC_OPTION_KEYS: tuple[str, ...] = ("option_A", "option_B", "option_C", "option_D")


# ----------------------------------------------------------------------------- llava_med
def llava_exact_match(pred: str, answer: str) -> float:
    """Reference ``calculate_exactmatch``: distinct answer words found / prediction word count."""
    cand = word_counts(normalize_word(pred))
    ref = word_counts(normalize_word(answer))
    total = sum(cand.values())
    if total == 0:
        return 0.0
    return sum(1 for w in ref if w in cand) / total


def llava_f1(pred: str, answer: str) -> tuple[float, float, float]:
    """Reference ``calculate_f1score``: returns ``(f1, precision, recall)`` (see module doc)."""
    cand = word_counts(normalize_word(pred))
    ref = word_counts(normalize_word(answer))
    if not cand or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in cand.items() if w in ref)
    fp = sum(c for w, c in cand.items() if w not in ref)
    fn = sum(c for w, c in ref.items() if w not in cand)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def llava_bleu(pred: str, answer: str) -> dict[str, float]:
    """nltk sentence BLEU (no smoothing) of the whitespace tokens, for the four weightings."""
    from nltk.translate.bleu_score import sentence_bleu

    ref = [answer.lower().split()]
    hyp = pred.lower().split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: float(sentence_bleu(ref, hyp, weights=w)) for k, w in BLEU_WEIGHTS.items()}


def llava_closed_hit(pred: str, answer: str) -> bool:
    """Reference closed rule: ('yes' in pred or 'no' in pred) and answer in pred, as substrings."""
    return ("yes" in pred or "no" in pred) and answer in pred


def most_similar_index(options: list[str], text: str) -> int | None:
    """Index of the option with the highest ``difflib`` ratio to ``text`` (first of ties);
    None when every ratio is 0 (the reference starts from 0 and needs a strictly higher one)."""
    best, best_i = 0.0, None
    for i, opt in enumerate(options):
        ratio = difflib.SequenceMatcher(None, opt, text).ratio()
        if ratio > best:
            best, best_i = ratio, i
    return best_i


# ----------------------------------------------------------------------------- strict
def strict_closed_hit(pred: str, answer: str) -> bool:
    """Whole-token closed match on normalised text (see module docstring)."""
    p, a = pred.split(), answer.split()
    if not a:
        return False
    if a in (["yes"], ["no"]):
        other = "no" if a[0] == "yes" else "yes"
        return a[0] in p and other not in p
    n = len(a)
    return any(p[i:i + n] == a for i in range(len(p) - n + 1))


def strict_open_prf(pred: str, answer: str) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` from the clipped token overlap of normalised texts."""
    p, a = Counter(pred.split()), Counter(answer.split())
    overlap = sum((p & a).values())
    if overlap == 0:
        return 0.0, 0.0, 0.0
    precision = overlap / sum(p.values())
    recall = overlap / sum(a.values())
    return 2 * precision * recall / (precision + recall), precision, recall


# ----------------------------------------------------------------------------- driver
def question_kind(rec: dict) -> str | None:
    """``"MC"`` for a record with options, else ``"OPEN"``/``"CLOSED"`` (absent -> CLOSED), or
    None for another answer type (skipped)."""
    if "option_A" in rec and "option_B" in rec:
        return "MC"
    t = answer_type(rec)
    if t is None:
        return "CLOSED"
    return t if t in ("OPEN", "CLOSED") else None


def mc_options(rec: dict) -> list[str]:
    """The record's options in the reference's order (C only with A/B, D only with C)."""
    opts = [str(rec["option_A"]), str(rec["option_B"])]
    if "option_C" in rec:
        opts.append(str(rec["option_C"]))
        if "option_D" in rec:
            opts.append(str(rec["option_D"]))
    return opts


def mc_label(rec: dict) -> str:
    """The reference's label: the ``answer`` field as given, else the lower-cased gpt turn."""
    if "answer" in rec:
        return str(rec["answer"])
    return (first_turn(rec, "gpt") or "").lower()


@dataclass
class _Acc:
    """Per-metric lists of per-question scores."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(float(value))

    def mean_pct(self, key: str) -> float | None:
        vals = self.values.get(key, [])
        return 100.0 * math.fsum(vals) / len(vals) if vals else None


def score_vqa(joined: Joined) -> dict[str, Any]:
    """Score joined VQA pairs. Returns ``{"llava_med": {...}, "strict": {...},
    "multiple_choice": {...} (only when MC records exist), "counts": {...}, "per_question": [...]}``.
    """
    llava, strict, mc = _Acc(), _Acc(), _Acc()
    num = Counter()
    per_question: list[dict[str, Any]] = []
    for rec, raw_pred in joined.pairs:
        kind = question_kind(rec)
        qid = normalize_id(record_id(rec))
        pred_raw = "" if raw_pred is None else raw_pred
        if kind is None:
            num["skipped"] += 1
            continue
        num[kind] += 1
        if kind == "MC":
            opts = mc_options(rec)
            hit = most_similar_index(opts, pred_raw) == most_similar_index(opts, mc_label(rec))
            mc.add("accuracy", hit)
            per_question.append({"id": qid, "type": kind, "hit": int(hit)})
            continue
        gt = normalize_answer(answer_text(rec))
        pred = normalize_answer(pred_raw)
        if kind == "OPEN":
            llava.add("exact match score", llava_exact_match(pred, gt))
            f1, p, r = llava_f1(pred, gt)
            llava.add("f1 score", f1)
            llava.add("precision", p)
            llava.add("recall", r)
            for k, v in llava_bleu(pred, gt).items():
                llava.add(k, v)
            sf1, sp, sr = strict_open_prf(pred, gt)
            strict.add("exact match score", pred.split() == gt.split())
            strict.add("f1 score", sf1)
            strict.add("precision", sp)
            strict.add("recall", sr)
            per_question.append({"id": qid, "type": kind, "recall": r, "strict_recall": sr})
        else:
            hit = llava_closed_hit(pred, gt)
            shit = strict_closed_hit(pred, gt)
            llava.add("yes/no accuracy", hit)
            strict.add("yes/no accuracy", shit)
            per_question.append({"id": qid, "type": kind, "hit": int(hit), "strict_hit": int(shit)})
    out: dict[str, Any] = {
        "llava_med": {k: llava.mean_pct(k) for k in LLAVA_MED_KEYS}
        | {"num_open": num["OPEN"], "num_close": num["CLOSED"]},
        "strict": {k: strict.mean_pct(k) for k in STRICT_KEYS},
    }
    if num["MC"]:
        out["multiple_choice"] = {"accuracy": mc.mean_pct("accuracy"), "num_mc": num["MC"]}
    out["counts"] = {"open": num["OPEN"], "closed": num["CLOSED"], "multiple_choice": num["MC"],
                     "skipped_answer_type": num["skipped"]}
    out["per_question"] = per_question
    return out
