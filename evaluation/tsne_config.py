"""The settings of ``medalign-eval tsne`` (torch-free at import: the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.errors import MedAlignError
from shared.runtime import DTYPE_NAMES, check_device_flag, check_dtype_name

REQUIRED = {"required": True}


def parse_layers(text: str) -> tuple[int, ...]:
    """``"1,10,20,30"`` -> (1, 10, 20, 30): distinct non-negative integers, in the order given."""
    try:
        layers = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise MedAlignError(f"--layers must be comma-separated integers, got {text!r}") from None
    if not layers:
        raise MedAlignError("--layers is empty")
    if len(set(layers)) != len(layers) or min(layers) < 0:
        raise MedAlignError(f"--layers must be distinct integers >= 0, got {text!r}")
    return layers


@dataclass
class TsneConfig:
    """One ``medalign-eval tsne`` run."""

    model: str = field(default="", metadata=REQUIRED)
    """HF-format LLaVA student directory (the base model)."""
    data: str = field(default="", metadata=REQUIRED)
    """LLaVA-style JSON list of records; their images (in order, each once) are embedded."""
    image_root: str = field(default="", metadata=REQUIRED)
    """Directory the records' image paths are relative to."""
    regions: str = field(default="", metadata=REQUIRED)
    """Region masks: a folder holding regions.json, or the file (format: shared/regions.py;
    `medalign-data regions --from slake` converts SLAKE's masks). Images without a mask are skipped."""
    out: str = field(default="", metadata=REQUIRED)
    """Figure file (.png, .pdf, .svg); the separability scores go next to it (same stem, .json)."""
    adapter: str | None = None
    """Training run directory (adapter + W): W rotates the visual positions as in generation."""
    layers: str = "1,10,20,30"
    """Comma-separated hidden states to embed: L is the input of decoder layer L (0: the projected
    image tokens; L >= the run's align layer: after W), the model's output_hidden_states[L]."""
    max_images: int = 100
    """At most this many images (the first ones of --data that have a mask)."""
    max_tokens: int = 10000
    """At most this many labelled tokens in all (drawn evenly over the images, fixed seed); the
    padding's tokens are never used."""
    expert_cache: str | None = None
    """A MedAlign teacher cache: adds a panel of the expert from its S_e (the cache holds
    similarities, not features: t-SNE on 1 - S_e, one image) and its within-image silhouette."""
    perplexity: float = 30.0
    """t-SNE perplexity (clipped to (tokens - 1) / 3)."""
    seed: int = 0
    """random_state of the token sampling, the t-SNE and the probe's folds."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:K."""
    dtype: str = field(default="float32", metadata={"choices": DTYPE_NAMES})
    """Model dtype (the features are kept in float32)."""
    template: str | None = None
    """Prompt template name when neither the run nor the model records one."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model directory."""

    def __post_init__(self):
        for name in ("model", "data", "image_root", "regions", "out"):
            if not getattr(self, name):
                raise MedAlignError(f"--{name.replace('_', '-')} is required")
        self.layer_list = parse_layers(self.layers)
        if int(self.max_images) < 1:
            raise MedAlignError(f"--max-images must be >= 1, got {self.max_images}")
        if int(self.max_tokens) < 2:
            raise MedAlignError(f"--max-tokens must be >= 2, got {self.max_tokens}")
        if not float(self.perplexity) > 0:
            raise MedAlignError(f"--perplexity must be > 0, got {self.perplexity}")
        check_dtype_name(self.dtype)
        check_device_flag(self.device)
