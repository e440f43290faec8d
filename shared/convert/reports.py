"""Converters for report generation: IU-Xray and MIMIC-CXR in the R2Gen ``annotation.json`` format.

R2Gen's file (used by R2Gen, R2GenCMN, PromptMRG and most report-generation work) is::

    {"train": [{"id": "CXR2384_IM-0942", "report": "The heart is normal in size. ...",
                "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"], "split": "train"},
               ...],
     "val": [...], "test": [...]}

MIMIC-CXR rows also carry ``study_id`` and ``subject_id``. Each row becomes one record whose
question is a fixed prompt (:data:`DEFAULT_REPORT_PROMPT`, or ``--prompt``), whose answer is the
report, with ``answer_type: "OPEN"`` and ``task: "report"``. The student sees one image: the
FIRST entry of ``image_path`` (IU-Xray's ``0.png``, the frontal view in R2Gen's ordering); the
full list is kept as ``image_paths``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.convert.common import (
    ConvertStats, RowSkipped, canonical_split, clean_image, clean_str, int_if_digits, make_record,
)
from shared.errors import MedAlignError
from shared.records import read_json

DEFAULT_REPORT_PROMPT = "Write the radiology report for this chest X-ray."
ANNOTATION_FILE = "annotation.json"


def convert_r2gen(path: Path, stats: ConvertStats, prompt: str = DEFAULT_REPORT_PROMPT,
                  dataset: str = "iu-xray") -> dict[str, list[dict]]:
    """An R2Gen ``annotation.json`` (or a folder holding it) -> ``{split: [record]}``.

    Splits come from the top-level keys (``val`` stays ``val``). Rows without an id, an image or
    a non-empty report are skipped and counted.
    """
    if path.is_dir():
        path = path / ANNOTATION_FILE
    data = read_json(path)
    if not isinstance(data, dict):
        raise MedAlignError(f"{path}: expected an R2Gen annotation object "
                            f"{{'train': [...], 'val': [...], 'test': [...]}}, got {type(data).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise MedAlignError("the report prompt is empty")
    out: dict[str, list[dict]] = {}
    for key, rows in data.items():
        if not isinstance(rows, list):
            raise MedAlignError(f"{path}: {key!r} should be a list of rows, got {type(rows).__name__}")
        split = canonical_split(key)
        for row in rows:
            if not isinstance(row, dict):
                stats.skip("row is not a JSON object")
                continue
            try:
                rec = _report_record(row, prompt, dataset, stats)
            except RowSkipped as e:
                stats.skip(e.reason)
                continue
            out.setdefault(split, []).append(rec)
    return out


def _report_record(row: dict, prompt: str, dataset: str, stats: ConvertStats) -> dict:
    rid: Any = row.get("id")
    if rid is None or not str(rid).strip():
        raise RowSkipped("missing id")
    paths = row.get("image_path")
    image = clean_image(paths)
    all_paths = [str(p).strip() for p in paths] if isinstance(paths, list) else [image]
    if isinstance(paths, list) and len(paths) > 1:
        stats.fix("several images, first one used")
    report = clean_str(row.get("report"), "report", stats)
    return make_record(
        int_if_digits(rid, stats), image, prompt, report, "OPEN", task="report", dataset=dataset,
        image_paths=all_paths, study_id=row.get("study_id"), subject_id=row.get("subject_id"))


def convert_iu_xray(path: Path, stats: ConvertStats, prompt: str = DEFAULT_REPORT_PROMPT) -> dict[str, list[dict]]:
    return convert_r2gen(path, stats, prompt, dataset="iu-xray")


def convert_mimic_cxr(path: Path, stats: ConvertStats, prompt: str = DEFAULT_REPORT_PROMPT) -> dict[str, list[dict]]:
    return convert_r2gen(path, stats, prompt, dataset="mimic-cxr")
