"""Command-line plumbing shared by the four tools: click options generated from typed dataclasses,
and the one way a :class:`~shared.errors.MedAlignError` becomes ``Error: ...`` and exit status 2.

A tool's options are the fields of its config dataclasses (docs/design.md section 2: "small typed
dataclasses are the single source of every option"): :func:`dataclass_options` turns each field into
``--field-name`` with the field's type, its default and, as help, the docstring written under the
field. A field's ``metadata`` may add ``choices`` (a tuple), ``flag`` (the option's name when it is
not the field's), ``required`` (shown as ``[required]``; the dataclass validates it), ``help`` (when the docstring is not the
right help text), ``multiple`` (a repeatable option, giving a tuple), ``metavar`` and ``cli: False`` (not an
option, e.g. a nested config with its own options). ``choices`` may be a lazy sequence (read when the
command parses or shows its help: :class:`LazyChoice`), e.g. names registered by plug-in modules.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from typing import Any, Callable, Iterator

import click

from shared.errors import MedAlignError, user_message


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`MedAlignError` raised inside into ``Error: <message>`` on stderr and exit 2."""
    try:
        yield
    except MedAlignError as e:
        click.echo(f"Error: {user_message(e)}", err=True)
        sys.exit(2)


class _UserError(click.ClickException):
    """A MedAlignError shown as ``Error: <msg>`` with exit status 2."""

    exit_code = 2


class UserErrorGroup(click.Group):
    """A click group whose subcommands' :class:`MedAlignError` s become ``Error: ...`` and exit 2
    (the group form of :func:`user_errors`)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MedAlignError as e:
            raise _UserError(user_message(e)) from None


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: the docstring written under it}`` for a dataclass (and its bases), whitespace
    collapsed to single spaces and reST double backquotes dropped (it is terminal help)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.replace("``", "").split())
    return docs


def _base_type(annotation: Any) -> type:
    """The click type behind a resolved annotation: ``int`` for ``int | None``, ``str`` for a union
    of several types (``str | int``: the dataclass parses it), the annotation itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return annotation


def dataclass_options(*classes: type, exclude: tuple[str, ...] = ()) -> Callable:
    """A decorator adding one click option per field of ``classes`` (in field order), except
    ``exclude``. Defaults are the dataclass defaults, so ``--config`` (click's ``default_map``) and
    the typed flags override them in that order."""

    def decorate(fn: Callable) -> Callable:
        opts = []
        for cls in classes:
            docs = field_docs(cls)
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.name in exclude or not f.init or f.metadata.get("cli") is False:
                    continue
                opts.append(_option(f, hints[f.name], docs.get(f.name, "")))
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return decorate


class LazyChoice(click.Choice):
    """A :class:`click.Choice` whose choices are read from a sequence when first needed, not when
    the option is declared (so declaring the CLI imports nothing the choices come from)."""

    def __init__(self, choices, case_sensitive: bool = True):
        self._source = choices
        self._cached: tuple | None = None
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple:  # type: ignore[override]
        if self._cached is None:
            self._cached = tuple(self._source)
        return self._cached

    @choices.setter
    def choices(self, value) -> None:
        self._source, self._cached = value, None


def _option(f: dataclasses.Field, annotation: Any, doc: str) -> Callable:
    meta = f.metadata
    flag = "--" + meta.get("flag", f.name).replace("_", "-")
    help_text = meta.get("help", doc)
    if meta.get("required"):
        help_text = f"{help_text}  [required]"
    default = f.default if f.default is not dataclasses.MISSING else None
    typ = _base_type(annotation)
    if typ is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=bool(default), help=help_text,
                            show_default=bool(default))
    if "choices" in meta:
        choices = meta["choices"]
        click_type: Any = click.Choice(choices) if isinstance(choices, (tuple, list)) else LazyChoice(choices)
    else:
        click_type = typ if typ in (int, float, str) else str
    extra: dict[str, Any] = {"metavar": meta["metavar"]} if "metavar" in meta else {}
    if meta.get("multiple"):
        return click.option(flag, f.name, type=str, multiple=True, default=(), help=help_text, **extra)
    if meta.get("required") and default in ("", None):
        default = None
    return click.option(flag, f.name, type=click_type, default=default, help=help_text,
                        show_default=default not in (None, ""), **extra)


__all__ = ["user_errors", "UserErrorGroup", "field_docs", "dataclass_options", "LazyChoice"]
