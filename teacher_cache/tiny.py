"""Random-weight experts saved in the real on-disk formats, for tests and offline smoke runs.

The builders write exactly what the real downloads look like, so the real loading code runs:

- :func:`save_tiny_unimed` / :func:`save_random_unimed`: a UniMed-CLIP training checkpoint
  (``{"epoch", "name", "state_dict": {"module.visual.*", "module.text.*", "module.logit_scale"}}``).
  Real checkpoints carry no architecture, so tiny ones are loaded with the returned config:
  ``load_expert("unimed-b", path, model_cfg=save_tiny_unimed(path, "b"))``.
- :func:`save_tiny_biomedclip` / :func:`save_random_biomedclip`: an open_clip directory with
  ``open_clip_config.json`` (BiomedCLIP's layout, text tower config included but never built) and
  ``open_clip_pytorch_model.bin``; it loads with ``load_expert("biomedclip", dir)``.

Biases and norm weights are perturbed from their constant initial values so a test cannot pass
by accident on zeros and ones, and in the tiny models query/key projections are scaled up so the
attention is far from uniform.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from teacher_cache.experts.checkpoint import OPEN_CLIP_CONFIG
from teacher_cache.experts.registry import OPENAI_MEAN, OPENAI_STD, get_expert
from teacher_cache.experts.towers import build_visual

#: Tiny UniMed-style towers (open_clip model configs). 'b': 32 px / patch 8 -> 4x4 grid, width 64,
#: 2 layers, 2 heads. 'l': 42 px / patch 7 -> 6x6 grid, width 96, 3 layers, 3 heads.
TINY_UNIMED_CFGS: dict[str, dict] = {
    "b": {"embed_dim": 32, "quick_gelu": True,
          "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}},
    "l": {"embed_dim": 48, "quick_gelu": True,
          "vision_cfg": {"image_size": 42, "patch_size": 7, "width": 96, "layers": 3, "head_width": 32}},
}

#: BiomedCLIP's text tower config, written into the directory as the real one has it (never built).
BIOMEDCLIP_TEXT_CFG = {
    "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
    "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
    "hf_proj_type": "mlp",
    "hf_pooler_type": "cls_last_hidden_state_pooler",
    "context_length": 256,
}

#: The real BiomedCLIP config (timm ViT-B/16 @224, 512-d projection).
BIOMEDCLIP_MODEL_CFG = {
    "embed_dim": 512,
    "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                   "timm_pool": "", "timm_proj": "linear", "image_size": 224},
    "text_cfg": BIOMEDCLIP_TEXT_CFG,
}

#: Tiny BiomedCLIP: timm's ``test_vit`` trunk (160 px / patch 16 -> 10x10 grid, width 64, 6 blocks,
#: 2 heads), 32-d projection, and a non-OpenAI mean/std so tests can see it is read from the file.
TINY_BIOMEDCLIP_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                   "timm_pool": "", "timm_proj": "linear", "image_size": 160},
    "text_cfg": BIOMEDCLIP_TEXT_CFG,
}
TINY_BIOMEDCLIP_PREPROCESS = {"mean": [0.5, 0.45, 0.4], "std": [0.3, 0.25, 0.2]}


def _perturb(module: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Move the constant-initialised parameters (biases, norm weights: 1-d) off their init by
    ``scale`` * N(0, 1); weight matrices and embeddings are already random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim <= 1:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _random_init_fast(module: nn.Module, seed: int) -> None:
    """Fill a meta-built tower with random values quickly (full-size builders: timm's own init of a
    ViT-B takes seconds): matrices N(0, 1/fan_in), norm weights 1 + noise, other vectors noise."""
    module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel() if p.shape[0] > 1 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * fan_in ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _random_visual(model_cfg: dict, quick_gelu: bool, seed: int, fast: bool) -> nn.Module:
    """Random tower. Tiny (``fast=False``): open_clip/timm init, perturbed, attention sharpened.
    Full size (``fast=True``): fast init and no sharpening: sharpened attention through 12-24
    random blocks is chaotic (bf16 and fp32 runs then disagree), unlike a trained model."""
    if fast:
        visual = build_visual(model_cfg, quick_gelu=quick_gelu, meta=True)
        _random_init_fast(visual, seed)
    else:
        torch.manual_seed(seed)
        visual = build_visual(model_cfg, quick_gelu=quick_gelu)
        _perturb(visual, seed)
        _sharpen_attention(visual)
    return visual


def _sharpen_attention(module: nn.Module, factor: float = 3.0) -> None:
    """Scale every attention's query and key projections by ``factor`` (logits by factor**2), so the
    random model's attention is far from uniform and attention tests have something to see."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                d = m.embed_dim
                m.in_proj_weight[: 2 * d] *= factor
            elif isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "head_dim"):
                a = m.qkv.out_features // 3
                m.qkv.weight[: 2 * a] *= factor


