"""Loading a LLaVA student, preparing it for MedAlign training, the loss step, saving and loading.

Public API (used by the training recipe and by evaluation):

* The settings are the typed groups of :mod:`student_train.config` (``LoraArgs``, ``AlignArgs``).
* :func:`read_llava_config` (is this a LLaVA student directory?); :func:`load_student` ->
  ``(model, tokenizer)``; :func:`num_image_tokens`; :func:`num_layers`.
* :func:`prepare_student`: LoRA on the language model's linear layers only, the projector trainable
  iff asked (saved with the adapter through PEFT's ``modules_to_save``), the rotation ``W`` and the
  attention capture installed (only what the loss weights need), everything else frozen.
* :func:`prepare_lora` / :func:`freeze_projector` / :func:`add_saver`: the pieces other training
  methods (student_train/methods/) prepare with.
* :func:`param_groups`, :func:`enable_gradient_checkpointing`.
* :func:`compute_losses` -> ``{"loss", "lm_loss", "vis_loss", "att_loss"}``.
* :func:`save_trained` / :func:`load_trained`: the PEFT adapter (standard format) plus
  ``rotation.safetensors`` (W, fp32) and ``rotation.json`` (layer, eps).

``alpha = beta = 0`` is plain LoRA fine-tuning: no W, no capture, pure SDPA, no teacher needed.
With ``alpha > 0`` or ``beta > 0`` the rotation is installed (it is part of the trained model);
the capture (a custom attention function) only when ``beta > 0``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from shared.errors import MedAlignError
from student_train import alignment
from student_train.alignment import get_handles, unwrap
from student_train.config import AlignArgs, LoraArgs
from student_train.losses import att_loss, vis_loss

ROTATION_WEIGHTS = "rotation.safetensors"
ROTATION_CONFIG = "rotation.json"
PROJECTOR = "multi_modal_projector"
#: The files a model / adapter directory holds its weights in (one of them must be there).
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


# --------------------------------------------------------------------------- loading


def read_llava_config(model_dir: str | Path, *, trust_remote_code: bool = False, what: str = "model directory"):
    """The ``LlavaConfig`` of ``model_dir``, or a :class:`MedAlignError` saying why it is not an
    HF-format LLaVA student directory (``what`` names it in the message, e.g. ``--model``)."""
    from transformers import AutoConfig, LlavaConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MedAlignError(f"{what} {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise MedAlignError(f"{what} {model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a config that cannot be read is a user-facing problem
        hint = "" if trust_remote_code else " (custom code needs --trust-remote-code)"
        raise MedAlignError(f"cannot read the model config in {model_dir}: {e}{hint}") from None
    if not isinstance(config, LlavaConfig):
        raise MedAlignError(
            f"{what} {model_dir} is not a LLaVA model (model_type {getattr(config, 'model_type', None)!r}); "
            "a student must be an HF-format LlavaForConditionalGeneration directory (model_type 'llava')")
    if not any((model_dir / name).is_file() for name in MODEL_WEIGHT_FILES):
        raise MedAlignError(f"{what} {model_dir} has a config.json but no weights (none of "
                            f"{', '.join(MODEL_WEIGHT_FILES)}); is the download or conversion complete?")
    return config


def check_adapter_dir(run_dir: Path) -> None:
    if not (run_dir / "adapter_config.json").is_file():
        raise MedAlignError(f"{run_dir} holds no PEFT adapter (adapter_config.json missing)")
    if not any((run_dir / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        raise MedAlignError(f"{run_dir} has adapter_config.json but no adapter weights "
                            f"(none of {', '.join(ADAPTER_WEIGHT_FILES)}); did the run finish?")


def load_student(
    model_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
):
    """Load an HF-format LLaVA student and its tokenizer.

    Returns:
        ``(LlavaForConditionalGeneration, tokenizer)``, the model on ``device`` in ``dtype``.
    Raises:
        MedAlignError: missing directory, no config, or not a LLaVA model.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model_dir = Path(model_dir)
    read_llava_config(model_dir, trust_remote_code=trust_remote_code)
    model = LlavaForConditionalGeneration.from_pretrained(
        model_dir,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    ).to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise MedAlignError(f"cannot load the tokenizer of {model_dir}: {e}") from e
    return model, tokenizer


def num_image_tokens(model_or_config) -> int:
    """N, the number of image tokens per image (24 x 24 = 576 for CLIP ViT-L/14 @336)."""
    config = unwrap(model_or_config).config if isinstance(model_or_config, nn.Module) else model_or_config
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        n += 1
    return n


def num_layers(model_or_config) -> int:
    """Number of decoder layers of the language model."""
    config = unwrap(model_or_config).config if isinstance(model_or_config, nn.Module) else model_or_config
    return int(config.text_config.num_hidden_layers)


# --------------------------------------------------------------------------- preparing


