"""Building blocks shared by the dataset converters.

Every converter turns a source release into LLaVA-style records (see :mod:`shared.records`)::

    {"id": 17, "image": "synpic123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nIs there a fracture?"},
                       {"from": "gpt", "value": "no"}],
     "answer_type": "CLOSED", ...source-specific extra fields...}

Real releases are messy, so converters never crash on a bad row: they count it. A
:class:`ConvertStats` collects ``kept`` per split, ``skipped`` by reason and ``fixed`` (quirks that
were repaired, e.g. an integer answer cast to a string), and is printed by the CLI and written
next to the output as ``convert_stats.json``.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import MedAlignError
from shared.fileio import atomic_write_json
from shared.images import resolve_image_path
from shared.records import IMAGE_PLACEHOLDER, read_json, read_jsonl

#: Split names written as ``<split>.json``; sources' own names are mapped onto these.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
SPLIT_ORDER = ("train", "val", "test")
YES_NO = frozenset({"yes", "no"})


class RowSkipped(Exception):
    """Raised inside a row converter: the row is dropped and counted under ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ConvertStats:
    """What a conversion did: records kept per split, rows skipped and quirks fixed, by reason."""

    kept: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    fixed: Counter = field(default_factory=Counter)
    answer_types: dict[str, Counter] = field(default_factory=dict)

    def keep(self, split: str, rec: dict) -> None:
        self.kept[split] += 1
        self.answer_types.setdefault(split, Counter())[rec.get("answer_type", "?")] += 1

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def fix(self, what: str) -> None:
        self.fixed[what] += 1

    def to_json(self) -> dict:
        return {"kept": dict(self.kept), "kept_total": sum(self.kept.values()),
                "answer_types": {s: dict(c) for s, c in self.answer_types.items()},
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
                "fixed": dict(self.fixed)}

    def summary_lines(self) -> list[str]:
        lines = []
        for split in sorted(self.kept, key=_split_rank):
            types = ", ".join(f"{t} {n}" for t, n in sorted(self.answer_types.get(split, {}).items()))
            lines.append(f"kept {split}: {self.kept[split]} ({types})")
        lines.append(f"skipped: {sum(self.skipped.values())}")
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.skipped.items())]
        if self.fixed:
            lines.append("fixed:")
            lines += [f"  {what}: {n}" for what, n in sorted(self.fixed.items())]
        return lines


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def canonical_split(name: str) -> str:
    """``validation`` -> ``val`` etc.; an unknown name is kept as given (lower-cased)."""
    key = str(name).strip().lower()
    return SPLIT_ALIASES.get(key, key)


def clean_str(value: Any, what: str, stats: ConvertStats) -> str:
    """A required text field as a stripped string; numbers are cast (counted), empty is skipped."""
    if value is None:
        raise RowSkipped(f"missing {what}")
    if isinstance(value, bool):
        raise RowSkipped(f"{what} is a boolean")
    if isinstance(value, (int, float)):
        stats.fix(f"{what} is a number, cast to str")
        value = str(value)
    if not isinstance(value, str):
        raise RowSkipped(f"{what} is a {type(value).__name__}")
    text = value.strip()
    if not text:
        raise RowSkipped(f"empty {what}")
    if text != value:
        stats.fix(f"{what} had leading/trailing whitespace")
    return text


def clean_answer_type(value: Any, answer: str, stats: ConvertStats) -> str:
    """``OPEN``/``CLOSED`` from a source field (case and stray spaces fixed and counted).

    When the field is absent, a yes/no answer is CLOSED and anything else OPEN (the VQA-RAD /
    SLAKE / PathVQA convention); the inference is counted. Any other value skips the row.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        stats.fix("answer_type missing, inferred from the answer")
        return "CLOSED" if answer.strip().lower() in YES_NO else "OPEN"
    text = str(value)
    norm = text.strip().upper()
    if norm not in ("OPEN", "CLOSED"):
        raise RowSkipped(f"unknown answer_type {text!r}")
    if norm != text:
        stats.fix(f"answer_type {text!r} normalised to {norm!r}")
    return norm


def clean_image(value: Any) -> str:
    """A dataset-relative image path (first one if a list); a row without an image is skipped."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or not str(value).strip():
        raise RowSkipped("no image")
    return str(value).strip().replace("\\", "/")


