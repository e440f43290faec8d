"""The resolved configuration of one training run: typed groups, validated on construction.

The command line and ``--config run.yaml`` are flat (``align_layer: 20``, ``lr: 2e-4``, ...; dashes
or underscores); :meth:`TrainConfig.from_flat` sorts the keys into the groups and
:meth:`TrainConfig.to_dict` writes the nested form saved as ``RUN_DIR/config.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.errors import MedAlignError
from shared.runtime import check_device_flag

#: How E_a and M_a are normalised before the KL (student_train/losses.py); the first is the default,
#: the reference code's (what the published runs used).
ATT_NORMS = ("l2", "sum", "softmax")
DEFAULT_ATT_NORM = ATT_NORMS[0]

#: Each method's default --lora-r: what its published runs used (MedAlign's VQA scripts 32, A3Tune's 64).
METHOD_LORA_R = {"medalign": 32, "a3tune": 64}
#: The training methods (student_train/methods/: one module each); the first is the default.
METHODS = ("medalign", "a3tune")
#: A3Tune's attention losses (student_train/a3_losses.py); the first is the default (the 1.5 VQA scripts').
A3_LOSSES = ("squared", "kl")
#: A3MoE presets (student_train/a3moe.py MOE_PRESETS): the VQA scripts' and the report scripts'.
A3_MOE_PRESETS = ("vqa", "report")

#: Micro-batches per optimizer step when neither --grad-accum nor --global-batch-size is given.
DEFAULT_GRAD_ACCUM = 8

#: Field metadata of the settings without a usable default (the CLI shows them as [required]).
REQUIRED = {"required": True}


def _check_finite(args) -> None:
    """Every float setting of a group is a finite number (inf and nan are refused, naming the flag)."""
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise MedAlignError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise MedAlignError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class DataArgs:
    """Where the training samples come from and how they are turned into tokens."""

    data: str = field(default="", metadata=REQUIRED)
    """LLaVA-style JSON list of training records."""
    image_root: str = field(default="", metadata=REQUIRED)
    """Directory the records' ``image`` paths are relative to."""
    template: str | None = None
    """Prompt template name; default: the model's ``medalign.json``, else by backbone."""
    max_length: int = 1024
    """Longest sample in tokens (image tokens expanded); longer samples are skipped and counted."""
    allow_missing: bool = False
    """Train samples whose image is not in the cache with the LM loss only (else: an error)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (each opens the cache itself)."""

    def __post_init__(self):
        if not self.data:
            raise MedAlignError("--data is required")
        if not self.image_root:
            raise MedAlignError("--image-root is required")
        _positive("--max-length", self.max_length)
        _positive("--num-workers", self.num_workers, allow_zero=True)


@dataclass
class ModelArgs:
    """The student, its LoRA adapter and how it runs."""

    model: str = field(default="", metadata=REQUIRED)
    """HF-format LLaVA student directory (``LlavaForConditionalGeneration``)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model directory (off unless asked for)."""
    bf16: bool = False
    """Load the frozen weights in bfloat16 and autocast to bfloat16 (trainable weights stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward (non-reentrant) to save activation memory."""

    def __post_init__(self):
        if not self.model:
            raise MedAlignError("--model is required")


