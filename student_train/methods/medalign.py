"""``--method medalign``: MedAlign's ``L = L_LM + alpha L_vis + beta L_att`` (today's behaviour,
unchanged: :func:`student_train.model.prepare_student` and :func:`student_train.model.compute_losses`)."""

from __future__ import annotations

from student_train.methods.base import TrainingMethod


class MedAlign(TrainingMethod):
    name = "medalign"
    log_names = ("loss", "lm_loss", "vis_loss", "att_loss")
    no_teacher_reason = "alpha = beta = 0: plain LoRA fine-tuning, no teacher signals"

    def check_model(self, cfg, llava_config) -> None:
        from student_train.alignment import check_layer
        from student_train.model import num_layers

        check_layer(cfg.align.align_layer, num_layers(llava_config))

    def teacher_identity(self, cfg, n_tokens: int) -> dict | None:
        """The cache's identity after checking its grid against the student's; None without distillation."""
        if not cfg.align.distill:
            return None
        from shared.cache import open_cache
        from shared.cache.check import require_structure
        from shared.errors import MedAlignError

        require_structure(cfg.align.cache)  # cheap: no chunk is read; before anything big is loaded
        reader = open_cache(cfg.align.cache)
        m = reader.manifest
        if m.num_tokens != n_tokens:
            raise MedAlignError(
                f"the cache {cfg.align.cache} holds teacher signals on a {m.grid}x{m.grid} grid "
                f"(N = {m.num_tokens}, expert {m.expert}) but the student {cfg.model.model} has "
                f"{n_tokens} image tokens per image; build the cache with --grid matching the student")
        return reader.identity()

    def sample_kwargs(self, cfg, teacher, n_tokens: int):
        return {"cache_path": cfg.align.cache if teacher else None}

    def dataset_kwargs(self, cfg, plan):
        return {"cache_path": cfg.align.cache if plan.teacher else None}

    def prepare(self, model, cfg, train_projector: bool):
        from student_train.model import prepare_student

        return prepare_student(model, cfg.lora, cfg.align, train_projector=train_projector)

    def compute_losses(self, model, batch: dict, cfg) -> dict:
        from student_train.model import compute_losses

        return compute_losses(model, batch, cfg.align)


MEDALIGN = MedAlign()
