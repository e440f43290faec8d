"""Answer files in parts: the slices of a torchrun generate or of ``--num-chunks`` jobs, and their merge.

* Slices: the questions' FIXED batches (:func:`evaluation.generate.batches_to_run`'s partition) are
  cut into contiguous runs of whole batches (:func:`question_slice`), so every slice runs the very
  batches (the same padding) a one-process run would, and sampling is seeded per question: the
  merged file equals a one-process run line for line, for every ``--decoding``.
* Under torchrun rank r of K writes ``OUT.part-RRRRR-of-KKKKK`` (:func:`part_path`) beside ``--out``;
  rank 0 merges ``OUT`` (a file an interrupted one-process run left) and every part, of any K, into
  ``--out`` in question order (:func:`merge_answer_files`: a temporary name, renamed over ``--out``;
  the parts are removed only after that). A resumed run reads every earlier part (of any K) for the
  ids already answered, so ``--resume`` works per slice with any K.
* ``medalign-eval merge`` (:func:`merge_chunks`) joins ``--num-chunks`` files strictly: every question
  of ``--data`` exactly once, all written with the same settings, nothing foreign.

Lines are copied byte for byte, never re-serialised.
"""

from __future__ import annotations

import re
from pathlib import Path

from evaluation.answer_file import _answer_line, _check_resumable
from evaluation.questions import Question
from shared.distributed import contiguous_slice
from shared.errors import MedAlignError
from shared.fileio import atomic_write_bytes

_PART = re.compile(r"\.part-(\d{5})-of-(\d{5})$")


def question_slice(questions: list[Question], batch_size: int, parts: int, index: int) -> list[Question]:
    """Part ``index`` of ``parts`` of the questions, cut at batch boundaries (contiguous, by position)."""
    n_batches = (len(questions) + batch_size - 1) // batch_size
    r = contiguous_slice(n_batches, parts, index)
    return questions[r.start * batch_size:r.stop * batch_size]


def part_path(out: str | Path, rank: int, world: int) -> Path:
    """Rank ``rank`` of ``world``'s partial answer file beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}.part-{rank:05d}-of-{world:05d}")


def existing_parts(out: str | Path) -> list[Path]:
    """The partial answer files of ``out`` on disk (any world size), sorted."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(out.name + ".part-")
                  and _PART.search(p.name[len(out.name):]) and p.is_file())


def read_answers(path: str | Path) -> tuple[list[tuple[str, bytes]], bool]:
    """``[(question id, raw line)]`` of an answer file, read-only, and whether it ended with a partial
    line (a writer killed mid-line; that line is left out)."""
    path = Path(path)
    data = path.read_bytes()
    partial = bool(data) and not data.endswith(b"\n")
    if partial:
        data = data[:data.rfind(b"\n") + 1]
    rows = []
    for lineno, line in enumerate(data.splitlines(keepends=True), start=1):
        if not line.strip():
            continue
        obj = _answer_line(path, lineno, line)
        rows.append((str(obj["question_id"]).strip(), line))
    return rows, partial


def answered_ids(path: str | Path, mid: str, meta: dict) -> set[str]:
    """The ids answered in ``path`` (read-only), which must have been written with these settings."""
    rows, _ = read_answers(path)
    if rows:
        _check_resumable(Path(path), _answer_line(Path(path), 1, rows[0][1]), mid, meta)
    return {k for k, _ in rows}


def merge_answer_files(keys: list[str], sources: list[Path], out: Path, *, remove: list[Path] = ()) -> int:
    """Write ``out``: for each id of ``keys`` in order, its line from the first source holding it;
    then remove ``remove``. Every key must be answered somewhere. Returns the lines written."""
    found: dict[str, bytes] = {}
    for src in sources:
        for k, line in read_answers(src)[0]:
            found.setdefault(k, line)
    missing = [k for k in keys if k not in found]
    if missing:
        raise MedAlignError(f"cannot merge {out}: {len(missing)} question(s) have no answer in "
                            f"{', '.join(map(str, sources)) or 'any part'} (first: {missing[0]}); a rank "
                            "did not finish: run again with the same --out to finish them")
    atomic_write_bytes(out, b"".join(found[k] for k in keys))
    for p in remove:
        Path(p).unlink(missing_ok=True)
    return len(keys)


def merge_chunks(questions: list[Question], parts: list[Path], out: Path) -> int:
    """``medalign-eval merge``: the parts must cover ``questions`` exactly once, each a complete file,
    all written by one model with one set of settings; ``out`` gets their lines in question order."""
    if not parts:
        raise MedAlignError("give the part files to merge")
    keys = [q.key for q in questions]
    known = set(keys)
    owner: dict[str, Path] = {}
    lines: dict[str, bytes] = {}
    first: tuple[Path, dict] | None = None
    seen_files: dict[Path, Path] = {}
    for part in parts:
        real = Path(part).resolve()
        if real in seen_files:
            raise MedAlignError(f"{part}: given twice (as {seen_files[real]}); each part once")
        seen_files[real] = Path(part)
        rows, partial = read_answers(part)
        if partial:
            raise MedAlignError(f"{part}: ends with a partial line (its run was interrupted); resume that "
                                "chunk before merging")
        if not rows:
            raise MedAlignError(f"{part}: holds no answers")
        head = _answer_line(Path(part), 1, rows[0][1])
        if first is None:
            first = (Path(part), head)
        else:
            try:
                _check_resumable(Path(part), head, first[1].get("model_id"), first[1].get("metadata") or {})
            except MedAlignError:
                raise MedAlignError(f"{part}: a foreign part: written by another model or with other settings "
                                    f"than {first[0]} (model_id {head.get('model_id')!r} vs "
                                    f"{first[1].get('model_id')!r}, or its metadata differs)") from None
        foreign = [k for k, _ in rows if k not in known]
        if foreign:
            raise MedAlignError(f"{part}: a foreign part: {len(foreign)} id(s) are not questions of --data "
                                f"(first: {foreign[0]})")
        for k, line in rows:
            if k in owner:
                where = "itself" if owner[k] == Path(part) else str(owner[k])
                raise MedAlignError(f"{part}: question {k} is answered twice (also in {where}); a chunk "
                                    "given twice, or chunks of different --num-chunks")
            owner[k], lines[k] = Path(part), line
    missing = [k for k in keys if k not in owner]
    if missing:
        raise MedAlignError(f"the parts miss {len(missing)} of {len(keys)} question(s) of --data (first: "
                            f"{missing[0]}): a chunk is missing or unfinished")
    atomic_write_bytes(out, b"".join(lines[k] for k in keys))
    return len(keys)


__all__ = ["question_slice", "part_path", "existing_parts", "read_answers", "answered_ids",
           "merge_answer_files", "merge_chunks"]