@dataclass
class LoraArgs:
    """The LoRA adapter on every linear layer of the language model (reference: r 32 VQA / 64
    reports, alpha 16, dropout 0.05)."""

    lora_r: int | None = None
    """LoRA rank (default: the method's published runs: 32 for medalign, MedAlign's VQA scripts; 64 for
    a3tune, every A3Tune script)."""
    lora_alpha: float = 16
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""

    def __post_init__(self):
        _positive("--lora-r", self.lora_r)
        _positive("--lora-alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise MedAlignError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class AlignArgs:
    """The MedAlign distillation: teacher cache, layer and loss weights (docs/design.md section 1)."""

    cache: str | None = None
    """Teacher cache directory (``medalign-cache build``); not needed when alpha = beta = 0."""
    align_layer: int = 20
    """Decoder layer l: W rotates ``layers[l-1]``'s visual output, L_att reads ``layers[l]``."""
    alpha: float = 1.0
    """Weight of L_vis (0: MedAlign-att ablation)."""
    beta: float = 0.06
    """Weight of L_att (0: MedAlign-vis ablation; 0.03 for reports)."""
    eps: float = 1.0
    """Scale of the rotation: X~ = X + eps * X W^T."""
    att_norm: str = field(default=DEFAULT_ATT_NORM, metadata={"choices": ATT_NORMS})
    """How E_a and M_a are normalised: l2 (default; the reference code and the published runs),
    sum (a true KL; needs a much smaller beta), softmax (the paper's wording; near-uniform)."""
    att_clamp: float = 1e-8
    """Lower clamp against log 0 in L_att's KL."""

    def __post_init__(self):
        if isinstance(self.align_layer, bool) or not isinstance(self.align_layer, int):
            raise MedAlignError(f"--align-layer must be an integer, got {self.align_layer!r}")
        if self.align_layer < 1:
            raise MedAlignError(f"--align-layer must be >= 1 (W sits on layers[l-1]), got {self.align_layer}")
        _positive("--alpha", self.alpha, allow_zero=True)
        _positive("--beta", self.beta, allow_zero=True)
        _positive("--att-clamp", self.att_clamp)
        if self.att_norm not in ATT_NORMS:
            raise MedAlignError(f"unknown --att-norm {self.att_norm!r}; valid: {', '.join(ATT_NORMS)}")

    @property
    def distill(self) -> bool:
        """Whether any teacher signal is used (False: plain LoRA fine-tuning)."""
        return self.alpha > 0 or self.beta > 0


@dataclass
class MethodArgs:
    """Which training method runs (student_train/methods/)."""

    method: str = field(default=METHODS[0], metadata={"choices": METHODS})
    """medalign (L_vis + L_att from a MedAlign teacher cache) or a3tune (head-selective attention
    alignment to SAM + BiomedCLIP weak masks from an A3 cache, optionally with A3MoE)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise MedAlignError(f"unknown --method {self.method!r}; valid: {', '.join(METHODS)}")


@dataclass
class A3Args:
    """A3Tune (--method a3tune): head selection, the attention loss and A3MoE. The authors' 1.5
    scripts: lambda 0.09 VQA-RAD, 0.03 SLAKE, 0.02 PathVQA, 0.25 IU-Xray, 0.05 MIMIC."""

    a3_top_heads: int = 128
    """Heads of all layers selected per sample and step by their visual attention ratio."""
    a3_loss: str = field(default=A3_LOSSES[0], metadata={"choices": A3_LOSSES})
    """squared: mean over rows of (1 - mass on the mask / mass on the image)^2; kl: KL(mask || map),
    batchmean over the rows."""
    a3_lambda: float = 0.09
    """Weight of the attention loss (L = L_LM + lambda L_att)."""
    a3_moe: bool = True
    """A3MoE (on by default: every A3Tune training script sets --use_moe True): LoRA experts on q_proj / k_proj (LoRA then leaves q_proj / k_proj out)."""
    a3_moe_preset: str = field(default=A3_MOE_PRESETS[0], metadata={"choices": A3_MOE_PRESETS})
    """vqa: q 8 dense experts, k 16 experts top-1; report: q 1 expert, k 8 experts top-2."""
    a3_balance: float = 0.0
    """Weight of A3MoE's load-balancing loss (0 in the VQA scripts, 0.01 in the report scripts)."""
    a3_reference_moe: bool = False
    """The authors' sparse expert forward (no gate multiply; top-2 overwrites instead of summing)."""

    def __post_init__(self):
        if isinstance(self.a3_top_heads, bool) or not isinstance(self.a3_top_heads, int):
            raise MedAlignError(f"--a3-top-heads must be an integer, got {self.a3_top_heads!r}")
        _positive("--a3-top-heads", self.a3_top_heads)
        if self.a3_loss not in A3_LOSSES:
            raise MedAlignError(f"unknown --a3-loss {self.a3_loss!r}; valid: {', '.join(A3_LOSSES)}")
        if self.a3_moe_preset not in A3_MOE_PRESETS:
            raise MedAlignError(f"unknown --a3-moe-preset {self.a3_moe_preset!r}; "
                                f"valid: {', '.join(A3_MOE_PRESETS)}")
        _positive("--a3-lambda", self.a3_lambda, allow_zero=True)
        _positive("--a3-balance", self.a3_balance, allow_zero=True)
        if not self.a3_moe:
            for name in ("a3_balance", "a3_reference_moe"):
                if getattr(self, name):
                    raise MedAlignError(f"--{name.replace('_', '-')} needs --a3-moe")


@dataclass
class OptimArgs:
    """AdamW, cosine schedule with warmup, and how long to train."""

    lr: float = 2e-4
    """Learning rate of the LoRA weights and W."""
    projector_lr: float = 0.0
    """Learning rate of the multimodal projector; 0 (default) freezes it, as the reference does (its
    ``mm_projector_lr`` is never read) and the paper says; > 0 trains it and saves it with the adapter."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming up linearly."""
    epochs: float = 9
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Total optimizer steps (overrides epochs)."""
    batch_size: int = 1
    """Samples per device per micro-batch."""
    grad_accum: int | None = None
    """Micro-batches accumulated per optimizer step (default 8; with --global-batch-size: derived)."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all processes, instead of --grad-accum: grad-accum becomes
    N / (batch-size x processes), so the effective batch stays the same on any number of GPUs."""

    def __post_init__(self):
        _positive("--lr", self.lr)
        _positive("--projector-lr", self.projector_lr, allow_zero=True)
        _positive("--weight-decay", self.weight_decay, allow_zero=True)
        _positive("--max-grad-norm", self.max_grad_norm, allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise MedAlignError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        _positive("--epochs", self.epochs)
        _positive("--max-steps", self.max_steps)
        _positive("--batch-size", self.batch_size)
        _positive("--grad-accum", self.grad_accum)
        _positive("--global-batch-size", self.global_batch_size)
        if self.grad_accum is None and self.global_batch_size is None:
            self.grad_accum = DEFAULT_GRAD_ACCUM

    def for_world(self, world_size: int) -> "OptimArgs":
        """These settings with ``grad_accum`` derived from ``global_batch_size`` for ``world_size``
        processes (an error when it does not divide, or disagrees with an explicit --grad-accum)."""
        if self.global_batch_size is None:
            return self
        per_step = self.batch_size * world_size
        ga, rest = divmod(self.global_batch_size, per_step)
        if rest:
            raise MedAlignError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --batch-size "
                f"{self.batch_size} x {world_size} process(es) = {per_step}")
        if self.grad_accum is not None and self.grad_accum != ga:
            raise MedAlignError(
                f"--grad-accum {self.grad_accum} and --global-batch-size {self.global_batch_size} disagree: "
                f"{self.global_batch_size} / (--batch-size {self.batch_size} x {world_size} process(es)) = {ga}; "
                "give one of them")
        return dataclasses.replace(self, grad_accum=ga)


@dataclass
class RunArgs:
    """Output directory, seeding, logging, checkpointing and the device."""

    out: str = field(default="", metadata=REQUIRED)
    """RUN_DIR: adapter, W, config, teacher identity, logs and checkpoints."""
    seed: int = 0
    """Seed of the data order, LoRA init and dropout."""
    resume: bool = False
    """Continue from RUN_DIR's last checkpoint (starts fresh when there is none)."""
    log_every: int = 1
    """Optimizer steps between console log lines (TensorBoard gets every step)."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0: only at the end of each epoch and of the run)."""
    keep_checkpoints: int = 1
    """How many of the latest checkpoints to keep."""
    stop_after: int | None = None
    """Stop this invocation after this many optimizer steps (with a checkpoint; resume later)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, or cuda:K."""

    def __post_init__(self):
        if not self.out:
            raise MedAlignError("--out is required")
        _positive("--log-every", self.log_every)
        _positive("--save-every", self.save_every, allow_zero=True)
        _positive("--keep-checkpoints", self.keep_checkpoints)
        _positive("--stop-after", self.stop_after)
        check_device_flag(self.device)


GROUPS = {"data": DataArgs, "model": ModelArgs, "lora": LoraArgs, "align": AlignArgs, "optim": OptimArgs,
          "run": RunArgs, "method": MethodArgs, "a3": A3Args}

#: Keys that may differ between a run and its resumption (they do not change what is learned).
#: (``global_batch_size`` only says how ``grad_accum`` was chosen; the resolved value is compared.)
RESUMABLE_CHANGES = {"resume", "stop_after", "num_workers", "log_every", "save_every", "keep_checkpoints",
                     "device", "out", "global_batch_size"}


def flat_keys() -> dict[str, str]:
    """Every flat key -> its group name."""
    return {f.name: g for g, cls in GROUPS.items() for f in fields(cls)}


@dataclass
class TrainConfig:
    """The whole run: one field per group."""

    data: DataArgs
    model: ModelArgs
    lora: LoraArgs
    align: AlignArgs
    optim: OptimArgs
    run: RunArgs
    method: MethodArgs = field(default_factory=MethodArgs)
    a3: A3Args = field(default_factory=A3Args)

    def __post_init__(self):
        for group in GROUPS:
            _check_finite(getattr(self, group))
        if self.lora.lora_r is None:  # the method's default rank (the published runs')
            self.lora.lora_r = METHOD_LORA_R.get(self.method.method, METHOD_LORA_R["medalign"])
        if self.method.method == "a3tune":
            if self.a3.a3_lambda > 0 and not self.align.cache:
                raise MedAlignError(f"--method a3tune needs --cache (an A3 cache: medalign-cache build --signals "
                                    f"a3tune) when --a3-lambda ({self.a3.a3_lambda}) is > 0")
            return
        changed = [f.name for f in fields(A3Args) if getattr(self.a3, f.name) != f.default]
        if changed:
            raise MedAlignError(f"{', '.join('--' + n.replace('_', '-') for n in changed)} only appl"
                                f"{'ies' if len(changed) == 1 else 'y'} to --method a3tune "
                                f"(this run is --method {self.method.method})")
        if self.align.distill and not self.align.cache:
            raise MedAlignError(
                f"--cache is required when --alpha ({self.align.alpha}) or --beta ({self.align.beta}) is > 0; "
                "plain LoRA fine-tuning is --alpha 0 --beta 0")

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from flat keys (``align_layer`` or ``align-layer``); ``None`` values mean "default"."""
        where = flat_keys()
        groups: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
        unknown = []
        for key, value in values.items():
            k = key.replace("-", "_")
            if k not in where:
                unknown.append(key)
            elif value is not None:
                groups[where[k]][k] = value
        if unknown:
            raise MedAlignError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**{g: GROUPS[g](**kw) for g, kw in groups.items()})
        except TypeError as e:
            raise MedAlignError(f"bad setting: {e}") from None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {g: dataclasses.asdict(getattr(self, g)) for g in GROUPS}

    def flat(self) -> dict[str, Any]:
        return {k: v for g in GROUPS for k, v in dataclasses.asdict(getattr(self, g)).items()}

    def for_world(self, world_size: int) -> "TrainConfig":
        """The configuration as run by ``world_size`` processes (:meth:`OptimArgs.for_world`)."""
        return dataclasses.replace(self, optim=self.optim.for_world(world_size))

    @property
    def out(self) -> Path:
        return Path(self.run.out)


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """A ``run.yaml``: flat keys, or keys nested under the group names (data, model, align, optim, run).

    Returns flat keys with underscores; unknown keys are an error naming them.
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedAlignError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise MedAlignError(f"{path}{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise MedAlignError(f"{path}: expected a mapping of settings, got {type(doc).__name__}")
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        k = str(key).replace("-", "_")
        if k in GROUPS and isinstance(value, dict):
            flat.update({str(kk).replace("-", "_"): vv for kk, vv in value.items()})
        else:
            flat[k] = value
    known = flat_keys()
    unknown = sorted(k for k in flat if k not in known)
    if unknown:
        raise MedAlignError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    return flat
