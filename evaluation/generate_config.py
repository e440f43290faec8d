"""The settings of ``medalign-eval generate``: how answers are decoded and the run around it.

Torch-free at import, so the CLI builds its options from these dataclasses (``shared.cli.dataclass_options``:
field docstrings are the help) without importing a model stack; the decoding methods (their names,
keys and defaults: :mod:`evaluation.decoding`) are read when a config is made or the choices listed. ``auto`` values resolve per student
family (:mod:`student_train.families`) with :meth:`GenerateConfig.resolved`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

from shared.errors import MedAlignError
from shared.runtime import DTYPE_NAMES, check_device_flag, check_dtype_name
from student_train.families import StudentFamily

CLOSED_SUFFIX_MODES = ("auto", "always", "never")
#: ``--dtype auto`` / ``--max-new-tokens auto`` resolve per student family.
AUTO = "auto"
REQUIRED = {"required": True}


class MethodChoices(Sequence):
    """The registered decoding methods (:func:`evaluation.decoding.names`), read when first needed:
    the choice list of ``--decoding`` without importing the model stack at import time."""

    def _names(self) -> tuple[str, ...]:
        from evaluation.decoding import names

        return names()

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())


@dataclass
class DecodingConfig:
    """How answers are decoded: a method of :mod:`evaluation.decoding` and its arguments."""

    mode: str = field(default="beam", metadata={"flag": "decoding", "choices": MethodChoices()})
    """The decoding method (beam: the paper's and the reference's default, 5 beams); see
    --help-decoding NAME for a method's keys and defaults."""
    args: tuple[str, ...] | dict = field(default=(), metadata={"flag": "decoding_arg", "multiple": True,
                                                                "metavar": "KEY=VALUE"})
    """A key of the method (repeatable), e.g. --decoding-arg alpha=1 --decoding-arg sample=false."""
    max_new_tokens: str | int = AUTO
    """Longest answer in tokens; ``auto``: the method's MedAlign value for the student family (beam,
    greedy: LLaVA-Med 1024, HuatuoGPT 128; --help-decoding NAME shows a method's)."""
    seed: int = 0
    """Sampling seed; each question draws from its own stream, seeded by this and its id."""
    params: dict | None = field(default=None, metadata={"cli": False})
    """Every key of the method, resolved for the student (:meth:`resolved`); None before."""

    def __post_init__(self):
        from evaluation.decoding import get

        method = get(self.mode)  # unknown method: the error lists the valid ones
        self.args = method.parse(self.args)  # unknown key or bad value: the error lists the valid keys
        if self.max_new_tokens != AUTO:
            try:
                self.max_new_tokens = int(self.max_new_tokens)
            except (TypeError, ValueError):
                raise MedAlignError(f"--max-new-tokens must be an integer or auto, got {self.max_new_tokens!r}") from None
            if self.max_new_tokens < 1:
                raise MedAlignError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def method(self):
        """The registered :class:`~evaluation.decoding.base.Method`."""
        from evaluation.decoding import get

        return get(self.mode)

    def resolved(self, family: StudentFamily) -> "DecodingConfig":
        """A copy with every key of the method resolved for ``family`` (its defaults, then the given
        values, checked) and ``max_new_tokens: auto`` replaced by the method's value for the family."""
        n = self.max_new_tokens if self.max_new_tokens != AUTO else self.method.max_new_tokens(family)
        params = self.params if self.params is not None else self.method.resolve(family, dict(self.args))
        return dataclasses.replace(self, max_new_tokens=n, params=params)

    def _require_resolved(self) -> dict[str, Any]:
        if self.max_new_tokens == AUTO or self.params is None:
            raise MedAlignError("the decoding settings must be resolved for the student first (DecodingConfig.resolved)")
        return self.params

    def generate_kwargs(self) -> dict[str, Any]:
        """``model.generate`` keywords of a plain method (greedy, beam, nucleus)."""
        params = self._require_resolved()
        kwargs = getattr(self.method, "generate_kwargs", None)
        if kwargs is None:
            raise MedAlignError(f"--decoding {self.mode} does not decode through model.generate")
        return {"max_new_tokens": int(self.max_new_tokens), **kwargs(params)}

    @property
    def samples(self) -> bool:
        """Whether the answers depend on --seed (sampled, or a method's noise; then seeded per question)."""
        return self.method.uses_seed(self._require_resolved())

    def to_json(self) -> dict[str, Any]:
        """The settings that decide the answers (written into every line's metadata)."""
        d: dict[str, Any] = {"decoding": self.mode, "decoding_args": dict(self._require_resolved()),
                             "max_new_tokens": self.max_new_tokens}
        if self.samples:
            d["seed"] = int(self.seed)
        return d

    def describe(self) -> str:
        """``beam (num_beams=5, sample=false)`` for the log."""
        args = ", ".join(f"{k}={'none' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in self._require_resolved().items())
        return f"{self.mode} ({args})" if args else self.mode


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
    num_chunks: int = 1
    """Split the questions into N contiguous chunks (whole batches) and answer only --chunk-idx's, into
    --out (for schedulers without torchrun; join the chunks with medalign-eval merge)."""
    chunk_idx: int = 0
    """Which chunk (0 .. N-1) of --num-chunks this run answers."""

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
        if int(self.num_chunks) < 1:
            raise MedAlignError(f"--num-chunks must be >= 1, got {self.num_chunks}")
        if not 0 <= int(self.chunk_idx) < int(self.num_chunks):
            raise MedAlignError(f"--chunk-idx must be in 0..{int(self.num_chunks) - 1} (--num-chunks "
                                f"{self.num_chunks}), got {self.chunk_idx}")

    def resolved(self, family: StudentFamily, device: Any) -> "GenerateConfig":
        """A copy with every ``auto`` replaced: the family's ``max_new_tokens``, and its half precision
        on CUDA (float32 on CPU, where half precision is slow and not what anyone evaluates with).
        ``device`` is the resolved ``torch.device``."""
        dtype = self.dtype
        if dtype == AUTO:
            dtype = family.cuda_dtype if device.type == "cuda" else "float32"
        return dataclasses.replace(self, dtype=dtype, decoding=self.decoding.resolved(family))
