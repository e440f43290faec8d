"""Expert medical CLIP image encoders: the registry, offline loading, and one-pass signal extraction.

An *expert* is the image tower of a medical CLIP. From its **last** transformer block, in one
forward pass, :meth:`Expert.encode` returns

- ``E_v`` (B, M, b): the M = g*g patch tokens (CLS and any other prefix tokens dropped) in the
  expert's token mode: ``raw`` = the block's output before the final norm (open_clip's
  ``forward_intermediates(..., output_fmt='NLC')``), ``norm`` = after the final norm, ``proj`` =
  normalised and projected (``ln_post``/``@ proj`` for open_clip's ViT, ``norm``/``head.proj``
  for a timm trunk);
- ``E_a`` (B, M): the CLS-query attention probabilities over the M patch keys in that block,
  averaged over heads (softmax over all keys, prefix included, then the patch columns taken; not
  renormalised).

``E_a`` is recomputed in a forward pre-hook on the last block's attention module from the
module's own (already normalised) input, with the module's own projection weights and scale and a
float32 softmax, so the block itself keeps its fused attention kernel.

Only the image tower is ever built (open_clip's private ``_build_vision_tower``); the text tower is
never built, so BiomedCLIP's BiomedBERT is never looked up on a hub. Weights are local files:

- ``unimed-pt``: a UniMed-CLIP training checkpoint (``.pt``), possibly ``{"state_dict": ...}`` with
  ``module.`` prefixes; only the ``visual.*`` keys are used and they must match exactly.
- ``open-clip-dir``: a BiomedCLIP-style directory with ``open_clip_config.json`` (architecture and
  preprocessing) and ``open_clip_pytorch_model.bin``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.errors import MedAlignError
from shared.grid import DEFAULT_RESAMPLE_ORDER
from shared.images import Preprocess, sha256_file

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

TOKEN_MODES = ("raw", "norm", "proj")
WEIGHT_FORMATS = ("unimed-pt", "open-clip-dir")

#: Files of an ``open-clip-dir`` expert.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")

LOCAL_DIR_PREFIX = "local-dir:"


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
    description: str = ""

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

    def to_json(self) -> dict:
        return {"name": self.name, "arch": self.arch, "image_size": self.image_size, "grid": self.grid,
                "mean": list(self.mean), "std": list(self.std), "token_mode": self.token_mode,
                "weight_format": self.weight_format, "quick_gelu": self.quick_gelu}


EXPERTS: dict[str, ExpertSpec] = {
    "unimed-l": ExpertSpec(
        name="unimed-l", arch="ViT-L-14-336-quickgelu", image_size=336, grid=24,
        mean=OPENAI_MEAN, std=OPENAI_STD, token_mode="raw", weight_format="unimed-pt", quick_gelu=True,
        description="UniMed-CLIP ViT-L/14 @336 (24x24 = 576 patches); the default expert"),
    "unimed-b": ExpertSpec(
        name="unimed-b", arch="ViT-B-16-quickgelu", image_size=224, grid=14,
        mean=OPENAI_MEAN, std=OPENAI_STD, token_mode="raw", weight_format="unimed-pt", quick_gelu=True,
        description="UniMed-CLIP ViT-B/16 @224 (14x14 = 196 patches)"),
    "biomedclip": ExpertSpec(
        name="biomedclip", arch=None, image_size=224, grid=14,
        mean=OPENAI_MEAN, std=OPENAI_STD, token_mode="proj", weight_format="open-clip-dir", quick_gelu=False,
        resample_order="resample-norm",  # Distill_data_biomed/Similarity_matrix.ipynb resamples raw tokens
        description="BiomedCLIP (timm ViT-B/16 @224 trunk, 14x14 = 196 patches, 512-d projected tokens); "
                    "weights: the open_clip directory (open_clip_config.json + open_clip_pytorch_model.bin)"),
}

DEFAULT_EXPERT = "unimed-l"


def list_experts() -> list[str]:
    """The registered expert ids, default first."""
    return list(EXPERTS)


def get_expert(name: str) -> ExpertSpec:
    """The registry entry for ``name``; an unknown name raises :class:`MedAlignError` listing the valid ones."""
    try:
        return EXPERTS[name]
    except (KeyError, TypeError):
        raise MedAlignError(f"unknown expert {name!r}; valid experts: {', '.join(list_experts())}") from None


# ----------------------------------------------------------------------------------------------
# weights on disk
# ----------------------------------------------------------------------------------------------

def _strip_local_dir(weights: str | Path) -> Path:
    s = str(weights)
    if s.startswith(LOCAL_DIR_PREFIX):
        s = s[len(LOCAL_DIR_PREFIX):]
    return Path(s).expanduser()


def _open_clip_dir_files(weights: str | Path) -> tuple[Path, Path]:
    """(config json, weights file) of an ``open-clip-dir`` expert; also accepts a file inside it."""
    path = _strip_local_dir(weights)
    if path.is_file() and (path.name == OPEN_CLIP_CONFIG or path.name in OPEN_CLIP_WEIGHTS):
        path = path.parent
    if not path.is_dir():
        raise MedAlignError(
            f"{path}: expected an open_clip model directory containing {OPEN_CLIP_CONFIG} and "
            f"{OPEN_CLIP_WEIGHTS[0]} (BiomedCLIP's hub snapshot, downloaded beforehand)")
    cfg = path / OPEN_CLIP_CONFIG
    if not cfg.is_file():
        raise MedAlignError(f"{path}: no {OPEN_CLIP_CONFIG}; expected an open_clip model directory")
    for name in OPEN_CLIP_WEIGHTS:
        if (path / name).is_file():
            return cfg, path / name
    raise MedAlignError(f"{path}: no weights file; expected one of {', '.join(OPEN_CLIP_WEIGHTS)}")


def weights_file(weights: str | Path) -> Path:
    """The single file holding an expert's weights: the path itself, or the weights file inside an
    open_clip directory."""
    path = _strip_local_dir(weights)
    if path.is_dir():
        return _open_clip_dir_files(path)[1]
    if not path.is_file():
        raise MedAlignError(f"expert weights not found: {path}")
    return path


def weights_sha256(weights: str | Path) -> str:
    """SHA-256 hex digest of the expert's weights file (for a directory: of the weights file in it)."""
    return sha256_file(weights_file(weights))


