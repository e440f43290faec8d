"""A3Tune's head selection and attention losses (``calculate_top_attention_loss`` of the authors'
LLaVA-Med v1 ``llava/model/utils.py``), batched, with shapes in the docstrings.

Per sample b (R_b rows after the image, N image tokens, K_b weak masks m_k in {0, 1}^N):

* **selection**: the ``top`` (layer, head) pairs of all layers with the largest visual ratio
  (:mod:`student_train.head_attention`), ties broken by the lower (layer, head) index;
* **map**: ``A_r = mean over the selected heads of P_{l,h}[r, image keys]`` for every row r (one
  map per row; the rows are not averaged). The authors multiply the non-selected heads by 0 and
  take the mean over all L x H heads: a constant factor that both losses cancel;
* ``squared``: ``sum_k mean_r (1 - sum_i A_ri m_ki / sum_i A_ri)^2``;
* ``kl``: ``sum_k (1/R_b) sum_r KL(p_k || q_r)`` with ``p_k = m_k / (sum m_k + 1e-8)``,
  ``q_r = A_r / (sum A_r + 1e-8)``, ``KL(p || q) = sum_i p_i (log p_i - log q_i)`` (0 where p_i = 0):
  torch's ``kl_div(log q, p, reduction='batchmean')`` over the R_b rows, as theirs; ``q`` is clamped
  at the smallest normal fp32 before the log (theirs is not: an underflowed probability gives inf).

The batch value is the mean over the B samples of the per-sample sums; a sample without labels
(K_b = 0) adds 0 (the authors train with one sample per device and average the accumulated
micro-batches, so a batch of B equals B accumulated single samples). No labels in the batch: a
graph-connected zero.
"""

from __future__ import annotations

import torch

from student_train.config import A3_LOSSES
from student_train.losses import _connected_zero

KL_EPS = 1e-8


def select_heads(ratios: torch.Tensor, top: int) -> torch.Tensor:
    """ratios [B, L, H] -> [B, L, H] bool, the ``min(top, L*H)`` largest per sample (stable order)."""
    b, layers, heads = ratios.shape
    flat = ratios.reshape(b, layers * heads)
    k = min(int(top), layers * heads)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen.scatter_(1, order, True)
    return chosen.reshape(b, layers, heads)


def combine_maps(maps: list[torch.Tensor], selected: torch.Tensor) -> torch.Tensor:
    """Mean over the selected heads, per sample and row.

    Args:
        maps: one [B, H, R, N] tensor per layer, in layer order.
        selected: [B, L, H] bool.
    Returns:
        [B, R, N] fp32 (graph kept through the selected heads only).
    """
    w = selected.float()
    total = None
    for layer, m in enumerate(maps):
        term = torch.einsum("bh,bhrn->brn", w[:, layer].to(m.dtype), m)
        total = term if total is None else total + term
    return total / w.sum(dim=(1, 2)).clamp(min=1)[:, None, None]


def squared_per_mask(a: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """a [R, N] maps, masks [K, N] -> [K]: ``mean_r (1 - sum_i a_ri m_ki / sum_i a_ri)^2``."""
    s = a.sum(-1).clamp(min=torch.finfo(torch.float32).tiny)  # [R]
    v = (a @ masks.t()) / s[:, None]  # [R, K]
    return ((1 - v) ** 2).mean(0)


def kl_per_mask(a: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """a [R, N] maps, masks [K, N] -> [K]: ``(1/R) sum_r KL(p_k || q_r)`` (see the module docstring)."""
    q = a / (a.sum(-1, keepdim=True) + KL_EPS)  # [R, N]
    p = masks / (masks.sum(-1, keepdim=True) + KL_EPS)  # [K, N]
    log_q = q.clamp(min=torch.finfo(torch.float32).tiny).log()
    neg_entropy = torch.xlogy(p, p).sum(-1)  # [K]
    cross = p @ log_q.t()  # [K, R]
    return (neg_entropy[:, None] - cross).sum(1) / a.shape[0]


def a3_att_loss(
    maps: torch.Tensor,
    row_valid: torch.Tensor,
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    mode: str = A3_LOSSES[0],
) -> torch.Tensor:
    """A3Tune's L_att of a batch.

    Args:
        maps: [B, R, N] the combined maps of the selected heads (:func:`combine_maps`).
        row_valid: [B, R] bool real rows.
        labels: [B, K, N] float 0/1 weak masks on the grid (padding masks anything).
        label_mask: [B, K] bool real masks.
        mode: ``squared`` or ``kl``.
    Returns:
        0-dim fp32: mean over the B samples of ``sum_k`` loss_k (0 for a sample without masks).
    """
    if mode not in A3_LOSSES:
        raise ValueError(f"unknown a3 loss {mode!r}; valid: {', '.join(A3_LOSSES)}")
    per_mask = squared_per_mask if mode == "squared" else kl_per_mask
    terms = []
    for b in range(maps.shape[0]):
        keep = label_mask[b]
        rows = row_valid[b]
        if not bool(keep.any()) or not bool(rows.any()):
            continue
        terms.append(per_mask(maps[b][rows].float(), labels[b][keep].float()).sum())
    if not terms:
        return _connected_zero(maps)
    return torch.stack(terms).sum() / maps.shape[0]
