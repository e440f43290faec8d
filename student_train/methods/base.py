"""The interface of a training method (:mod:`student_train.methods`): a plain class whose methods
the plan and the recipe call, in this order::

    check_model(cfg, llava_config)              plan: settings that need the model's shape
    teacher_identity(cfg, n_tokens) -> dict     plan: open and check the teacher cache (None: none)
    sample_kwargs(cfg, teacher, n) -> dict       plan: extra build_samples arguments (teacher lookup)
    dataset_kwargs(cfg, plan) -> dict           recipe: extra TrainDataset arguments
    prepare(model, cfg, train_projector)        recipe: the PeftModel with the method's modules
    compute_losses(model, batch, cfg) -> dict   recipe: one forward, every term of ``log_names``

Extra files saved with the adapter are registered by ``prepare`` with
:func:`student_train.model.add_saver`, so checkpoints and the final save write them alike.
"""

from __future__ import annotations

from typing import Any


class TrainingMethod:
    """Base class; the defaults are those of a method without a teacher."""

    name: str = ""
    #: The loss terms of ``compute_losses`` (logged, averaged and checked for finiteness in this order).
    log_names: tuple[str, ...] = ("loss", "lm_loss")
    #: What the console says when the run has no teacher (teacher.json's ``reason``).
    no_teacher_reason: str = "no teacher signals"

    def check_model(self, cfg, llava_config) -> None:
        return None

    def teacher_identity(self, cfg, n_tokens: int) -> dict | None:
        return None

    def sample_kwargs(self, cfg, teacher: dict | None, n_tokens: int) -> dict[str, Any]:
        return {}

    def dataset_kwargs(self, cfg, plan) -> dict[str, Any]:
        return {}

    def prepare(self, model, cfg, train_projector: bool):
        raise NotImplementedError

    def compute_losses(self, model, batch: dict, cfg) -> dict:
        raise NotImplementedError