def _torch_load(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise MedAlignError(f"{path}: cannot read safetensors weights ({e})") from None
    try:
        try:  # memory-map zip-format checkpoints: only the visual tensors are ever read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except FileNotFoundError:
        raise MedAlignError(f"expert weights not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise MedAlignError(
            f"{path}: cannot read as a torch checkpoint with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); only plain tensor checkpoints are accepted") from None


def _visual_state_dict(obj: Any, path: Path, expert: str) -> dict[str, Tensor]:
    """The ``visual.*`` tensors of a CLIP checkpoint, prefixes removed.

    Accepts a flat state dict or one nested under ``state_dict`` (open_clip training checkpoints),
    with or without DistributedDataParallel's ``module.`` prefix.
    """
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise MedAlignError(f"{path}: not a state dict (no tensors at the top level or under 'state_dict')")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            continue
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("visual."):
            out[key[len("visual."):]] = value
    if not out:
        sample = ", ".join(list(map(str, obj))[:5])
        raise MedAlignError(f"{path}: no 'visual.*' keys for expert {expert} (first keys: {sample})")
    return out


def _load_strict(visual: nn.Module, state: dict[str, Tensor], path: Path, expert: str, arch: str) -> None:
    expected = visual.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]

    def few(keys: list[str]) -> str:
        shown = ", ".join(keys[:5])
        return shown + (f", ... ({len(keys) - 5} more)" if len(keys) > 5 else "")

    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {few(unexpected)}")
        raise MedAlignError(
            f"{path}: checkpoint does not match the image tower of expert {expert} ({arch}): "
            + "; ".join(parts) + " (keys relative to 'visual.')")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise MedAlignError(
            f"{path}: checkpoint does not match the image tower of expert {expert} ({arch}): "
            f"{len(bad)} shape mismatches (checkpoint vs model): {few(bad)}")
    visual.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in (*visual.named_parameters(), *visual.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"expert {expert}: tensors not initialised by the checkpoint: {left[:5]}")


# ----------------------------------------------------------------------------------------------
# building the image tower
# ----------------------------------------------------------------------------------------------

