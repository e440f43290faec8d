"""One entry point for scoring: files in, metrics dict out (what ``medalign-eval score`` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.scoring.join import join_by_id, load_ground_truth, load_predictions
from evaluation.scoring.report import score_reports
from evaluation.scoring.vqa import score_vqa
from shared.errors import MedAlignError

TASKS = ("vqa", "report")


def score_files(pred: str | Path, gt: str | Path, task: str, *,
                nltk_data: str | Path | None = None, scorers: dict[str, Any] | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Load, join by id and score. The result holds ``task``, ``pred``, ``gt``, ``num_gt``,
    ``num_pred``, ``missing_ids``, ``extra_ids``, ``notes`` and the task's metric blocks.
    ``scorers``: loaded report-metric scorers by name (see :func:`score_reports`)."""
    if task not in TASKS:
        raise MedAlignError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    records = load_ground_truth(gt)
    preds = load_predictions(pred)
    joined = join_by_id(records, preds)
    notes: list[str] = []
    if joined.missing_ids:
        notes.append(f"{len(joined.missing_ids)} ground-truth ids have no prediction; "
                     "they are scored as empty answers"
                     + (" (strict block)" if task == "report" else ""))
    if joined.extra_ids:
        notes.append(f"{len(joined.extra_ids)} predictions have ids not in the ground truth; "
                     "they are ignored")
    out: dict[str, Any] = {
        "task": task, "pred": str(pred), "gt": str(gt),
        "num_gt": len(records), "num_pred": len(preds),
        "missing_ids": joined.missing_ids, "extra_ids": joined.extra_ids,
    }
    if task == "vqa":
        res = score_vqa(joined)
        if res["counts"]["skipped_answer_type"]:
            notes.append(f"{res['counts']['skipped_answer_type']} records have an answer_type "
                         "other than OPEN/CLOSED and were not scored")
    else:
        res = score_reports(records, list(preds.values()), joined, nltk_data=nltk_data,
                            scorers=scorers, progress=progress)
        notes.extend(res.pop("notes"))
    out.update(res)
    out["notes"] = notes
    return out
