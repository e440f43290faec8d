"""The answer file of ``medalign-eval generate``: LLaVA-Med JSONL, appended batch by batch, resumable.

One JSON object per line, ``{"question_id", "prompt", "text", "model_id", "metadata"}`` (LLaVA-Med's
answer-file format; ``question_id`` is the record's id, an int when the record's id is an int). Each
batch's lines are written with one ``write`` + ``flush`` + ``fsync``, so an interrupted run leaves
whole lines (at worst a partial last line, which the next run truncates) and resumes after the last
id written. A file written with other settings (its first line's ``metadata``) is never resumed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.generate_config import GenerateConfig
from shared.errors import MedAlignError
from shared.records import read_json

@dataclass
class ResumeState:
    """What an existing output file holds."""

    done: set[str]
    """Ids already answered (trimmed strings)."""
    lines: int
    """Complete lines kept."""
    truncated_bytes: int
    """Bytes of a partial last line removed (0 when the file ended cleanly)."""
    first: dict | None
    """The first answer line, to check it was written with the same settings."""


def _answer_line(path: Path, lineno: int, line: str | bytes) -> dict:
    """One parsed answer line; anything else names the file and line and suggests a way out."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise MedAlignError(f"{path}:{lineno}: not a JSON line ({e.msg}); is this an answer file? "
                            "Use another --out or --overwrite") from None
    if not isinstance(obj, dict) or "question_id" not in obj:
        raise MedAlignError(f"{path}:{lineno}: no question_id; is this an answer file? "
                            "Use another --out or --overwrite")
    return obj


def prepare_output(path: str | Path, *, overwrite: bool = False) -> ResumeState:
    """Make ``path`` ready for appending and report what it already holds.

    A missing file (or ``overwrite``) starts empty. Otherwise a trailing partial line (a run killed
    mid-write) is truncated away; every remaining line must be a JSON object with a
    ``question_id``, else :class:`MedAlignError` names the line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite or not path.exists():
        path.write_bytes(b"")
        return ResumeState(set(), 0, 0, None)
    data = path.read_bytes()
    cut = 0
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        cut = len(data) - keep
        data = data[:keep]
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    done: set[str] = set()
    first = None
    n = 0
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        obj = _answer_line(path, lineno, line)
        done.add(str(obj["question_id"]).strip())
        first = first or obj
        n += 1
    return ResumeState(done, n, cut, first)


def append_lines(path: str | Path, rows: list[dict]) -> None:
    """Append rows as JSON lines with one write, then flush and fsync (never a partial batch on
    a clean stop; at worst a partial last line on a kill, which :func:`prepare_output` removes)."""
    if not rows:
        return
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _teacher_identity(run_dir: str | Path | None) -> Any:
    if run_dir is None:
        return None
    p = Path(run_dir) / "teacher.json"
    return read_json(p) if p.is_file() else None


def model_id(model_dir: str | Path, run_dir: str | Path | None) -> str:
    """``<model dir name>`` or ``<model dir name>+<run dir name>``."""
    name = Path(model_dir).resolve().name
    return name if run_dir is None else f"{name}+{Path(run_dir).resolve().name}"


def run_metadata(cfg: GenerateConfig, template: str) -> dict[str, Any]:
    """The ``metadata`` written on every line: the decoding method and its resolved ``decoding_args``
    (every key), adapter, teacher identity, template, ..."""
    return {
        **cfg.decoding.to_json(),
        "adapter": None if cfg.adapter is None else str(Path(cfg.adapter).resolve()),
        "teacher": _teacher_identity(cfg.adapter),
        "template": template,
        "closed_suffix": cfg.closed_suffix,
        "dtype": cfg.dtype,
    }


#: Metadata keys that must agree between a resumed file and the current run.
_RESUME_KEYS = ("decoding", "decoding_args", "max_new_tokens", "seed", "adapter", "template", "closed_suffix",
                "dtype")


def _check_resumable(path: Path, first: dict | None, mid: str, meta: dict) -> None:
    if first is None:
        return
    old = first.get("metadata") or {}
    diffs = [k for k in _RESUME_KEYS if old.get(k) != meta.get(k)]
    if first.get("model_id") != mid:
        diffs.insert(0, "model_id")
    if diffs:
        detail = ", ".join(f"{k}: {old.get(k) if k != 'model_id' else first.get('model_id')!r} -> "
                           f"{meta.get(k) if k != 'model_id' else mid!r}" for k in diffs)
        raise MedAlignError(f"{path} was written with other settings ({detail}); resuming would mix "
                            "them. Use another --out, or --overwrite to start again")


def check_first_line(out: Path, mid: str, meta: dict) -> None:
    """Raise unless ``out``'s first complete line was written with the same settings."""
    with open(out, "rb") as f:
        head = f.readline()
    if not head.endswith(b"\n"):  # empty, or only a partial first line: nothing to compare
        return
    _check_resumable(out, _answer_line(out, 1, head), mid, meta)