def language_linear_targets(model: nn.Module, exclude: tuple[str, ...] = ()) -> str:
    """A PEFT ``target_modules`` regex matching exactly the ``nn.Linear`` layers of the language
    model (``model.language_model.*``): not the vision tower, not the projector, not ``lm_head``,
    and none whose last name is in ``exclude`` (e.g. ``("q_proj", "k_proj")`` under A3MoE)."""
    base = unwrap(model)
    names = [
        name
        for name, mod in base.named_modules()
        if isinstance(mod, nn.Linear) and name.startswith("model.language_model.")
    ]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names} - set(exclude))
    if not suffixes:
        raise MedAlignError("the student's language model has no linear layers to put LoRA on")
    return r"^model\.language_model\..*\.(" + "|".join(re.escape(s) for s in suffixes) + r")$"


def prepare_student(model: nn.Module, lora: LoraArgs, align: AlignArgs, train_projector: bool):
    """Wrap ``model`` for training: returns a ``PeftModel``.

    LoRA on every linear layer of the language model; the projector trainable iff
    ``train_projector`` (then saved with the adapter via ``modules_to_save``); if ``align.distill``
    the rotation W (fp32 zeros, trainable) on ``layers[l-1]``, and if ``align.beta > 0`` the
    attention capture at ``layers[l]``. Everything else is frozen.
    """
    alignment.check_layer(align.align_layer, num_layers(model))
    peft_model = prepare_lora(model, lora, train_projector)
    if align.distill:
        alignment.install(peft_model, align.align_layer, align.eps, rotation=True, capture=align.beta > 0)
    freeze_projector(peft_model, train_projector)
    return peft_model


def prepare_lora(model: nn.Module, lora: LoraArgs, train_projector: bool, exclude: tuple[str, ...] = ()):
    """Freeze ``model`` and wrap it in a ``PeftModel``: LoRA on the language model's linear layers
    (minus ``exclude``), the projector in ``modules_to_save`` iff ``train_projector``."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=int(lora.lora_r),
        lora_alpha=lora.lora_alpha,
        lora_dropout=float(lora.lora_dropout),
        target_modules=language_linear_targets(model, exclude),
        modules_to_save=[PROJECTOR] if train_projector else None,
        bias="none",
    )
    return get_peft_model(model, config)


def freeze_projector(model: nn.Module, train_projector: bool) -> None:
    """Keep the projector frozen unless ``train_projector`` (call after installing extra modules)."""
    for name, p in model.named_parameters():
        if PROJECTOR in name and not train_projector:
            p.requires_grad_(False)


def add_saver(model: nn.Module, saver) -> None:
    """Register ``saver(model, run_dir)``: extra files :func:`save_trained` writes with the adapter
    (a training method's modules, e.g. A3MoE's experts)."""
    base = unwrap(model)
    savers = getattr(base, "_medalign_savers", None)
    if savers is None:
        savers = []
        object.__setattr__(base, "_medalign_savers", savers)
    savers.append(saver)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of the decoder layers (keeps L_att's gradient; docs/design.md 5)."""
    base = unwrap(model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def param_groups(model: nn.Module, lr: float, projector_lr: float) -> list[dict]:
    """Optimizer groups: LoRA + W at ``lr`` ("name": "lora"), projector at ``projector_lr``
    ("name": "projector"); only trainable parameters; empty groups dropped."""
    main, proj = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (proj if PROJECTOR in name else main).append(p)
    groups = [
        {"params": main, "lr": lr, "name": "lora"},
        {"params": proj, "lr": projector_lr, "name": "projector"},
    ]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------- the loss step


def compute_losses(
    model: nn.Module, batch: dict, align: AlignArgs
) -> dict[str, torch.Tensor]:
    """One forward pass and the MedAlign objective ``L = L_LM + alpha L_vis + beta L_att``.

    Args:
        model: the prepared student (PeftModel, possibly inside DDP: the forward goes through the
            wrapper).
        batch: S2's collate output: ``input_ids``/``attention_mask``/``labels`` [B,T],
            ``pixel_values`` [B,3,S,S], ``query_mask`` [B,T] bool, ``teacher_sim`` [B,N,N],
            ``teacher_attn`` [B,N], ``teacher_mask`` [B] (teacher keys optional when
            alpha = beta = 0).
    Returns:
        ``loss``, ``lm_loss``, ``vis_loss``, ``att_loss`` (0-dim; vis/att are zeros when their
        weight is 0 or no sample has a teacher entry, and their extra work is then skipped).
        Every term carries its graph (detach what you only log).

    The capture state set here stays until the next call, so a gradient-checkpointed backward
    recomputes exactly what the forward computed.
    """
    handles = get_handles(model)
    teacher_mask = batch.get("teacher_mask")
    any_teacher = teacher_mask is not None and bool(teacher_mask.any())
    need_vis = align.alpha > 0 and any_teacher
    need_att = align.beta > 0 and any_teacher
    if (need_vis or need_att) and handles is None:
        raise RuntimeError("alpha/beta > 0 but the MedAlign modules are not installed (use prepare_student)")
    if handles is not None:
        state = handles.state
        state.store_rotated = need_vis
        if need_att and not handles.capture:
            raise RuntimeError("beta > 0 but the attention capture was not installed (prepare with beta > 0)")
        state.query_mask = batch["query_mask"].to(torch.bool) if need_att else None
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        labels=batch["labels"],
        use_cache=False,
    )
    lm = out.loss.float()
    zero = torch.zeros((), dtype=torch.float32, device=lm.device)
    vis, att = zero, zero
    bsz = batch["input_ids"].shape[0]
    if need_vis:
        rotated = handles.state.rotated
        n = batch["teacher_sim"].shape[-1]
        if rotated is None or rotated.shape[0] != bsz * n:
            got = None if rotated is None else rotated.shape[0]
            raise MedAlignError(
                f"the teacher grid has N={n} tokens per image but the batch holds {got} visual rows "
                f"for {bsz} samples"
            )
        vis = vis_loss(rotated.view(bsz, n, -1), batch["teacher_sim"], teacher_mask)
    if need_att:
        state = handles.state
        if state.attn is None:
            raise RuntimeError("the attention capture did not run (is the capture layer reached?)")
        att = att_loss(
            state.attn,
            batch["teacher_attn"],
            teacher_mask,
            mode=align.att_norm,
            clamp=align.att_clamp,
            rows=state.attn_rows,
        )
    loss = lm + align.alpha * vis + align.beta * att
    return {"loss": loss, "lm_loss": lm, "vis_loss": vis, "att_loss": att}


