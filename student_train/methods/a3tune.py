"""``--method a3tune``: A3Tune's ``L = L_LM + lambda L_att (+ balance L_balance with A3MoE)``.

* Prepare: LoRA on the language model's linear layers (without ``q_proj`` / ``k_proj`` under
  ``--a3-moe``, where :mod:`student_train.a3moe` installs its experts), the per-head attention
  capture in every layer (:mod:`student_train.head_attention`) when lambda > 0.
* Loss step: the rows are every real token after the image (question + teacher-forced answer);
  each layer gives every head's visual ratio (detached) and its image-restricted maps; the top
  ``--a3-top-heads`` heads of all layers are selected per sample, their maps averaged per row, and
  ``--a3-loss`` squared | kl against each weak mask, summed over the masks
  (:mod:`student_train.a3_losses`). A batch without masks skips the capture (L_att = 0).
* Logged terms: ``loss``, ``lm_loss``, ``a3_att_loss``, ``balance_loss``.
* Saved with the adapter: A3MoE's ``moe.safetensors`` + ``moe.json`` (``a3moe.save_moe``).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from shared.errors import MedAlignError
from student_train.methods.base import TrainingMethod


def moe_settings(a3):
    """The ``MoeSettings`` of ``--a3-moe-preset`` with ``--a3-reference-moe``."""
    from student_train.a3moe import MOE_PRESETS

    return dataclasses.replace(MOE_PRESETS[a3.a3_moe_preset], reference_sparse=bool(a3.a3_reference_moe))


class A3Tune(TrainingMethod):
    name = "a3tune"
    log_names = ("loss", "lm_loss", "a3_att_loss", "balance_loss")
    no_teacher_reason = "--a3-lambda 0: no attention loss, no teacher signals"

    def check_model(self, cfg, llava_config) -> None:
        text = llava_config.text_config
        total = int(text.num_hidden_layers) * int(text.num_attention_heads)
        if cfg.a3.a3_top_heads > total:
            raise MedAlignError(f"--a3-top-heads {cfg.a3.a3_top_heads} is more than the student's "
                                f"{text.num_hidden_layers} layers x {text.num_attention_heads} heads = {total}")

    def teacher_identity(self, cfg, n_tokens: int) -> dict | None:
        if cfg.a3.a3_lambda <= 0:
            return None
        from student_train.methods.a3tune_data import open_checked

        cache = open_checked(cfg.align.cache, n_tokens)
        try:
            return {"method": "a3tune", "path": str(cfg.align.cache), **cache.identity()}
        finally:
            cache.close()

    def sample_kwargs(self, cfg, teacher, n_tokens: int):
        if not teacher:
            return {}
        from student_train.methods.a3tune_data import A3Lookup

        return {"lookup": A3Lookup(cfg.align.cache, n_tokens)}

    def dataset_kwargs(self, cfg, plan):
        if not plan.teacher:
            return {}
        from student_train.methods.a3tune_data import A3Teacher

        return {"teacher": A3Teacher(cfg.align.cache, plan.num_image_tokens)}

    def prepare(self, model, cfg, train_projector: bool):
        from student_train.head_attention import install_head_capture
        from student_train.model import add_saver, freeze_projector, prepare_lora

        a3 = cfg.a3
        exclude = ("q_proj", "k_proj") if a3.a3_moe else ()
        peft_model = prepare_lora(model, cfg.lora, train_projector, exclude)
        if a3.a3_moe:
            from student_train import a3moe

            a3moe.install_moe(peft_model, moe_settings(a3))
            add_saver(peft_model, a3moe.save_moe)
        if a3.a3_lambda > 0:
            install_head_capture(peft_model)
        freeze_projector(peft_model, train_projector)
        return peft_model

    def compute_losses(self, model, batch: dict, cfg) -> dict:
        return compute_a3_losses(model, batch, cfg.a3)


def compute_a3_losses(model, batch: dict, a3) -> dict[str, torch.Tensor]:
    """One forward and A3Tune's objective.

    Args:
        model: the prepared student (PeftModel, possibly inside DDP).
        batch: the collate output (``input_ids`` / ``attention_mask`` / ``labels`` / ``query_mask``
            [B, T], ``pixel_values``) plus ``a3_labels`` [B, K, N] and ``a3_label_mask`` [B, K].
        a3: the :class:`~student_train.config.A3Args`.
    Returns:
        ``loss``, ``lm_loss``, ``a3_att_loss``, ``balance_loss`` (0-dim, with their graphs).
    """
    from student_train import a3moe as moe
    from student_train.a3_losses import a3_att_loss, combine_maps, select_heads
    from student_train.alignment import decoder_layers, unwrap
    from student_train.head_attention import get_head_capture, rows_after_image

    base = unwrap(model)
    state = get_head_capture(model)
    label_mask = batch.get("a3_label_mask")
    need_att = a3.a3_lambda > 0 and label_mask is not None and bool(label_mask.any())
    if need_att and state is None:
        raise RuntimeError("--a3-lambda > 0 but the head capture is not installed (prepare with the a3tune method)")
    image_mask = batch["input_ids"] == int(base.config.image_token_id)
    if state is not None:
        state.clear_outputs()
        state.rows = rows_after_image(batch["input_ids"], batch["attention_mask"], base.config.image_token_id) \
            if need_att else None
        state.visual_mask = image_mask if need_att else None
    has_moe = moe.get_moe(model) is not None
    ctx = (moe.moe_inputs(model, question_mask=batch["query_mask"].to(torch.bool), image_mask=image_mask)
           if has_moe else contextlib.nullcontext())
    with ctx:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"], use_cache=False)
        balance = moe.balance_loss(model).float() if has_moe else None
    lm = out.loss.float()
    zero = torch.zeros((), dtype=torch.float32, device=lm.device)
    att = zero
    if need_att:
        layers = len(decoder_layers(base))
        selected = select_heads(state.stacked_ratios(layers), a3.a3_top_heads)
        maps = combine_maps([state.maps[i] for i in range(layers)], selected)
        att = a3_att_loss(maps, state.row_valid, batch["a3_labels"], label_mask, a3.a3_loss)
    balance = zero if balance is None else balance
    loss = lm + a3.a3_lambda * att + a3.a3_balance * balance
    return {"loss": loss, "lm_loss": lm, "a3_att_loss": att, "balance_loss": balance}


A3TUNE = A3Tune()