def _text_keys(gen: torch.Generator, width: int) -> dict[str, Tensor]:
    """A few text-tower tensors named as in real CLIP checkpoints (the loader must ignore them)."""
    return {
        "text.transformer.embeddings.word_embeddings.weight": torch.randn(50, width, generator=gen),
        "text.transformer.encoder.layer.0.attention.self.query.weight": torch.randn(width, width, generator=gen),
        "text.proj.0.weight": torch.randn(width, width, generator=gen),
        "logit_scale": torch.tensor(4.6052),
    }


def save_random_unimed(path: str | Path, name: str = "unimed-b", model_cfg: dict | None = None,
                       seed: int = 0) -> dict:
    """Write a random-weight UniMed-CLIP checkpoint for expert ``name`` in the real format.

    ``model_cfg`` None: the registry architecture at full size. Returns the model config used.
    """
    import open_clip
    spec = get_expert(name)
    cfg = copy.deepcopy(model_cfg if model_cfg is not None else open_clip.get_model_config(spec.arch))
    visual = _random_visual(cfg, spec.quick_gelu, seed, fast=model_cfg is None)
    gen = torch.Generator().manual_seed(seed + 1)
    state = {f"module.visual.{k}": v for k, v in visual.state_dict().items()}
    state.update({f"module.{k}": v for k, v in _text_keys(gen, 16).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "name": f"random-{name}", "state_dict": state}, path)
    return cfg


def save_tiny_unimed(path: str | Path, arch: str = "b", seed: int = 0) -> dict:
    """Tiny UniMed-style checkpoint (``arch`` 'b' -> expert unimed-b, 'l' -> unimed-l); returns the
    ``model_cfg`` to pass to :func:`~teacher_cache.experts.load_expert`."""
    if arch not in TINY_UNIMED_CFGS:
        raise ValueError(f"arch must be one of {sorted(TINY_UNIMED_CFGS)}")
    return save_random_unimed(path, f"unimed-{arch}", TINY_UNIMED_CFGS[arch], seed)


def save_random_biomedclip(directory: str | Path, model_cfg: dict | None = None,
                           preprocess_cfg: dict | None = None, seed: int = 0,
                           text_state: dict[str, Tensor] | None = None) -> Path:
    """Write a random-weight BiomedCLIP-style open_clip directory; full size unless ``model_cfg``.

    ``text_state``: a real text tower's ``text.*`` tensors to store instead of the few placeholder
    keys (:mod:`teacher_cache.a3tune.tiny_clip` passes a tiny BERT tower's)."""
    preprocess_cfg = preprocess_cfg if preprocess_cfg is not None else {"mean": list(OPENAI_MEAN),
                                                                         "std": list(OPENAI_STD)}
    full_size = model_cfg is None
    model_cfg = copy.deepcopy(model_cfg if model_cfg is not None else BIOMEDCLIP_MODEL_CFG)
    visual = _random_visual(model_cfg, bool(model_cfg.get("quick_gelu", False)), seed, fast=full_size)
    gen = torch.Generator().manual_seed(seed + 1)
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    placeholder = _text_keys(gen, 16)
    state.update(placeholder if text_state is None else {**text_state, "logit_scale": placeholder["logit_scale"]})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OPEN_CLIP_CONFIG).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2), encoding="utf-8")
    torch.save(state, directory / "open_clip_pytorch_model.bin")
    return directory


def save_tiny_biomedclip(directory: str | Path, seed: int = 0) -> Path:
    """Tiny BiomedCLIP-style directory (timm ``test_vit`` trunk, 10x10 grid); returns the directory."""
    return save_random_biomedclip(directory, TINY_BIOMEDCLIP_MODEL_CFG, TINY_BIOMEDCLIP_PREPROCESS, seed)


__all__ = [
    "BIOMEDCLIP_MODEL_CFG", "TINY_BIOMEDCLIP_MODEL_CFG", "TINY_BIOMEDCLIP_PREPROCESS", "TINY_UNIMED_CFGS",
    "save_random_biomedclip", "save_random_unimed", "save_tiny_biomedclip", "save_tiny_unimed",
]