def int_if_digits(value: Any, stats: ConvertStats, what: str = "id") -> Any:
    """An id as an int when it is one (``"17"`` -> 17, counted); other strings are kept."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        stats.fix(f"{what} given as float, cast to int")
        return int(value)
    text = str(value).strip()
    if text.isdigit():
        stats.fix(f"{what} given as string, cast to int")
        return int(text)
    return text


def make_record(rid: Any, image: str, question: str, answer: str, answer_type: str, **extra: Any) -> dict:
    """One LLaVA-style record; ``extra`` fields follow the standard ones (None values dropped)."""
    rec = {"id": rid, "image": image,
           "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                             {"from": "gpt", "value": answer}],
           "answer_type": answer_type}
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def check_images(splits: dict[str, list[dict]], image_root: str | Path, stats: ConvertStats) -> dict[str, list[dict]]:
    """Drop records whose image file is absent under ``image_root`` (counted) or escapes it."""
    out: dict[str, list[dict]] = {}
    for split, recs in splits.items():
        kept = []
        for rec in recs:
            try:
                path = resolve_image_path(image_root, rec["image"])
            except MedAlignError:
                stats.skip("image path escapes --image-root")
                continue
            if not path.is_file():
                stats.skip("image file not found under --image-root")
                continue
            kept.append(rec)
        out[split] = kept
    return out


def dedupe_ids(splits: dict[str, list[dict]], stats: ConvertStats) -> dict[str, list[dict]]:
    """Keep one record per id: earliest split (train, val, test), then file order; count the rest."""
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in sorted(splits, key=_split_rank):
        kept = []
        for rec in splits[split]:
            key = str(rec["id"])
            if key in seen:
                stats.skip("duplicate id")
                continue
            seen.add(key)
            kept.append(rec)
        out[split] = kept
    return out


def write_splits(out_dir: str | Path, splits: dict[str, list[dict]], stats: ConvertStats) -> list[Path]:
    """Write ``<split>.json`` for every split (``train`` and ``test`` always, even when empty),
    plus ``convert_stats.json``; counts ``kept`` in ``stats``. Files are replaced atomically and a
    ``val.json`` from an earlier run is removed when this source has no val split."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    names = set(splits) | {"train", "test"}
    for split in sorted(names, key=_split_rank):
        recs = splits.get(split, [])
        for rec in recs:
            stats.keep(split, rec)
        written.append(atomic_write_json(out / f"{split}.json", recs))
    for split in SPLIT_ORDER:  # a split file left by an earlier conversion would be mistaken for ours
        if split not in names and (out / f"{split}.json").is_file():
            (out / f"{split}.json").unlink()
    written.append(atomic_write_json(out / "convert_stats.json", stats.to_json()))
    return written




# ---------------------------------------------------------------------------------------------
# Reading tabular sources: a JSON list, JSON Lines or CSV file.

def read_rows(path: str | Path) -> list[dict]:
    """Rows of a ``.json`` (a list of objects, or ``{"data": [...]}``), ``.jsonl`` or ``.csv`` file.

    Malformed JSON names the file, line and column. Non-object rows are returned as they are;
    converters count them as skipped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [obj for _, obj in read_jsonl(path)]
    if suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                return [dict(row) for row in csv.DictReader(f)]
        except FileNotFoundError:
            raise MedAlignError(f"data file not found: {path}") from None
        except (UnicodeDecodeError, csv.Error) as e:
            raise MedAlignError(f"{path}: cannot read CSV ({e})") from None
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise MedAlignError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def find_split_files(folder: Path, stems: dict[str, str], suffixes=(".json", ".jsonl", ".csv")) -> dict[str, Path]:
    """Map split -> file for the ``stems`` ({file stem: split}) present in ``folder``."""
    found: dict[str, Path] = {}
    for stem, split in stems.items():
        for suffix in suffixes:
            p = folder / f"{stem}{suffix}"
            if p.is_file():
                if split in found:
                    raise MedAlignError(f"{folder}: both {found[split].name} and {p.name} hold the {split} split")
                found[split] = p
    return found
