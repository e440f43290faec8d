"""The questions of a test set: LLaVA-style records -> :class:`Question` s, ids kept, closed suffix.

LLaVA-Med's prepared test files carry an answer-options suffix on closed questions; the official
files (and our converters' output) do not: :func:`with_closed_suffix` adds it the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from evaluation.generate_config import CLOSED_SUFFIX_MODES
from shared.errors import MedAlignError
from shared.records import answer_type, load_records, question_text, record_id, record_image

#: LLaVA-Med's answer-options suffix for closed (yes/no) questions. LLaVA-Med's evaluation script
#: (``llava/eval/model_vqa.py``) adds nothing itself: the suffix is part of the question text of
#: its prepared test files, appended to every CLOSED question (VQA-RAD: all 272 closed test
#: questions; PathVQA: the yes/no ones, which are its closed ones). See :func:`with_closed_suffix`.
CLOSED_SUFFIX = " Please choose from the following two options: [yes, no]"
_HAS_OPTIONS = re.compile(r"please choose from the following", re.IGNORECASE)


@dataclass(frozen=True)
class Question:
    """One test question, ready to prompt."""

    qid: int | str
    """The record's id as given (int ids stay ints; a record without id gets its index)."""
    image: str
    """Dataset-relative image path."""
    question: str
    """The question text sent to the template (``<image>`` removed, closed suffix applied)."""

    @property
    def key(self) -> str:
        """The id as the trimmed string used to join and to resume."""
        return str(self.qid).strip()


def with_closed_suffix(question: str, atype: str | None, mode: str) -> str:
    """LLaVA-Med's answer-options suffix, as its prepared test files carry it.

    ``auto`` (default, reproduces LLaVA-Med): appended when the record's ``answer_type`` is
    ``CLOSED``; ``always``: appended to every question; ``never``: the question as given. A
    question that already holds "Please choose from the following ..." is never given a second
    one. LLaVA-Med's VQA-RAD file capitalises the options ("[Yes, No]") where the ground-truth
    answer is capitalised, which leaks the answer's case; this always writes ``[yes, no]``.
    """
    if mode not in CLOSED_SUFFIX_MODES:
        raise MedAlignError(f"unknown closed-suffix mode {mode!r}; valid: {', '.join(CLOSED_SUFFIX_MODES)}")
    if mode == "never" or _HAS_OPTIONS.search(question):
        return question
    if mode == "always" or atype == "CLOSED":
        return question + CLOSED_SUFFIX
    return question


def load_questions(data: str | Path, closed_suffix: str = "auto", limit: int | None = None) -> list[Question]:
    """Read a LLaVA-style test file into questions (the first ``limit`` records only, if given).

    Raises :class:`MedAlignError` for records without an image or without a question, and for
    repeated ids (answers are joined and resumed by id), naming the records.
    """
    records = load_records(data)
    if limit is not None:
        records = records[: int(limit)]
    if not records:
        raise MedAlignError(f"{data}: no records")
    out: list[Question] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    for i, rec in enumerate(records):
        raw_id = rec.get("id", rec.get("question_id"))
        qid: int | str = i if raw_id is None or str(raw_id).strip() == "" else raw_id
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            qid = str(qid)
        image = record_image(rec)
        q = question_text(rec)
        where = f"record {i} (id {record_id(rec) or i})"
        if image is None:
            problems.append(f"{where}: no image")
            continue
        if not q:
            problems.append(f"{where}: no question (no human turn)")
            continue
        question = Question(qid, image, with_closed_suffix(q, answer_type(rec), closed_suffix))
        if question.key in seen:
            problems.append(f"{where}: id {question.key!r} repeats record {seen[question.key]}")
            continue
        seen[question.key] = i
        out.append(question)
    if problems:
        shown = "; ".join(problems[:5]) + (f" ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise MedAlignError(f"{data}: {len(problems)} record(s) cannot be asked: {shown}")
    return out
