"""LLaVA-style dataset records: loading, validation, and the few accessors every stage needs.

A dataset file is a JSON list of objects like::

    {"id": 17, "image": "synpic123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nIs there a fracture?"},
                       {"from": "gpt", "value": "no"}],
     "answer_type": "CLOSED"}

Real files are messy: ids are ints or strings, answers are sometimes numbers, ``<image>`` may be
missing from the human turn, there are extra fields. Loaders keep every field and only normalise
what they must.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from shared.errors import MedAlignError

IMAGE_PLACEHOLDER = "<image>"


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MedAlignError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise MedAlignError(f"{path}: not UTF-8 text ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MedAlignError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None


def read_jsonl(path: str | Path, what: str = "data file") -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed value)`` for each non-blank line of a JSON-lines file.

    A line that is not JSON raises :class:`MedAlignError` naming the file, line and column.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MedAlignError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise MedAlignError(f"{path}: not UTF-8 text ({e})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise MedAlignError(f"{path}:{lineno}:{e.colno}: malformed JSON: {e.msg}") from None


def load_records(path: str | Path) -> list[dict]:
    """Load a LLaVA-style JSON list. Every record must be an object; ids are kept as given."""
    data = read_json(path)
    if isinstance(data, dict) and "data" in data and isinstance(data["data"], list):
        data = data["data"]
    if not isinstance(data, list):
        raise MedAlignError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise MedAlignError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
    return data


def record_id(rec: dict) -> str:
    """The record id as a string (ints and strings both occur in real data)."""
    rid = rec.get("id", rec.get("question_id"))
    return "" if rid is None else str(rid)


def record_image(rec: dict) -> str | None:
    """The dataset-relative image path of a record, or None for a text-only record."""
    img = rec.get("image")
    if img is None or img == "":
        return None
    if isinstance(img, list):  # some datasets list one image per record
        return str(img[0]) if img else None
    return str(img)


def first_turn(rec: dict, speaker: str) -> str | None:
    """The text of the first turn from ``speaker`` ("human" or "gpt"), as a string."""
    for turn in rec.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") == speaker:
            value = turn.get("value")
            return "" if value is None else str(value)
    return None


def question_text(rec: dict) -> str:
    """The first human turn with the ``<image>`` placeholder removed and whitespace trimmed."""
    q = first_turn(rec, "human") or rec.get("question") or rec.get("text") or ""
    return str(q).replace(IMAGE_PLACEHOLDER, "").strip()


def answer_text(rec: dict) -> str | None:
    """The first gpt turn (or an ``answer`` field) as a string; numbers are cast with str()."""
    a = first_turn(rec, "gpt")
    if a is None and "answer" in rec:
        a = str(rec["answer"])
    return a


def answer_type(rec: dict) -> str | None:
    """``OPEN`` / ``CLOSED`` normalised for case and stray spaces, or None when absent."""
    t = rec.get("answer_type")
    if t is None:
        return None
    return str(t).strip().upper() or None