# --------------------------------------------------------------------------- saving / loading


def _peft_model(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def save_trained(model: nn.Module, run_dir: str | Path) -> None:
    """Write the PEFT adapter (standard format) and, when installed, ``rotation.safetensors`` (W,
    fp32) with ``rotation.json`` ({"layer", "eps", "hidden_size"}) into ``run_dir``."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _peft_model(model).save_pretrained(run_dir)
    handles = get_handles(model)
    if handles is not None and handles.rotation is not None:
        w = handles.rotation.weight.detach().float().cpu().contiguous()
        save_file({"weight": w}, str(run_dir / ROTATION_WEIGHTS))
        meta = {"layer": handles.layer, "eps": handles.rotation.eps, "hidden_size": int(w.shape[0])}
        (run_dir / ROTATION_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    for saver in getattr(unwrap(model), "_medalign_savers", None) or ():
        saver(model, run_dir)


def load_rotation(run_dir: str | Path) -> tuple[torch.Tensor, dict] | None:
    """``(W [d, d] fp32, {"layer", "eps", ...})`` from ``run_dir``, or None when it has no W."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / ROTATION_WEIGHTS).is_file():
        return None
    if not (run_dir / ROTATION_CONFIG).is_file():
        raise MedAlignError(f"{run_dir} has {ROTATION_WEIGHTS} but no {ROTATION_CONFIG}")
    meta = json.loads((run_dir / ROTATION_CONFIG).read_text())
    return load_file(str(run_dir / ROTATION_WEIGHTS))["weight"], meta


def load_trained(
    model_dir: str | Path,
    run_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    merge: bool = True,
):
    """Base student + adapter (+ W when the run has one) for inference, in eval mode.

    The rotation is installed without the capture, so it acts on the prefill (the forward that
    holds the image tokens) and not on single-token decoding steps. With ``merge`` the LoRA
    weights are merged into the base weights (faster generation). A run with ``moe.json`` (A3Tune's
    A3MoE) gets its q_proj/k_proj experts installed and loaded after the adapter (whose LoRA
    excludes q/k): :func:`student_train.a3moe.load_moe`.
    """
    from peft import PeftModel

    run_dir = Path(run_dir)
    check_adapter_dir(run_dir)
    model, tokenizer = load_student(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, run_dir)
    if merge:
        model = model.merge_and_unload()
    from student_train.a3moe import load_moe
    load_moe(model, run_dir)  # A3Tune runs: the q/k experts (moe.json + moe.safetensors), else nothing
    rot = load_rotation(run_dir)
    if rot is not None:
        w, meta = rot
        alignment.install(model, int(meta["layer"]), float(meta["eps"]), rotation=True, capture=False, weight=w)
    model.eval()
    return model, tokenizer


__all__ = [
    "load_student",
    "num_image_tokens",
    "num_layers",
    "prepare_student",
    "param_groups",
    "enable_gradient_checkpointing",
    "compute_losses",
    "save_trained",
    "load_trained",
    "load_rotation",
    "check_adapter_dir",
    "language_linear_targets",
    "prepare_lora",
    "freeze_projector",
    "add_saver",
]