def _build_visual(model_cfg: dict, quick_gelu: bool, meta: bool = False) -> nn.Module:
    """The open_clip image tower alone, never touching a hub: randomly initialised, or with
    ``meta=True`` parameters on the meta device (no init cost; load with ``assign=True``)."""
    try:
        from open_clip.model import _build_vision_tower
    except ImportError as e:
        raise MedAlignError(
            f"this open_clip_torch version has no open_clip.model._build_vision_tower ({e}); "
            "install open_clip_torch 3.x") from None
    if "vision_cfg" not in model_cfg or "embed_dim" not in model_cfg:
        raise MedAlignError(f"model config needs 'embed_dim' and 'vision_cfg' (got keys {sorted(model_cfg)})")
    vision_cfg = dict(model_cfg["vision_cfg"])
    vision_cfg["timm_model_pretrained"] = False  # never download timm weights
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return _build_vision_tower(int(model_cfg["embed_dim"]), vision_cfg, quick_gelu=quick_gelu, cast_dtype=None)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise MedAlignError(f"cannot build the image tower from vision config {vision_cfg}: {e}") from None


class _Tower:
    """What :class:`Expert` needs from an image tower; one subclass per tower family."""

    num_prefix_tokens: int
    grid: int
    image_size: int
    num_blocks: int
    attention: nn.Module

    def last_block_tokens(self, x: Tensor) -> Tensor:
        """(B, M, width) patch tokens output by the last block (prefix tokens dropped)."""
        raise NotImplementedError

    def apply_mode(self, tokens: Tensor, mode: str) -> Tensor:
        raise NotImplementedError

    def cls_attention(self, args: tuple, kwargs: dict) -> Tensor:
        """(B, L) head-averaged fp32 softmax of the CLS query over all L keys, from the attention
        module's call arguments."""
        raise NotImplementedError


