"""Reading an expert's weights from local files: one reader per on-disk form, and the weights' digest.

- ``unimed-pt``: a UniMed-CLIP training checkpoint (``.pt``), possibly ``{"state_dict": ...}`` with
  ``module.`` prefixes; only the ``visual.*`` keys are used. The architecture is the registry's
  open_clip config (or a given one, for tiny test towers).
- ``open-clip-dir``: a BiomedCLIP-style directory with ``open_clip_config.json`` (architecture and
  preprocessing) and ``open_clip_pytorch_model.bin``.

Zip-format torch checkpoints are memory-mapped, so only the visual tensors are ever read from disk.
Nothing is downloaded. A reader returns a :class:`Checkpoint`; the loader builds the tower from it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from shared.errors import MedAlignError
from shared.images import sha256_file
from shared.records import read_json
from teacher_cache.experts.registry import WEIGHT_FORMATS, ExpertSpec

#: Files of an ``open-clip-dir`` expert.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")

LOCAL_DIR_PREFIX = "local-dir:"


@dataclass
class Checkpoint:
    """What a reader found: the tower's open_clip model config and its ``visual.*`` tensors."""

    model_cfg: dict
    """open_clip model config (``{"embed_dim", "vision_cfg", ...}``), a private copy."""
    state: dict[str, Tensor]
    """The image tower's tensors, ``visual.`` prefix removed (possibly memory-mapped views)."""
    path: Path
    """The file the tensors came from."""
    arch: str
    """How the architecture was chosen, for error messages."""
    quick_gelu: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


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


def read_unimed_pt(spec: ExpertSpec, weights: str | Path, model_cfg: dict | None) -> Checkpoint:
    """A UniMed-CLIP ``.pt`` file; the architecture is the registry's (or ``model_cfg``)."""
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
    arch = spec.arch if model_cfg is None else f"{spec.arch} (config override)"
    state = _visual_state_dict(_torch_load(path), path, spec.name)
    return Checkpoint(copy.deepcopy(cfg), state, path, arch or spec.name, spec.quick_gelu, spec.mean, spec.std)


def _read_dir_config(cfg_path: Path) -> tuple[dict, dict]:
    doc = read_json(cfg_path)
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


def read_open_clip_dir(spec: ExpertSpec, weights: str | Path, model_cfg: dict | None) -> Checkpoint:
    """An open_clip directory; architecture, QuickGELU and mean/std come from its config."""
    if model_cfg is not None:
        raise MedAlignError(f"expert {spec.name} reads its model config from the weights directory; "
                            "model_cfg cannot be given")
    cfg_path, weights_path = _open_clip_dir_files(weights)
    cfg, pre = _read_dir_config(cfg_path)
    mean = _triple(pre["mean"], "mean", cfg_path) if "mean" in pre else spec.mean
    std = _triple(pre["std"], "std", cfg_path) if "std" in pre else spec.std
    state = _visual_state_dict(_torch_load(weights_path), weights_path, spec.name)
    return Checkpoint(copy.deepcopy(cfg), state, weights_path, str(cfg_path), bool(cfg.get("quick_gelu", False)),
                      mean, std)


#: One reader per weight format: ``(spec, weights path, model_cfg override or None) -> Checkpoint``.
READERS: dict[str, Callable[[ExpertSpec, str | Path, dict | None], Checkpoint]] = {
    "unimed-pt": read_unimed_pt,
    "open-clip-dir": read_open_clip_dir,
}
assert set(READERS) == set(WEIGHT_FORMATS), "every weight format of the registry needs a reader"


def read_checkpoint(spec: ExpertSpec, weights: str | Path, model_cfg: dict | None = None) -> Checkpoint:
    """The checkpoint of ``spec`` at ``weights``, read by its format's reader."""
    return READERS[spec.weight_format](spec, weights, model_cfg)


__all__ = ["Checkpoint", "OPEN_CLIP_CONFIG", "OPEN_CLIP_WEIGHTS", "READERS", "read_checkpoint", "weights_file",
           "weights_sha256"]
