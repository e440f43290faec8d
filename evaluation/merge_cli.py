"""``medalign-eval merge``: join the answer files of ``generate --num-chunks N --chunk-idx I`` jobs.

The parts must cover the questions of ``--data`` (the same ``--limit``) exactly once: a missing or
unfinished chunk, a chunk given twice and a part of another run or another question file are
refused. The lines are copied in question order into ``--out`` (a temporary name, then renamed), so
the result equals a one-process run line for line. The parts are left in place.
"""

from __future__ import annotations

from pathlib import Path

import click

from shared.cli import user_errors


@click.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Merged answer file.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The question file the chunks answered (as given to generate).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="The --limit given to generate, if any.")
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def merge(out: Path, data: Path, limit: int | None, parts: tuple[Path, ...]) -> None:
    """Merge --num-chunks answer files (PART...) into one, in question order."""
    with user_errors():
        from evaluation.answer_parts import merge_chunks
        from evaluation.questions import load_questions

        if out.resolve() in {p.resolve() for p in parts}:
            from shared.errors import MedAlignError
            raise MedAlignError(f"--out {out} is one of the parts; write the merge to a new file")
        n = merge_chunks(load_questions(data, "never", limit), list(parts), out)
        click.echo(f"merged {len(parts)} part(s): {n} answers -> {out}", err=True)
