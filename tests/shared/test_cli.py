"""shared.cli: click options generated from a dataclass (types, defaults, docstring help, choices,
required, boolean flags) and the MedAlignError -> exit 2 handling."""

from __future__ import annotations

from dataclasses import dataclass, field

import click
from click.testing import CliRunner

from shared.cli import dataclass_options, field_docs, user_errors
from shared.errors import MedAlignError


@dataclass
class Toy:
    path: str = field(default="", metadata={"required": True})
    """Where the ``thing`` lives."""
    steps: int | None = None
    """How many steps (none: until done)."""
    rate: float = 0.5
    """A rate
    over two lines."""
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    """The mode."""
    fast: bool = False
    """Go fast."""


def _cli(seen):
    @click.command()
    @dataclass_options(Toy)
    def cmd(**kw):
        with user_errors():
            if kw["path"] == "bad":
                raise MedAlignError("bad path")
            seen.update(kw)
    return cmd


def test_field_docs_are_collapsed_docstrings():
    assert field_docs(Toy) == {"path": "Where the thing lives.", "steps": "How many steps (none: until done).",
                               "rate": "A rate over two lines.", "mode": "The mode.", "fast": "Go fast."}


def test_generated_options_parse_types_defaults_and_choices():
    seen: dict = {}
    res = CliRunner().invoke(_cli(seen), [])
    assert res.exit_code == 0, res.output
    assert seen == {"path": None, "steps": None, "rate": 0.5, "mode": "a", "fast": False}
    res = CliRunner().invoke(_cli(seen), ["--path", "p", "--steps", "3", "--rate", "2", "--mode", "b", "--fast"])
    assert res.exit_code == 0, res.output
    assert seen == {"path": "p", "steps": 3, "rate": 2.0, "mode": "b", "fast": True}
    assert isinstance(seen["steps"], int) and isinstance(seen["rate"], float)
    res = CliRunner().invoke(_cli(seen), ["--mode", "c"])
    assert res.exit_code == 2 and "'c' is not one of 'a', 'b'" in res.output
    res = CliRunner().invoke(_cli(seen), ["--steps", "x"])
    assert res.exit_code == 2 and "is not a valid integer" in res.output


def test_help_comes_from_the_docstrings():
    out = CliRunner().invoke(_cli({}), ["--help"]).output
    assert "Where the thing lives.  [required]" in out and "A rate over two lines." in out
    assert "--fast / --no-fast" in out and "[a|b]" in out


def test_user_errors_exit_2_with_the_message():
    res = CliRunner().invoke(_cli({}), ["--path", "bad"])
    assert res.exit_code == 2 and res.output.strip() == "Error: bad path"
