"""Which generated report is scored against which ground truth, after which cleaning.

MedHEval (github.com/Aofei-Chang/MedHEval, ``code/evaluation/report_eval/``) scores reports in two
steps that clean and pair differently; the ``medheval`` block reproduces each step's own rule for
the metrics it computes, the ``strict`` block uses one rule for all.

* ``run_all_metrics.py`` (BLEU, ROUGE, METEOR, BERTScore, RaTEScore): hypothesis =
  ``text.strip("Assistant:")``, which strips the *characters* ``A s i t a n :`` from both ends
  ("No acute effusion" -> "No acute effusio", "An opacity." -> " opacity."); the reference is the
  ground truth stored on the same line of the answer file, i.e. the i-th prediction line is paired
  with the i-th ground-truth record (:func:`line_pairs`; a count mismatch is cut to the shorter,
  as ``zip`` does, and noted).
* ``run_eval.py`` (CheXbert, RadGraph, via CSVs): the same strip; an empty result falls back to
  the raw text; a result shorter than 10 characters becomes ``"No report generated."``. Study id
  = ``int(question_id)`` (on ``ValueError``: ``int(qid.split("train")[-1])``), ground truth id =
  ``int(qid or id)`` likewise, and its report is ``data['answer']`` (the code tests for a
  ``"conversation"`` key, which LLaVA files do not have, before reading ``conversations[1]``).
  Only ids on both sides are kept, sorted by study id (:func:`study_id_pairs`). Ids that are not
  integers make the reference fail; here the two metrics are null with a note.
* ``strict``: the ``"Assistant:"`` prefix removed as a prefix (and surrounding whitespace), every
  record paired with the prediction of the same question id (:func:`strict_pairs`); a missing
  prediction is scored as the empty report and missing/extra ids are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evaluation.scoring.join import Joined, Prediction, normalize_id
from shared.errors import MedAlignError
from shared.records import answer_text, record_id

ASSISTANT_PREFIX = "Assistant:"
NO_REPORT = "No report generated."
MIN_REPORT_CHARS = 10


@dataclass
class ReportPairs:
    """Aligned ``ids``, ``hyps`` (cleaned predictions) and ``refs``; ``notes`` say what was
    dropped or substituted."""

    ids: list[str]
    hyps: list[str]
    refs: list[str]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class PairingError(MedAlignError):
    """A pairing rule cannot be applied (e.g. ids that are not integers for ``run_eval.py``)."""


def medheval_strip(text: str) -> str:
    """The reference's ``text.strip("Assistant:")``: a character-set strip, not a prefix."""
    return text.strip(ASSISTANT_PREFIX)


def run_eval_clean(text: str) -> str:
    """``run_eval.py``'s prediction text: strip as above, empty -> raw text, < 10 chars -> fixed."""
    out = medheval_strip(text)
    if len(out) == 0:
        out = text
    if len(out) < MIN_REPORT_CHARS:
        out = NO_REPORT
    return out


def strict_clean(text: str) -> str:
    """Whitespace trimmed, then one leading ``"Assistant:"`` removed (and the space after it)."""
    out = text.strip()
    if out.startswith(ASSISTANT_PREFIX):
        out = out[len(ASSISTANT_PREFIX):].strip()
    return out


def study_id(value: object) -> int:
    """``int(x)``, or on ``ValueError`` ``int(x.split("train")[-1])``, as ``run_eval.py`` does."""
    try:
        return int(value)  # type: ignore[arg-type]
    except ValueError:
        try:
            return int(str(value).split("train")[-1])
        except ValueError:
            raise PairingError(f"id {value!r} is not an integer (run_eval.py pairs reports by "
                               "int(question_id))") from None
    except TypeError:
        raise PairingError(f"id {value!r} is not an integer") from None


def run_eval_reference(rec: dict) -> tuple[str, bool]:
    """``(report, from_answer_field)``: ``conversations[1]`` when a ``"conversation"`` key exists
    (the reference's test), else ``answer``; without either the gpt turn is used (flag False)."""
    if "conversation" in rec:
        return str(rec["conversations"][1]["value"]), True
    if "answer" in rec:
        return str(rec["answer"]), True
    return answer_text(rec) or "", False


def line_pairs(records: list[dict], preds: list[Prediction]) -> ReportPairs:
    """``run_all_metrics.py``: prediction line i with ground-truth record i."""
    n = min(len(records), len(preds))
    out = ReportPairs(ids=[p.qid for p in preds[:n]],
                      hyps=[medheval_strip(p.text) for p in preds[:n]],
                      refs=[answer_text(r) or "" for r in records[:n]])
    if len(records) != len(preds):
        out.notes.append(f"medheval line-order pairing: {len(preds)} prediction lines and "
                         f"{len(records)} ground-truth records; the first {n} of each are paired")
    mismatched = sum(normalize_id(record_id(r)) != p.qid for r, p in zip(records, preds))
    if mismatched:
        out.notes.append(f"medheval line-order pairing: {mismatched} of {n} pairs have different "
                         "ids on the two sides (the reference pairs by line; see the strict block)")
    return out


def study_id_pairs(records: list[dict], preds: list[Prediction]) -> ReportPairs:
    """``run_eval.py``: ids as integers, only ids on both sides, sorted; raises
    :class:`PairingError` when an id is not an integer or two ids map to the same integer."""
    gt: dict[int, str] = {}
    no_answer = 0
    for rec in records:
        sid = study_id(rec["qid"] if "qid" in rec else record_id(rec))
        if sid in gt:
            raise PairingError(f"two ground-truth ids are the study id {sid}")
        gt[sid], has = run_eval_reference(rec)
        no_answer += not has
    pr: dict[int, str] = {}
    for p in preds:
        sid = study_id(p.qid)
        if sid in pr:
            raise PairingError(f"two question ids are the study id {sid}")
        pr[sid] = run_eval_clean(p.text)
    shared = sorted(gt.keys() & pr.keys())
    out = ReportPairs(ids=[str(s) for s in shared], hyps=[pr[s] for s in shared],
                      refs=[gt[s] for s in shared])
    if no_answer:
        out.notes.append(f"medheval CheXbert/RadGraph: {no_answer} ground-truth records have no "
                         "'answer' field (run_eval.py reads it); their gpt turn is used")
    dropped = len(gt) + len(pr) - 2 * len(shared)
    if dropped:
        out.notes.append(f"medheval CheXbert/RadGraph: {dropped} ids on one side only are dropped "
                         f"({len(shared)} study ids scored)")
    return out


def strict_pairs(joined: Joined) -> ReportPairs:
    """Every ground-truth record with its own prediction (missing -> empty), strictly cleaned."""
    return ReportPairs(ids=[normalize_id(record_id(r)) for r, _ in joined.pairs],
                       hyps=[strict_clean(p or "") for _, p in joined.pairs],
                       refs=[(answer_text(r) or "").strip() for r, _ in joined.pairs])
