"""The expert registry: what each expert is (:class:`ExpertSpec`) and the table of known ones.

Adding an expert whose weights come in a known form (a UniMed-style ``.pt`` checkpoint or an
open_clip directory) and whose tower is a ViT open_clip can build is one entry in :data:`EXPERTS`.
A new on-disk form also needs a reader in :mod:`teacher_cache.experts.checkpoint` (its
``READERS``), a new tower family a ``_Tower`` in :mod:`teacher_cache.experts.towers`.

Nothing here imports torch, so the registry can be read cheaply (for the CLI's checks and help).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import MedAlignError
from shared.grid import DEFAULT_RESAMPLE_ORDER

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

TOKEN_MODES = ("raw", "norm", "proj")
#: The on-disk forms of expert weights; each has a reader in ``checkpoint.READERS``.
WEIGHT_FORMATS = ("unimed-pt", "open-clip-dir")


@dataclass(frozen=True)
class ExpertSpec:
    """One expert image encoder.

    The registry's specs describe the published models; :attr:`Expert.spec` is the spec as
    actually loaded (for ``open-clip-dir`` experts size and mean/std come from the directory).
    """

    name: str
    """Registry id, recorded in the cache manifest (``unimed-l``)."""
    arch: str | None
    """open_clip model-config name of the architecture; None: read from the weights directory."""
    image_size: int
    """Square input side S in pixels."""
    grid: int
    """Patch grid side g (M = g*g patch tokens)."""
    mean: tuple[float, float, float]
    """Per-channel normalisation mean (0..1 scale)."""
    std: tuple[float, float, float]
    """Per-channel normalisation std."""
    token_mode: str
    """Which patch tokens are E_v: 'raw' (before the final norm), 'norm' or 'proj'."""
    weight_format: str
    """'unimed-pt' (a training checkpoint file) or 'open-clip-dir' (config + weights directory)."""
    quick_gelu: bool = False
    """QuickGELU MLP activations (OpenAI/UniMed ViTs). Ignored by timm trunks."""
    resample_order: str = DEFAULT_RESAMPLE_ORDER
    """The default feature resampling order when g != G: the reference notebook's for this expert
    (``norm-resample-norm``: UniMed-B; ``resample-norm``: BiomedCLIP)."""

    def __post_init__(self):
        if self.token_mode not in TOKEN_MODES:
            raise MedAlignError(f"expert {self.name}: unknown token mode {self.token_mode!r}; choose from {TOKEN_MODES}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise MedAlignError(
                f"expert {self.name}: unknown weight format {self.weight_format!r}; choose from {WEIGHT_FORMATS}")
        if self.grid <= 0 or self.image_size <= 0 or self.image_size % self.grid:
            raise MedAlignError(f"expert {self.name}: image size {self.image_size} is not a multiple of grid {self.grid}")

    @property
    def num_patches(self) -> int:
        """M = g*g."""
        return self.grid * self.grid


EXPERTS: dict[str, ExpertSpec] = {
    # UniMed-CLIP ViT-L/14 @336 (24x24 = 576 patches); the paper's default expert
    "unimed-l": ExpertSpec(
        name="unimed-l", arch="ViT-L-14-336-quickgelu", image_size=336, grid=24,
        mean=OPENAI_MEAN, std=OPENAI_STD, token_mode="raw", weight_format="unimed-pt", quick_gelu=True),
    # UniMed-CLIP ViT-B/16 @224 (14x14 = 196 patches)
    "unimed-b": ExpertSpec(
        name="unimed-b", arch="ViT-B-16-quickgelu", image_size=224, grid=14,
        mean=OPENAI_MEAN, std=OPENAI_STD, token_mode="raw", weight_format="unimed-pt", quick_gelu=True),
    # BiomedCLIP (timm ViT-B/16 @224 trunk, 14x14 = 196 patches, 512-d projected tokens); weights: the
    # open_clip directory (open_clip_config.json + open_clip_pytorch_model.bin)
    "biomedclip": ExpertSpec(
        name="biomedclip", arch=None, image_size=224, grid=14,
        mean=OPENAI_MEAN, std=OPENAI_STD, token_mode="proj", weight_format="open-clip-dir", quick_gelu=False,
        resample_order="resample-norm"),  # Distill_data_biomed/Similarity_matrix.ipynb resamples raw tokens
}

def list_experts() -> list[str]:
    """The registered expert ids, the paper's default (unimed-l) first."""
    return list(EXPERTS)


def get_expert(name: str) -> ExpertSpec:
    """The registry entry for ``name``; an unknown name raises :class:`MedAlignError` listing the valid ones."""
    try:
        return EXPERTS[name]
    except (KeyError, TypeError):
        raise MedAlignError(f"unknown expert {name!r}; valid experts: {', '.join(list_experts())}") from None


__all__ = ["EXPERTS", "ExpertSpec", "OPENAI_MEAN", "OPENAI_STD", "TOKEN_MODES", "WEIGHT_FORMATS",
           "get_expert", "list_experts"]
