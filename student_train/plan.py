"""Validation before training: :func:`plan_run` checks the model directory, the method's settings
(student_train/methods/: the MedAlign layer, A3Tune's head count), cache, data and
RUN_DIR (and whether a ``--resume`` may continue it) before the model is loaded or RUN_DIR created.

The result, a :class:`Plan`, is everything the recipe needs that is cheap to load: the LLaVA config,
tokenizer, image processor, template, the validated sample list and the teacher identity.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import MedAlignError
from student_train.checkpoint import find_checkpoint
from student_train.config import RESUMABLE_CHANGES, TrainConfig
from student_train.data import DataStats, Sample, build_samples
from student_train.inputs import load_image_processor
from student_train.templates import PromptTemplate, template_for_model


@dataclass
class Plan:
    """Everything validated before the model is loaded or RUN_DIR is touched."""

    cfg: TrainConfig
    llava_config: Any
    tokenizer: Any
    image_processor: Any
    template: PromptTemplate
    image_token_id: int
    num_image_tokens: int
    pad_id: int
    samples: list[Sample]
    stats: DataStats
    teacher: dict | None
    """The cache identity, None for plain LoRA fine-tuning."""
    resume_from: Path | None


def _check_resumable(cfg: TrainConfig, run_dir: Path) -> None:
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        raise MedAlignError(f"{run_dir} has checkpoints but no config.json; cannot check what it was trained with")
    saved = _saved_settings(saved_path)
    now = cfg.flat()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise MedAlignError(f"--resume with different settings than {run_dir} was trained with ({diffs}); "
                            "use the same settings or a new --out")


def _saved_settings(saved_path: Path) -> dict:
    """The flat settings of a saved config.json; groups a run saved before they existed read as
    their defaults (an older MedAlign run resumes as --method medalign)."""
    from dataclasses import fields

    from student_train.config import GROUPS

    saved = {k: v for group in json.loads(saved_path.read_text()).values() for k, v in group.items()}
    for cls in GROUPS.values():
        for f in fields(cls):
            if f.name not in saved and f.default is not dataclasses.MISSING:
                saved[f.name] = f.default
    return saved


def plan_run(cfg: TrainConfig, world_size: int = 1) -> Plan:
    """Validate the batch arithmetic for ``world_size`` processes, the model directory, layer, cache,
    data and RUN_DIR, in that order; load nothing big. ``Plan.cfg`` has ``grad_accum`` resolved."""
    from transformers import AutoTokenizer

    from student_train.methods import get_method
    from student_train.model import num_image_tokens, read_llava_config

    cfg = cfg.for_world(world_size)
    method = get_method(cfg.method.method)
    llava_config = read_llava_config(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code, what="--model")
    method.check_model(cfg, llava_config)
    n_tokens = num_image_tokens(llava_config)
    image_token_id = int(llava_config.image_token_id)
    teacher = method.teacher_identity(cfg, n_tokens)

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise MedAlignError(f"cannot load the tokenizer of {cfg.model.model}: {e}") from None
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
                   if t is not None), None)
    if pad_id is None:
        raise MedAlignError(f"the tokenizer of {cfg.model.model} has no pad, unk or eos token to pad with")
    template = template_for_model(cfg.model.model, cfg.data.template)
    image_processor = load_image_processor(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)

    samples, stats = build_samples(
        cfg.data.data, cfg.data.image_root, tokenizer, template,
        image_token_id=image_token_id, num_image_tokens=n_tokens, max_length=cfg.data.max_length,
        allow_missing=cfg.data.allow_missing, **method.sample_kwargs(cfg, teacher, n_tokens))

    out = cfg.out
    resume_from = None
    if out.exists() and not out.is_dir():
        raise MedAlignError(f"--out {out} exists and is not a directory")
    if cfg.run.resume:
        resume_from = find_checkpoint(out)
        if resume_from is not None:
            _check_resumable(cfg, out)
    elif out.is_dir() and any(out.iterdir()):
        raise MedAlignError(f"--out {out} already exists and is not empty; pass --resume to continue "
                            "that run, or choose a new directory")
    return Plan(cfg, llava_config, tokenizer, image_processor, template, image_token_id, n_tokens, pad_id,
                samples, stats, teacher, resume_from)
