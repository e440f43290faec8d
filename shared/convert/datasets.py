"""The dataset formats ``medalign-data convert`` knows, and the one function that runs them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shared.convert.common import ConvertStats, check_images, dedupe_ids, write_splits
from shared.convert.reports import DEFAULT_REPORT_PROMPT, convert_iu_xray, convert_mimic_cxr
from shared.convert.vqa import convert_omnimedvqa, convert_pathvqa, convert_slake, convert_vqa_rad
from shared.errors import MedAlignError


@dataclass(frozen=True)
class DatasetFormat:
    """One source format: its converter and a one-line description of the input it accepts."""

    name: str
    convert: Callable[..., dict[str, list[dict]]]
    accepts: str
    takes_prompt: bool = False


FORMATS: dict[str, DatasetFormat] = {f.name: f for f in (
    DatasetFormat("vqa-rad", convert_vqa_rad, "the official OSF 'VQA_RAD Dataset Public.json' (or its folder)"),
    DatasetFormat("slake", convert_slake, "the SLAKE release folder with train.json / validation.json / test.json"),
    DatasetFormat("pathvqa", convert_pathvqa, "a folder of train/val/test .json, .jsonl or .csv files (no pickle)"),
    DatasetFormat("iu-xray", convert_iu_xray, "R2Gen annotation.json (or its folder)", takes_prompt=True),
    DatasetFormat("mimic-cxr", convert_mimic_cxr, "R2Gen annotation.json (or its folder)", takes_prompt=True),
    DatasetFormat("omnimedvqa", convert_omnimedvqa, "a QA_information .json file or a folder of them"),
)}


def get_format(name: str) -> DatasetFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise MedAlignError(f"unknown dataset format {name!r}; choose one of: {', '.join(FORMATS)}") from None


def convert_dataset(fmt: str, input_path: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
                    prompt: str | None = None) -> tuple[ConvertStats, list[Path]]:
    """Convert ``input_path`` in format ``fmt`` to ``out_dir/{train,test,[val]}.json``.

    With ``image_root``, records whose image file is missing there are skipped (counted).
    A duplicate id keeps one record: the one in the earliest split (train, val, test), then the
    first in file order; the others are skipped and counted. Returns the stats and the files
    written (the split files, then ``convert_stats.json``).
    """
    spec = get_format(fmt)
    input_path = Path(input_path)
    if not input_path.exists():
        raise MedAlignError(f"input not found: {input_path}")
    if prompt is not None and not spec.takes_prompt:
        raise MedAlignError(f"--prompt applies to report formats only, not {fmt!r}")
    stats = ConvertStats()
    if spec.takes_prompt:
        splits = spec.convert(input_path, stats, prompt if prompt is not None else DEFAULT_REPORT_PROMPT)
    else:
        splits = spec.convert(input_path, stats)
    splits = dedupe_ids(splits, stats)
    if image_root is not None:
        if not Path(image_root).is_dir():
            raise MedAlignError(f"--image-root {image_root} is not a folder")
        splits = check_images(splits, image_root, stats)
    return stats, write_splits(out_dir, splits, stats)
