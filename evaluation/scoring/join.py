"""Load prediction JSONL and ground truth, and join them by id (never by line order).

Predictions are LLaVA-Med answer files: one JSON object per line with ``question_id`` and
``text`` (other fields such as ``prompt``, ``answer_id``, ``model_id`` are ignored). Ground truth
is a LLaVA-style JSON list read with :mod:`shared.records`. Ids may be ints in one file and
strings in the other; both sides are compared as trimmed strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import MedAlignError
from shared.records import load_records, read_jsonl, record_id


@dataclass(frozen=True)
class Prediction:
    """One model answer. ``line`` is the 1-based line number in its JSONL file."""

    qid: str
    text: str
    line: int


@dataclass
class Joined:
    """Ground-truth records paired with their prediction, in ground-truth file order.

    ``pairs[i] = (record, text)``; ``text`` is None when the prediction is missing.
    ``missing_ids``: ground-truth ids without a prediction; ``extra_ids``: prediction ids that are
    not in the ground truth (ignored for scoring). Both sorted (numeric ids numerically).
    """

    pairs: list[tuple[dict, str | None]]
    missing_ids: list[str] = field(default_factory=list)
    extra_ids: list[str] = field(default_factory=list)


def _id_key(i: str) -> tuple[int, int, str]:
    return (0, int(i), "") if i.lstrip("-").isdigit() else (1, 0, i)


def normalize_id(value: object) -> str:
    """An id as a trimmed string: ``10``, ``"10"`` and ``" 10 "`` are the same id."""
    return "" if value is None else str(value).strip()


def load_predictions(path: str | Path) -> dict[str, Prediction]:
    """Read a prediction JSONL file into ``{question_id: Prediction}``.

    Blank lines are skipped. A line that is not a JSON object, lacks ``question_id`` or
    ``text``, or repeats an id raises :class:`MedAlignError` naming the file and line.
    A ``text`` that is a number is cast with ``str()``; ``null`` becomes the empty string.
    """
    path = Path(path)
    preds: dict[str, Prediction] = {}
    for lineno, obj in read_jsonl(path, "prediction file"):
        if not isinstance(obj, dict):
            raise MedAlignError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if "question_id" not in obj:
            raise MedAlignError(f"{path}:{lineno}: no 'question_id' field (LLaVA-Med answer format)")
        if "text" not in obj:
            raise MedAlignError(f"{path}:{lineno}: no 'text' field (LLaVA-Med answer format)")
        qid = normalize_id(obj["question_id"])
        if not qid:
            raise MedAlignError(f"{path}:{lineno}: empty 'question_id'")
        if qid in preds:
            raise MedAlignError(
                f"{path}:{lineno}: duplicate question_id {qid!r} (first on line {preds[qid].line})")
        text = obj["text"]
        preds[qid] = Prediction(qid=qid, text="" if text is None else str(text), line=lineno)
    return preds


def load_ground_truth(path: str | Path) -> list[dict]:
    """Read a LLaVA-style JSON list; every record needs a non-empty, unique id."""
    records = load_records(path)
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        rid = normalize_id(record_id(rec))
        if not rid:
            raise MedAlignError(f"{path}: record {i} has no 'id'")
        if rid in seen:
            raise MedAlignError(f"{path}: duplicate id {rid!r} (records {seen[rid]} and {i})")
        seen[rid] = i
    return records


def join_by_id(records: list[dict], preds: dict[str, Prediction]) -> Joined:
    """Pair every ground-truth record with the prediction of the same id (see :class:`Joined`)."""
    pairs: list[tuple[dict, str | None]] = []
    missing: list[str] = []
    gt_ids: set[str] = set()
    for rec in records:
        rid = normalize_id(record_id(rec))
        gt_ids.add(rid)
        pred = preds.get(rid)
        if pred is None:
            missing.append(rid)
        pairs.append((rec, None if pred is None else pred.text))
    extra = [qid for qid in preds if qid not in gt_ids]
    return Joined(pairs=pairs, missing_ids=sorted(missing, key=_id_key),
                  extra_ids=sorted(extra, key=_id_key))
