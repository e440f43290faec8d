"""Teacher signals on the student's grid: the similarity matrix ``S_e`` and the attention ``E_a``.

The expert sees a g x g patch grid; the student a G x G one (N = G*G). Both signals are resampled
bilinearly (``align_corners=False``) from g to G; when g == G no resampling happens at all
(docs/design.md 1, "Resampling").

- ``S_e`` (N, N), resample order ``norm-resample-norm`` (the default, as the reference's
  ``Distill_data_unimed_B/Similarity_matrix.ipynb`` does): L2-normalise each token of ``E_v`` (M, b),
  reshape to (b, g, g), resample to (b, G, G), flatten to (N, b), L2-normalise each row again,
  ``S_e = F F^T`` (cosine similarities: symmetric, unit diagonal). Order ``resample-norm``
  resamples the raw tokens and normalises once (``Distill_data_biomed/Similarity_matrix.ipynb``
  interpolates its un-normalised ``patch_tokens`` this way; tokens with large norms then dominate the
  interpolated rows; S_e differs by ~0.2 on random 14x14 tokens, docs/design.md 1 reports up to 0.5).
  When g == G both orders are the plain cosine matrix of the raw tokens (one normalisation, bit
  for bit the same).
- ``attn`` (N): reshape ``E_a`` (M) to (1, g, g), resample to (G, G), flatten. Stored raw
  (non-negative, not renormalised); normalisation belongs to the loss.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from shared.errors import MedAlignError
from shared.grid import DEFAULT_RESAMPLE_ORDER, check_resample_order, grid_side


def resample_grid(x: Tensor, size: int) -> Tensor:
    """Bilinear (``align_corners=False``) resampling of (B, C, g, g) maps to (B, C, size, size).

    Returns ``x`` itself, untouched, when g == size.
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def teacher_signals(e_v: Tensor, e_a: Tensor, grid: int,
                    resample_order: str = DEFAULT_RESAMPLE_ORDER) -> tuple[Tensor, Tensor]:
    """The cached teacher signals for a batch, computed in float32 on the inputs' device.

    Args:
        e_v: (B, M, b) patch features, M = g*g in row-major patch order.
        e_a: (B, M) CLS->patch attention.
        grid: the student's grid side G.
        resample_order: ``norm-resample-norm`` (the reference's) or ``resample-norm`` (raw tokens
            resampled); see the module docstring. Irrelevant when g == G.
    Returns:
        ``S_e`` (B, N, N) float32 cosine-similarity matrices and ``attn`` (B, N) float32, N = G*G.
    """
    check_resample_order(resample_order)
    if e_v.ndim != 3:
        raise MedAlignError(f"E_v must be (B, M, b); got shape {tuple(e_v.shape)}")
    bsz, m, dim = e_v.shape
    if tuple(e_a.shape) != (bsz, m):
        raise MedAlignError(f"E_a must be (B, M) = ({bsz}, {m}) to match E_v; got {tuple(e_a.shape)}")
    if int(grid) <= 0:
        raise MedAlignError(f"student grid must be positive; got {grid}")
    g, big = grid_side(m), int(grid)
    n = big * big

    feats = e_v.float()                                                         # (B, M, b)
    if g != big:
        if resample_order == "norm-resample-norm":
            feats = F.normalize(feats, dim=-1)
        maps = feats.transpose(1, 2).reshape(bsz, dim, g, g)
        feats = resample_grid(maps, big).reshape(bsz, dim, n).transpose(1, 2)   # (B, N, b)
    feats = F.normalize(feats, dim=-1)
    sim = feats @ feats.transpose(1, 2)                                         # (B, N, N)

    attn = resample_grid(e_a.float().reshape(bsz, 1, g, g), big).reshape(bsz, n)
    return sim, attn


__all__ = ["resample_grid", "teacher_signals"]
