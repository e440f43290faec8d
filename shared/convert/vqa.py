"""Converters for the VQA releases: VQA-RAD, SLAKE, PathVQA and OmniMedVQA.

Each ``convert_*`` takes the input path and a :class:`ConvertStats`, and returns
``{split: [record, ...]}`` with splits named ``train`` / ``val`` / ``test``. Bad rows are counted
in ``stats`` and dropped; they never stop a conversion. The accepted input of each format is
stated in its docstring (and in the README).
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Callable

from shared.convert.common import (
    ConvertStats, RowSkipped, canonical_split, clean_answer_type, clean_image, clean_str,
    find_split_files, int_if_digits, make_record, read_rows,
)
from shared.errors import MedAlignError

def _convert_rows(rows: list[Any], row_fn: Callable[[dict], tuple[str, dict]], stats: ConvertStats,
                  out: dict[str, list[dict]] | None = None) -> dict[str, list[dict]]:
    """Apply ``row_fn`` (row -> (split, record)) to each row, counting skipped rows by reason."""
    out = {} if out is None else out
    for row in rows:
        if not isinstance(row, dict):
            stats.skip("row is not a JSON object")
            continue
        try:
            split, rec = row_fn(row)
        except RowSkipped as e:
            stats.skip(e.reason)
            continue
        out.setdefault(split, []).append(rec)
    return out


def _optional_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# ---------------------------------------------------------------------------------------------
# VQA-RAD

VQA_RAD_FILE = "VQA_RAD Dataset Public.json"


def convert_vqa_rad(path: Path, stats: ConvertStats) -> dict[str, list[dict]]:
    """VQA-RAD from the official OSF JSON (``VQA_RAD Dataset Public.json``, or a folder holding it).

    Split: the official one, ``test`` when ``phrase_type`` starts with "test" (test_freeform,
    test_para), ``train`` otherwise; an added ``split`` field is ignored. ``id`` is the official
    ``qid`` (the string "0" of row 0 becomes the int 0). Kept fields: ``image_organ``,
    ``question_type``, ``phrase_type``. Answers are stripped strings (ints cast), casing is kept.
    """
    if path.is_dir():
        candidates = [path / VQA_RAD_FILE, path / "qa.json"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise MedAlignError(f"{path}: no {VQA_RAD_FILE!r} (or qa.json) in this folder")
        path = found[0]

    def row_fn(row: dict) -> tuple[str, dict]:
        if "qid" not in row or row["qid"] is None:
            raise RowSkipped("missing qid")
        phrase = _optional_str(row.get("phrase_type"))
        if phrase is None:
            raise RowSkipped("missing phrase_type")
        split = "test" if phrase.lower().startswith("test") else "train"
        question = clean_str(row.get("question"), "question", stats)
        answer = clean_str(row.get("answer"), "answer", stats)
        return split, make_record(
            int_if_digits(row["qid"], stats, "qid"), clean_image(row.get("image_name")), question, answer,
            clean_answer_type(row.get("answer_type"), answer, stats),
            image_organ=_optional_str(row.get("image_organ")),
            question_type=_optional_str(row.get("question_type")), phrase_type=phrase)

    return _convert_rows(read_rows(path), row_fn, stats)


# ---------------------------------------------------------------------------------------------
# SLAKE

SLAKE_FILES = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def convert_slake(path: Path, stats: ConvertStats) -> dict[str, list[dict]]:
    """SLAKE (English part) from the official release folder: ``train.json``, ``validation.json``,
    ``test.json`` (any present), rows with ``img_name``, ``question``, ``answer``, ``answer_type``,
    ``q_lang``, ``qid``. Rows with ``q_lang != "en"`` are skipped (counted). ``id`` is ``qid``;
    kept fields: ``modality``, ``location``, ``content_type``. ``validation`` is written as ``val``.
    A single file may be given instead of the folder; its stem names the split.
    """
    if path.is_file():
        files = {canonical_split(path.stem): path}
    else:
        files = find_split_files(path, SLAKE_FILES, suffixes=(".json",))
        if not files:
            raise MedAlignError(f"{path}: no train.json / validation.json / test.json (SLAKE release) here")
    out: dict[str, list[dict]] = {}
    for split, file in files.items():
        def row_fn(row: dict, split=split) -> tuple[str, dict]:
            lang = _optional_str(row.get("q_lang"))
            if lang != "en":
                raise RowSkipped(f"q_lang is {lang!r}, not 'en'")
            if row.get("qid") is None:
                raise RowSkipped("missing qid")
            question = clean_str(row.get("question"), "question", stats)
            answer = clean_str(row.get("answer"), "answer", stats)
            return split, make_record(
                int_if_digits(row["qid"], stats, "qid"), clean_image(row.get("img_name")), question, answer,
                clean_answer_type(row.get("answer_type"), answer, stats),
                modality=_optional_str(row.get("modality")), location=_optional_str(row.get("location")),
                content_type=_optional_str(row.get("content_type")))

        _convert_rows(read_rows(file), row_fn, stats, out)
    return out


# ---------------------------------------------------------------------------------------------
# PathVQA

PATHVQA_FILES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
_IMAGE_KEYS = ("image", "image_path", "img_name", "image_name", "img_id", "image_id")
_ID_KEYS = ("id", "qid", "question_id")
_PATHVQA_IMAGE_ID = re.compile(r"^(train|val|test)_\d+$")


def convert_pathvqa(path: Path, stats: ConvertStats) -> dict[str, list[dict]]:
    """PathVQA from a pickle-free export: a folder with ``train`` / ``val`` (or ``validation``) /
    ``test`` files, each ``.json`` (a list of objects), ``.jsonl`` or ``.csv``; or one such file
    whose rows carry a ``split`` field (else its stem names the split).

    Row fields: ``question``, ``answer``, an image (``image``, ``image_path``, ``img_name``,
    ``image_name``, ``img_id`` or ``image_id``), optional ``answer_type`` and ``id`` / ``qid`` /
    ``question_id``. An image value that is a bare PathVQA image id (``train_0422``) becomes
    ``train/train_0422.jpg``, the release's ``images/<split>/`` layout (pass ``images/`` as the
    image root). Without ``answer_type``, yes/no answers are CLOSED, others OPEN. Without an id,
    the id is ``<split>_<row index>``. The pickled ``qas/*.pkl`` files are not read (no pickle).
    """
    if path.is_file():
        if path.suffix.lower() in (".pkl", ".pickle"):
            raise MedAlignError(f"{path}: pickle files are not read; export the QA pairs to JSON/JSONL/CSV")
        files = {canonical_split(path.stem): path}
    else:
        files = find_split_files(path, PATHVQA_FILES)
        if not files:
            raise MedAlignError(f"{path}: no train/val/test .json, .jsonl or .csv files (PathVQA export) here")
    out: dict[str, list[dict]] = {}
    for file_split, file in files.items():
        counter = {"i": 0}

        def row_fn(row: dict, file_split=file_split, counter=counter) -> tuple[str, dict]:
            index = counter["i"]
            counter["i"] += 1
            split = canonical_split(row["split"]) if _optional_str(row.get("split")) else file_split
            image = clean_image(next((row[k] for k in _IMAGE_KEYS if _optional_str(row.get(k))), None))
            if _PATHVQA_IMAGE_ID.match(image):
                stats.fix("image given as a PathVQA image id, mapped to <split>/<id>.jpg")
                image = f"{image.split('_')[0]}/{image}.jpg"
            rid = next((row[k] for k in _ID_KEYS if _optional_str(row.get(k))), None)
            rid = f"{split}_{index}" if rid is None else int_if_digits(rid, stats)
            question = clean_str(row.get("question"), "question", stats)
            answer = clean_str(row.get("answer"), "answer", stats)
            return split, make_record(rid, image, question, answer,
                                      clean_answer_type(row.get("answer_type"), answer, stats))

        _convert_rows(read_rows(file), row_fn, stats, out)
    return out


# ---------------------------------------------------------------------------------------------
# OmniMedVQA

OPTION_LETTERS = string.ascii_uppercase[:8]


def format_options(question: str, options: list[str]) -> str:
    """The question with its options appended, one per line::

        What modality is shown?
        Options:
        A. CT
        B. MRI
    """
    lines = [question, "Options:"] + [f"{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def convert_omnimedvqa(path: Path, stats: ConvertStats) -> dict[str, list[dict]]:
    """OmniMedVQA from its ``QA_information`` JSON files: one file, or a folder searched
    recursively for ``*.json`` (sorted). Rows: ``question_id``, ``question``, ``option_A`` ..
    ``option_D`` (2-4 present; up to ``option_H`` read), ``gt_answer``, ``image_path``, and
    ``dataset``, ``question_type``, ``modality_type`` (kept).

    The options are kept as a list field ``options`` and appended to the question (see
    :func:`format_options`); the answer is the ``gt_answer`` text, its letter is ``answer_letter``,
    and ``answer_type`` is CLOSED. A ``gt_answer`` matching no option (after stripping and
    case-folding) skips the row. OmniMedVQA has no official split: every row goes to ``test``
    unless it carries a ``split`` field.
    """
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*.json") if p.is_file())
        if not files:
            raise MedAlignError(f"{path}: no .json files (OmniMedVQA QA_information) here")

    def row_fn(row: dict) -> tuple[str, dict]:
        if _optional_str(row.get("question_id")) is None:
            raise RowSkipped("missing question_id")
        question = clean_str(row.get("question"), "question", stats)
        options = []
        for letter in OPTION_LETTERS:
            value = row.get(f"option_{letter}")
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            options.append(clean_str(value, "option", stats))
        if len(options) < 2:
            raise RowSkipped("fewer than two options")
        answer = clean_str(row.get("gt_answer"), "gt_answer", stats)
        if answer in options:
            index = options.index(answer)
        else:
            folded = [o.casefold() for o in options]
            if answer.casefold() not in folded:
                raise RowSkipped("gt_answer not among the options")
            index = folded.index(answer.casefold())
            stats.fix("gt_answer matched an option only after case-folding")
            answer = options[index]
        split = canonical_split(row["split"]) if _optional_str(row.get("split")) else "test"
        return split, make_record(
            int_if_digits(row["question_id"], stats, "question_id"), clean_image(row.get("image_path")),
            format_options(question, options), answer, "CLOSED",
            options=options, answer_letter=OPTION_LETTERS[index],
            dataset=_optional_str(row.get("dataset")), question_type=_optional_str(row.get("question_type")),
            modality_type=_optional_str(row.get("modality_type")))

    out: dict[str, list[dict]] = {}
    for file in files:
        _convert_rows(read_rows(file), row_fn, stats, out)
    return out