def _fp32_apply(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` in float32 whatever the module's parameter dtype (for q/k norms)."""
    if isinstance(module, nn.Identity):
        return x
    params = {n: p.float() for n, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


class _OpenClipViT(_Tower):
    """open_clip's native ``VisionTransformer`` (ResidualAttentionBlock + nn.MultiheadAttention)."""

    def __init__(self, visual: nn.Module):
        from open_clip.transformer import ResidualAttentionBlock
        self.visual = visual
        if getattr(visual, "attn_pool", None) is not None:
            raise MedAlignError("attentional-pool vision towers are not supported as experts")
        blocks = visual.transformer.resblocks
        if not isinstance(blocks[-1], ResidualAttentionBlock) or not isinstance(blocks[-1].attn, nn.MultiheadAttention):
            raise MedAlignError(f"unsupported open_clip block type {type(blocks[-1]).__name__}: "
                                "need ResidualAttentionBlock with nn.MultiheadAttention")
        self.attention = blocks[-1].attn
        if self.attention.bias_k is not None or self.attention.add_zero_attn:
            raise MedAlignError("nn.MultiheadAttention with bias_k/add_zero_attn is not supported")
        gh, gw = visual.grid_size
        if gh != gw:
            raise MedAlignError(f"non-square patch grid {gh}x{gw}")
        self.grid = gh
        self.image_size = visual.image_size[0]
        self.num_blocks = len(blocks)
        self.num_prefix_tokens = 1

    def last_block_tokens(self, x: Tensor) -> Tensor:
        out = self.visual.forward_intermediates(
            x, indices=[self.num_blocks - 1], intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]

    def apply_mode(self, tokens: Tensor, mode: str) -> Tensor:
        if mode == "raw":
            return tokens
        tokens = self.visual.ln_post(tokens)
        if mode == "norm":
            return tokens
        return tokens @ self.visual.proj

    def cls_attention(self, args: tuple, kwargs: dict) -> Tensor:
        mha: nn.MultiheadAttention = self.attention
        query = args[0] if len(args) > 0 else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs.get("key", query)
        if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
            raise MedAlignError("attention masks in the expert's vision tower are not supported")
        if not mha.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        d, h = mha.embed_dim, mha.num_heads
        hd = d // h
        if mha.in_proj_weight is not None:
            w_q, w_k = mha.in_proj_weight[:d], mha.in_proj_weight[d:2 * d]
        else:
            w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
        b_q = b_k = None
        if mha.in_proj_bias is not None:
            b_q, b_k = mha.in_proj_bias[:d].float(), mha.in_proj_bias[d:2 * d].float()
        q = F.linear(query[:, 0].float(), w_q.float(), b_q)                  # (B, d)
        k = F.linear(key.float(), w_k.float(), b_k)                            # (B, L, d)
        bsz, length = k.shape[:2]
        logits = torch.einsum("bhc,blhc->bhl", q.view(bsz, h, hd), k.view(bsz, length, h, hd)) * hd ** -0.5
        return logits.softmax(dim=-1).mean(dim=1)


class _TimmViT(_Tower):
    """open_clip's ``TimmModel`` wrapping a timm ``VisionTransformer`` (timm ``Attention``)."""

    def __init__(self, visual: nn.Module):
        trunk = visual.trunk
        self.visual, self.trunk = visual, trunk
        if not hasattr(trunk, "blocks") or not hasattr(trunk, "forward_intermediates"):
            raise MedAlignError(f"unsupported timm trunk {type(trunk).__name__}: need a ViT with blocks")
        attn = trunk.blocks[-1].attn
        for attr in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm"):
            if not hasattr(attn, attr):
                raise MedAlignError(f"unsupported timm attention {type(attn).__name__} (no {attr!r})")
        self.attention = attn
        gh, gw = trunk.patch_embed.grid_size
        ih, iw = trunk.patch_embed.img_size
        if gh != gw or ih != iw:
            raise MedAlignError(f"non-square timm trunk: image {ih}x{iw}, grid {gh}x{gw}")
        self.grid, self.image_size = gh, ih
        self.num_blocks = len(trunk.blocks)
        self.num_prefix_tokens = int(trunk.num_prefix_tokens)
        if getattr(trunk, "cls_token", None) is None:
            raise MedAlignError("timm trunk without a class token: no CLS attention to read")

    def last_block_tokens(self, x: Tensor) -> Tensor:
        out = self.trunk.forward_intermediates(
            x, indices=[self.num_blocks - 1], intermediates_only=True, output_fmt="NLC", norm=False)
        return out[0]

    def apply_mode(self, tokens: Tensor, mode: str) -> Tensor:
        if mode == "raw":
            return tokens
        tokens = self.trunk.fc_norm(self.trunk.norm(tokens))
        if mode == "norm":
            return tokens
        return self.visual.head(self.trunk.head(tokens))

    def cls_attention(self, args: tuple, kwargs: dict) -> Tensor:
        attn = self.attention
        x = args[0] if args else kwargs["x"]
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise MedAlignError("attention masks in the expert's vision tower are not supported")
        bsz, length, _ = x.shape
        h, hd = attn.num_heads, attn.head_dim
        a = h * hd
        w = attn.qkv.weight.float()
        bias = attn.qkv.bias.float() if attn.qkv.bias is not None else None
        q = F.linear(x[:, :1].float(), w[:a], None if bias is None else bias[:a])          # (B, 1, a)
        k = F.linear(x.float(), w[a:2 * a], None if bias is None else bias[a:2 * a])     # (B, L, a)
        q = _fp32_apply(attn.q_norm, q.view(bsz, 1, h, hd).transpose(1, 2))              # (B, h, 1, hd)
        k = _fp32_apply(attn.k_norm, k.view(bsz, length, h, hd).transpose(1, 2))         # (B, h, L, hd)
        logits = (q * float(attn.scale)) @ k.transpose(-2, -1)                           # (B, h, 1, L)
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def _make_tower(visual: nn.Module) -> _Tower:
    from open_clip.transformer import VisionTransformer
    if isinstance(visual, VisionTransformer):
        return _OpenClipViT(visual)
    if hasattr(visual, "trunk"):
        return _TimmViT(visual)
    raise MedAlignError(f"unsupported image tower {type(visual).__name__}; experts must be ViTs")


# ----------------------------------------------------------------------------------------------
# the loaded expert
# ----------------------------------------------------------------------------------------------

class Expert:
    """A loaded expert image tower, ready to produce teacher signals.

    Attributes: ``spec`` (the :class:`ExpertSpec` as loaded), ``preprocess``
    (:class:`shared.images.Preprocess`: PIL image -> normalised (3, S, S)), ``grid`` (g),
    ``device``, ``dtype``, ``layer`` (0-based index of the block read, the last one),
    ``num_layers``, ``visual`` (the open_clip image tower).
    """

    def __init__(self, spec: ExpertSpec, visual: nn.Module, preprocess: Preprocess, device: torch.device,
                 dtype: torch.dtype, weights: Path, tower: _Tower | None = None):
        self.spec = spec
        self.visual = visual
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype
        self.weights = weights
        self._tower = tower if tower is not None else _make_tower(visual)
        self.grid = self._tower.grid
        self.num_layers = self._tower.num_blocks
        self.layer = self.num_layers - 1

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def info(self) -> dict:
        """Provenance for the cache manifest: the spec as loaded, the block read, the dtype."""
        return {**self.spec.to_json(), "layer": self.layer, "num_layers": self.num_layers,
                "num_prefix_tokens": self._tower.num_prefix_tokens, "dtype": str(self.dtype).removeprefix("torch.")}

    def pixels(self, images: Sequence) -> Tensor:
        """Preprocess PIL images into a (B, 3, S, S) float32 CPU batch."""
        return torch.from_numpy(np.stack([self.preprocess(img) for img in images]))

    @torch.inference_mode()
    def encode(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher features and attention from the last block, in one forward pass.

        Args:
            pixels: (B, 3, S, S) normalised images (any float dtype/device; moved to the expert's).
        Returns:
            ``E_v`` (B, M, b) float32 patch tokens in the expert's token mode, and ``E_a`` (B, M)
            float32 CLS->patch attention probabilities averaged over heads; M = g*g, row-major
            patch order; both on the expert's device.
        """
        s = self.spec.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != s or pixels.shape[3] != s:
            raise MedAlignError(f"expert {self.spec.name} expects pixels of shape (B, 3, {s}, {s}); "
                                f"got {tuple(pixels.shape)}")
        x = pixels.to(device=self.device, dtype=self.dtype)
        captured: list[Tensor] = []

        def hook(module, args, kwargs):
            captured.append(self._tower.cls_attention(args, kwargs))

        handle = self._tower.attention.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            tokens = self._tower.last_block_tokens(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"attention hook fired {len(captured)} times in one forward pass; expected once")
        e_v = self._tower.apply_mode(tokens, self.spec.token_mode).float()
        e_a = captured[0][:, self._tower.num_prefix_tokens:].float()
        m = self.num_patches
        if e_v.shape[1] != m or e_a.shape[1] != m:
            raise RuntimeError(f"expected {m} patch tokens, got E_v {tuple(e_v.shape)}, E_a {tuple(e_a.shape)}")
        return e_v, e_a

    def encode_images(self, images: Sequence) -> tuple[Tensor, Tensor]:
        """:meth:`encode` on PIL images, preprocessed with :attr:`preprocess`."""
        return self.encode(self.pixels(images))


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise MedAlignError(f"unsupported expert dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise MedAlignError(f"unknown dtype {dtype!r}; choose from {', '.join(names)}") from None


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise MedAlignError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MedAlignError(f"device {device!r} requested but CUDA is not available")
    return dev


def _read_dir_config(cfg_path: Path) -> tuple[dict, dict]:
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MedAlignError(f"{cfg_path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_cfg"), dict):
        raise MedAlignError(f"{cfg_path}: no 'model_cfg' object; not an open_clip model config")
    pre = doc.get("preprocess_cfg") or {}
    if not isinstance(pre, dict):
        raise MedAlignError(f"{cfg_path}: 'preprocess_cfg' must be an object")
    return doc["model_cfg"], pre


def _triple(value: Any, what: str, where: Path) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise MedAlignError(f"{where}: preprocess_cfg.{what} must be 3 numbers, got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def load_expert(expert: str | ExpertSpec, weights: str | Path, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None, geometry: str = "pad",
                model_cfg: dict | None = None) -> Expert:
    """Build an expert's image tower and load its local weights (nothing is downloaded).

    Args:
        expert: a registry id (``unimed-l``, ``unimed-b``, ``biomedclip``) or an :class:`ExpertSpec`.
        weights: ``unimed-pt``: the checkpoint file; ``open-clip-dir``: the directory (a
            ``local-dir:`` prefix is accepted).
        device: where the tower runs.
        dtype: parameter dtype; the weights are cast (no autocast). None: float32 on CPU,
            bfloat16 (float16 without bf16 support) on CUDA.
        geometry: ``pad`` (pad to square with the mean colour, the student's view) or ``crop``
            (open_clip's centre crop) for :attr:`Expert.preprocess`.
        model_cfg: ``unimed-pt`` only: an open_clip model config (``{"embed_dim", "vision_cfg"}``)
            used instead of the registry architecture's. Real checkpoints carry no config; this
            exists for tiny test models (see :mod:`teacher_cache.tiny`).
    Raises:
        MedAlignError: unknown expert, missing/unreadable files, or weights that do not match the
            tower exactly (missing / unexpected keys and shape mismatches are named).
    """
    spec = expert if isinstance(expert, ExpertSpec) else get_expert(expert)
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    mean, std = spec.mean, spec.std
    if spec.weight_format == "unimed-pt":
        path = _strip_local_dir(weights)
        if path.is_dir():
            raise MedAlignError(f"expert {spec.name} expects a UniMed-CLIP checkpoint file (.pt), got directory {path}")
        if not path.is_file():
            raise MedAlignError(f"expert weights not found: {path}")
        if model_cfg is None:
            if spec.arch is None:
                raise MedAlignError(f"expert {spec.name}: no architecture in the spec and no model_cfg given")
            import open_clip
            cfg = open_clip.get_model_config(spec.arch)
            if cfg is None:
                raise MedAlignError(f"open_clip has no model config {spec.arch!r} (expert {spec.name})")
        else:
            cfg = model_cfg
        cfg = copy.deepcopy(cfg)
        quick_gelu = spec.quick_gelu
        arch = spec.arch if model_cfg is None else f"{spec.arch} (config override)"
        state = _visual_state_dict(_torch_load(path), path, spec.name)
        weights_path = path
    else:
        if model_cfg is not None:
            raise MedAlignError(f"expert {spec.name} reads its model config from the weights directory; "
                                "model_cfg cannot be given")
        cfg_path, weights_path = _open_clip_dir_files(weights)
        cfg, pre = _read_dir_config(cfg_path)
        cfg = copy.deepcopy(cfg)
        quick_gelu = bool(cfg.get("quick_gelu", False))
        if "mean" in pre:
            mean = _triple(pre["mean"], "mean", cfg_path)
        if "std" in pre:
            std = _triple(pre["std"], "std", cfg_path)
        arch = f"{cfg_path}"
        state = _visual_state_dict(_torch_load(weights_path), weights_path, spec.name)

    visual = _build_visual(cfg, quick_gelu, meta=True)  # every tensor comes from the checkpoint
    tower = _make_tower(visual)  # validates the tower type before the (slow) weight copy
    cfg_size = cfg["vision_cfg"].get("image_size", tower.image_size)
    if isinstance(cfg_size, (list, tuple)):
        cfg_size = cfg_size[0]
    if int(cfg_size) != tower.image_size:
        raise MedAlignError(f"expert {spec.name}: config image_size {cfg_size} but the tower takes {tower.image_size}")
    # private float32 copies (the loaded tensors may be memory-mapped views of the file)
    state = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}
    _load_strict(visual, state, weights_path, spec.name, arch or spec.name)
    del state
    visual.eval().requires_grad_(False)
    visual.to(device=dev, dtype=dt)

    resolved = replace(spec, image_size=tower.image_size, grid=tower.grid, mean=mean, std=std,
                       quick_gelu=quick_gelu)
    preprocess = Preprocess(image_size=resolved.image_size, mean=resolved.mean, std=resolved.std, geometry=geometry)
    return Expert(resolved, visual, preprocess, dev, dt, weights_path, tower)


__all__ = [
    "DEFAULT_EXPERT", "EXPERTS", "Expert", "ExpertSpec", "OPENAI_MEAN", "OPENAI_STD", "get_expert",
    "list_experts", "load_expert", "weights_file", "weights_sha256",
]
