"""The training methods: one small module per method, looked up by ``--method``.

A method is a :class:`~student_train.methods.base.TrainingMethod`: what it checks before training
(model, teacher cache, records), how it prepares the student, which teacher fields a sample and a
batch carry, its loss step and the loss terms it logs. The recipe (:mod:`student_train.recipe`) and
the plan (:mod:`student_train.plan`) dispatch through :func:`get_method`.

* ``medalign``: MedAlign's L_vis + L_att from a MedAlign teacher cache (:mod:`.medalign`).
* ``a3tune``: A3Tune's head-selective attention alignment to weak masks from an A3 cache, and
  optionally A3MoE (:mod:`.a3tune`).
"""

from __future__ import annotations

from shared.errors import MedAlignError
from student_train.config import METHODS
from student_train.methods.a3tune import A3TUNE
from student_train.methods.base import TrainingMethod
from student_train.methods.medalign import MEDALIGN

_REGISTRY: dict[str, TrainingMethod] = {m.name: m for m in (MEDALIGN, A3TUNE)}
assert tuple(_REGISTRY) == METHODS, "config.METHODS and the registry disagree"


def list_methods() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> TrainingMethod:
    """The method called ``name``; an unknown name is a MedAlignError listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MedAlignError(f"unknown --method {name!r}; valid: {', '.join(_REGISTRY)}") from None


__all__ = ["TrainingMethod", "get_method", "list_methods"]
