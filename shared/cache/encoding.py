"""How similarity values are stored: float16, or int8 holding round(127 s) clamped to [-127, 127].

The one definition of the stored encoding: the build encodes on its device (torch tensors), the
writer encodes what tests and tools hand it (numpy arrays), the reader decodes, all through here.
"""

from __future__ import annotations

import numpy as np

from shared.errors import MedAlignError

SIM_DTYPES = ("float16", "int8")
INT8_SCALE = 127.0
_INT8_MAX = 127


def check_sim_dtype(sim_dtype: str, what: str = "sim dtype") -> str:
    """``sim_dtype`` itself when it is one of :data:`SIM_DTYPES`, else a :class:`MedAlignError`."""
    if sim_dtype not in SIM_DTYPES:
        raise MedAlignError(f"unknown {what} {sim_dtype!r}; expected one of {SIM_DTYPES}")
    return sim_dtype


def encode_sim(tri, sim_dtype: str):
    """Similarity values (cosines in [-1, 1]) -> the stored encoding, computed in float32.

    ``tri`` is a numpy array (returned as one) or a torch tensor (returned as one, on its device).
    Values already in the stored dtype pass through untouched.
    """
    check_sim_dtype(sim_dtype)
    if isinstance(tri, np.ndarray):
        if tri.dtype == np.dtype(sim_dtype):
            return tri
        if sim_dtype == "float16":
            return tri.astype(np.float16)
        scaled = np.rint(tri.astype(np.float32, copy=False) * np.float32(INT8_SCALE))
        return np.clip(scaled, -_INT8_MAX, _INT8_MAX).astype(np.int8)
    import torch

    if tri.dtype == getattr(torch, sim_dtype):
        return tri
    if sim_dtype == "float16":
        return tri.to(torch.float16)
    return torch.round(tri.float() * INT8_SCALE).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)


def decode_sim(stored: np.ndarray, sim_dtype: str) -> np.ndarray:
    """The stored encoding -> float32 similarity values (int8 divided by 127), a new array."""
    values = _as_float32(np.asarray(stored))
    if check_sim_dtype(sim_dtype) == "int8":
        values /= INT8_SCALE
    return values


#: Below ATen's parallel grain (32,768 elements), so each cast runs on the calling thread and never
#: wakes torch's intra-op pool (which, on a loaded machine, made a read 10x slower).
_CAST_CHUNK = 16384


def _as_float32(a: np.ndarray) -> np.ndarray:
    """A float32 copy. numpy casts float16 one value at a time (~2 ns each, ~0.3 ms for a 576-token
    row); torch's cast is vectorised (F16C), ~5x faster even in chunks, so a writable float16 array
    goes through torch (a read-only one would make torch warn; numpy casts those)."""
    if a.dtype == np.float16 and a.flags.writeable and a.flags.c_contiguous and a.ndim == 1:
        import torch

        src = torch.from_numpy(a)
        out = torch.empty(src.numel(), dtype=torch.float32)
        for start in range(0, src.numel(), _CAST_CHUNK):
            out[start:start + _CAST_CHUNK].copy_(src[start:start + _CAST_CHUNK])
        return out.numpy()
    return a.astype(np.float32)


__all__ = ["INT8_SCALE", "SIM_DTYPES", "check_sim_dtype", "decode_sim", "encode_sim"]
