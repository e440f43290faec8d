"""The settings of ``medalign-eval generate``: how answers are decoded and the run around it.

Torch-free, so the CLI builds its options from these dataclasses (``shared.cli.dataclass_options``:
field docstrings are the help) without importing a model stack. ``auto`` values resolve per student
family (:mod:`student_train.families`) with :meth:`GenerateConfig.resolved`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shared.errors import MedAlignError
from shared.runtime import DTYPE_NAMES, check_device_flag, check_dtype_name
from student_train.families import StudentFamily

DECODINGS = ("beam", "greedy", "nucleus")
CLOSED_SUFFIX_MODES = ("auto", "always", "never")
#: ``--dtype auto`` / ``--max-new-tokens auto`` resolve per student family.
AUTO = "auto"
REQUIRED = {"required": True}


@dataclass
class DecodingConfig:
    """How answers are decoded (``model.generate`` settings)."""

    mode: str = field(default="beam", metadata={"flag": "decoding", "choices": DECODINGS})
    """beam (default, as the paper and the reference: num_beams, no sampling) | greedy (do_sample False,
    1 beam; the reference's scripts report it too) | nucleus (sampling with top_p, temperature)."""
    num_beams: int = 5
    """Beams for --decoding beam."""
    top_p: float = 0.9
    """Nucleus mass for --decoding nucleus."""
    temperature: float = 1.0
    """Softmax temperature for --decoding nucleus."""
    max_new_tokens: str | int = AUTO
    """Longest answer in tokens; ``auto``: the student family's (LLaVA-Med 1024, HuatuoGPT 128)."""
    seed: int = 0
    """Sampling seed; each question draws from its own stream, seeded by this and its id."""

    def __post_init__(self):
        if self.mode not in DECODINGS:
            raise MedAlignError(f"unknown --decoding {self.mode!r}; valid: {', '.join(DECODINGS)}")
        if int(self.num_beams) < 1:
            raise MedAlignError(f"--num-beams must be >= 1, got {self.num_beams}")
        if not 0 < float(self.top_p) <= 1:
            raise MedAlignError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not float(self.temperature) > 0:
            raise MedAlignError(f"--temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens != AUTO:
            try:
                self.max_new_tokens = int(self.max_new_tokens)
            except (TypeError, ValueError):
                raise MedAlignError(f"--max-new-tokens must be an integer or auto, got {self.max_new_tokens!r}") from None
            if self.max_new_tokens < 1:
                raise MedAlignError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")

    def resolved(self, family: StudentFamily) -> "DecodingConfig":
        """A copy with ``max_new_tokens: auto`` replaced by the family's value."""
        if self.max_new_tokens != AUTO:
            return self
        return dataclasses.replace(self, max_new_tokens=family.max_new_tokens)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (only those the mode uses)."""
        if self.max_new_tokens == AUTO:
            raise MedAlignError("max_new_tokens 'auto' must be resolved for the student first (DecodingConfig.resolved)")
        kw: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens)}
        if self.mode == "greedy":
            kw.update(do_sample=False, num_beams=1)
        elif self.mode == "beam":
            # no early_stopping, as the reference passes none: the model's generation config decides
            # (transformers' default False: stop when no running beam can beat the finished ones)
            kw.update(do_sample=False, num_beams=int(self.num_beams))
        else:  # nucleus: drawn per question by evaluation.generate.PerQuestionSampler, which
            # leaves one finite score per row, so generate's own step is greedy
            kw.update(do_sample=False, num_beams=1)
        return kw

    @property
    def samples(self) -> bool:
        """Whether answers are sampled (then seeded per question)."""
        return self.mode == "nucleus"

    def to_json(self) -> dict[str, Any]:
        """The settings that matter for the mode (written into every line's metadata)."""
        d: dict[str, Any] = {"decoding": self.mode, "max_new_tokens": self.max_new_tokens}
        if self.mode == "beam":
            d["num_beams"] = int(self.num_beams)
        if self.mode == "nucleus":
            d.update(top_p=float(self.top_p), temperature=float(self.temperature), seed=int(self.seed))
        return d


@dataclass
class GenerateConfig:
    """One ``medalign-eval generate`` run."""

    model: str = field(default="", metadata=REQUIRED)
    """HF-format LLaVA student directory (the base model)."""
    data: str = field(default="", metadata=REQUIRED)
    """LLaVA-style JSON list of test records (id, image, conversations, answer_type)."""
    image_root: str = field(default="", metadata=REQUIRED)
    """Directory the records' image paths are relative to."""
    out: str = field(default="", metadata=REQUIRED)
    """Answer file (JSONL). An existing file is resumed: ids already in it are skipped."""
    adapter: str | None = None
    """Training run directory (PEFT adapter + rotation W + config.json + teacher.json)."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig, metadata={"cli": False})
    """Decoding settings (their own options)."""
    batch_size: int = 8
    """Questions per ``generate`` call."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:K."""
    dtype: str = field(default=AUTO, metadata={"choices": (AUTO, *DTYPE_NAMES)})
    """auto (the reference's: on CUDA float16 for LLaVA-Med, bfloat16 for HuatuoGPT; float32 on CPU) |
    float32 | bfloat16 | float16."""
    template: str | None = None
    """Prompt template name when neither the run nor the model records one."""
    limit: int | None = None
    """Only the first K questions of the data file."""
    closed_suffix: str = field(default="auto", metadata={"choices": CLOSED_SUFFIX_MODES})
    """auto: append ' Please choose from the following two options: [yes, no]' to CLOSED questions
    that lack it, as LLaVA-Med's test files carry it; always; never."""
    overwrite: bool = False
    """Start a fresh output file instead of resuming."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model directory."""

    def __post_init__(self):
        for name in ("model", "data", "image_root", "out"):
            if not getattr(self, name):
                raise MedAlignError(f"--{name.replace('_', '-')} is required")
        if int(self.batch_size) < 1:
            raise MedAlignError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and int(self.limit) < 1:
            raise MedAlignError(f"--limit must be >= 1, got {self.limit}")
        check_dtype_name(self.dtype, extra=(AUTO,))
        if self.closed_suffix not in CLOSED_SUFFIX_MODES:
            raise MedAlignError(f"unknown --closed-suffix {self.closed_suffix!r}; valid: {', '.join(CLOSED_SUFFIX_MODES)}")
        check_device_flag(self.device)

    def resolved(self, family: StudentFamily, device: Any) -> "GenerateConfig":
        """A copy with every ``auto`` replaced: the family's ``max_new_tokens``, and its half precision
        on CUDA (float32 on CPU, where half precision is slow and not what anyone evaluates with).
        ``device`` is the resolved ``torch.device``."""
        dtype = self.dtype
        if dtype == AUTO:
            dtype = family.cuda_dtype if device.type == "cuda" else "float32"
        return dataclasses.replace(self, dtype=dtype, decoding=self.decoding.resolved(family))
