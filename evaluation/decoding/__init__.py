"""The registry of decoding methods (``medalign-eval generate --decoding NAME``).

Every module of this package (except ``base`` and names starting with ``_``) is imported on first
use; each registers its :class:`~evaluation.decoding.base.Method` subclasses with :func:`register`.
:func:`names` is the single source of the CLI's choice list, so a method appears once its module
exists. The interface a method module codes against is documented in :mod:`evaluation.decoding.base`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from shared.errors import MedAlignError

if TYPE_CHECKING:
    from evaluation.decoding.base import Method

#: The order methods are listed in (the paper's); registered methods not named here follow, sorted.
ORDER = ("greedy", "beam", "nucleus", "vcd", "dola", "opera", "avisc", "m3id", "damro", "pai")

_REGISTRY: dict[str, Method] = {}
_loaded = False


def register(cls: type) -> type:
    """Class decorator: register one instance of a Method subclass under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not name:
        raise RuntimeError(f"{cls.__name__} has no name")
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise RuntimeError(f"decoding method {name!r} is registered twice ({type(_REGISTRY[name]).__name__}, "
                           f"{cls.__name__})")
    _REGISTRY[name] = cls()
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def names() -> tuple[str, ...]:
    """The registered method names, in :data:`ORDER` (then the others, sorted)."""
    _load()
    known = [n for n in ORDER if n in _REGISTRY]
    return tuple(known + sorted(n for n in _REGISTRY if n not in ORDER))


def get(name: str) -> Method:
    """The method registered as ``name``; an unknown name lists the valid ones."""
    _load()
    if name not in _REGISTRY:
        raise MedAlignError(f"unknown --decoding {name!r}; valid: {', '.join(names())}")
    return _REGISTRY[name]


__all__ = ["ORDER", "get", "names", "register"]
