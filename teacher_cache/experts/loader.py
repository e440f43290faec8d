"""Loading an expert: its checkpoint read, its image tower built and filled, as an :class:`Expert`
whose :meth:`~Expert.encode` gives the teacher signals ``E_v`` and ``E_a`` of a batch.

The tower is built on the meta device, so every tensor comes from the checkpoint, and the load is
strict: missing or unexpected keys and shape mismatches are named.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
import torch
from torch import Tensor, nn

from shared.errors import MedAlignError
from shared.images import Preprocess
from shared.runtime import DTYPE_NAMES, check_dtype_name, resolve_device, torch_dtype
from teacher_cache.experts.checkpoint import read_checkpoint
from teacher_cache.experts.registry import ExpertSpec, get_expert
from teacher_cache.experts.towers import _Tower, build_visual, last_block_signals, make_tower


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


class Expert:
    """A loaded expert image tower, ready to produce teacher signals.

    Attributes: ``spec`` (the :class:`ExpertSpec` as loaded), ``preprocess``
    (:class:`shared.images.Preprocess`: PIL image -> normalised (3, S, S)), ``grid`` (g),
    ``device``, ``dtype``, ``layer`` (0-based index of the block read, the last one),
    ``num_layers``, ``visual`` (the open_clip image tower).
    """

    def __init__(self, spec: ExpertSpec, visual: nn.Module, tower: _Tower, preprocess: Preprocess,
                 device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.visual = visual
        self._tower = tower
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype
        self.grid = tower.grid
        self.num_layers = tower.num_blocks
        self.layer = self.num_layers - 1

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
        e_v, e_a = last_block_signals(self._tower, x, self.spec.token_mode)
        m = self.spec.num_patches
        if e_v.shape[1] != m or e_a.shape[1] != m:
            raise RuntimeError(f"expected {m} patch tokens, got E_v {tuple(e_v.shape)}, E_a {tuple(e_a.shape)}")
        return e_v, e_a


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype (a :data:`shared.runtime.DTYPE_NAMES` name or the dtype itself);
    None: float32 on CPU, bfloat16 (float16 without bf16 support) on CUDA."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in [torch_dtype(name) for name in DTYPE_NAMES]:
            raise MedAlignError(f"unsupported expert dtype {dtype}; use {', '.join(DTYPE_NAMES)}")
        return dtype
    return torch_dtype(check_dtype_name(str(dtype), "expert dtype"))


def load_expert(expert: str | ExpertSpec, weights: str | Path, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None, geometry: str = "pad",
                model_cfg: dict | None = None) -> Expert:
    """Build an expert's image tower and load its local weights (nothing is downloaded).

    Args:
        expert: a registry id (``unimed-l``, ``unimed-b``, ``biomedclip``) or an :class:`ExpertSpec`.
        weights: ``unimed-pt``: the checkpoint file; ``open-clip-dir``: the directory (a
            ``local-dir:`` prefix is accepted).
        device: where the tower runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:K`` (or a ``torch.device``).
        dtype: parameter dtype (``float32``/``bfloat16``/``float16`` or the torch dtype); the weights are
            cast (no autocast). None: float32 on CPU,
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
    dev = resolve_device(str(device), "expert device")
    dt = _resolve_dtype(dtype, dev)
    ckpt = read_checkpoint(spec, weights, model_cfg)
    cfg, quick_gelu, mean, std = ckpt.model_cfg, ckpt.quick_gelu, ckpt.mean, ckpt.std

    visual = build_visual(cfg, quick_gelu, meta=True)  # every tensor comes from the checkpoint
    tower = make_tower(visual)  # validates the tower type before the (slow) weight copy
    cfg_size = cfg["vision_cfg"].get("image_size", tower.image_size)
    if isinstance(cfg_size, (list, tuple)):
        cfg_size = cfg_size[0]
    if int(cfg_size) != tower.image_size:
        raise MedAlignError(f"expert {spec.name}: config image_size {cfg_size} but the tower takes {tower.image_size}")
    # private float32 copies (the loaded tensors may be memory-mapped views of the file)
    state = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in ckpt.state.items()}
    ckpt.state = {}  # drop the (memory-mapped) views of the file
    _load_strict(visual, state, ckpt.path, spec.name, ckpt.arch)
    del state
    visual.eval().requires_grad_(False)
    visual.to(device=dev, dtype=dt)

    resolved = replace(spec, image_size=tower.image_size, grid=tower.grid, mean=mean, std=std,
                       quick_gelu=quick_gelu)
    preprocess = Preprocess(image_size=resolved.image_size, mean=resolved.mean, std=resolved.std, geometry=geometry)
    return Expert(resolved, visual, tower, preprocess, dev, dt)


__all__ = ["Expert", "load_expert"]
