"""The two MedAlign distillation losses (docs/design.md section 1, Eq. 3-5).

Both average a per-sample term over the samples that have a teacher entry (``teacher_mask``).
The empty case (no sample with a teacher entry, or for ``L_att`` no such sample with at least one
query row) is an explicit zero that stays connected to the student's graph (``0 * pred.sum()``),
so that every trainable parameter still receives a (zero) gradient, as DDP expects.

``att_norm`` modes for ``L_att`` (clamped at ``clamp`` against log 0; terms with ``E_i = 0``
contribute 0):

* ``l2`` (default: the reference code and the published runs): ``E = F.normalize(e)``,
  ``M = F.normalize(m)`` (unit L2 norm, not distributions) and the reference's
  ``F.kl_div(log(M), E, reduction='batchmean')`` on the 1-D ``[N]`` vectors
  (``get_attention_map_loss`` in ``llava-med-1.5/llava/model_wrapper.py``). On a 1-D input
  ``batchmean`` divides the sum by its only dimension, N, so the per-sample value is
  ``(1/N) sum_i E_i (log E_i - log M_i)``; its optimum is M proportional to sqrt(E), not E
  (docs/design.md section 1). The published beta (0.06 VQA, 0.03 reports) is for this scale.
* ``sum``: ``E = e / sum(e)``, ``M = m / sum(m)`` and ``sum_i E_i (log E_i - log M_i)``: a true KL
  between distributions over the N patches, hundreds of times larger than ``l2`` at N = 576, so it
  needs a correspondingly smaller beta.
* ``softmax`` (the paper's wording): ``E = softmax(e)``, ``M = softmax(m)``, then the KL; the
  softmax of values of about 1/N is almost uniform, so the loss carries almost no signal.

A batch gives the mean of the per-sample values (the reference trains with batch size 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from student_train.config import ATT_NORMS, DEFAULT_ATT_NORM


def _connected_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-dim float32 zero that depends on ``tensors`` (zero gradient for their parameters)."""
    z = None
    for t in tensors:
        if t is not None and t.requires_grad:
            term = t.sum().float() * 0.0
            z = term if z is None else z + term
    if z is None:
        t = next(t for t in tensors if t is not None)
        z = torch.zeros((), dtype=torch.float32, device=t.device)
    return z


def cosine_similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """x: [B, N, d] -> [B, N, N] fp32 cosine similarities of the rows."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        xn = F.normalize(x.float(), dim=-1)
        return xn @ xn.transpose(-1, -2)


def vis_loss(rotated: torch.Tensor, teacher_sim: torch.Tensor, teacher_mask: torch.Tensor) -> torch.Tensor:
    """``L_vis`` (Eq. 3-4): mean over N x N of ``(S_e - S_x)^2``, averaged over teacher samples.

    Args:
        rotated: [B, N, d] the rotated visual hidden states X~ (any float dtype).
        teacher_sim: [B, N, N] float, the teacher's S_e (zeros where there is no entry).
        teacher_mask: [B] bool, samples with a teacher entry.
    Returns:
        0-dim float32 (a graph-connected zero when no sample has a teacher entry).
    """
    keep = teacher_mask.to(torch.bool)
    if not bool(keep.any()):
        return _connected_zero(rotated)
    s_x = cosine_similarity_matrix(rotated[keep])
    per_sample = ((teacher_sim[keep].float() - s_x) ** 2).mean(dim=(-1, -2))
    return per_sample.mean()


def normalise_attention(x: torch.Tensor, mode: str) -> torch.Tensor:
    """x: [B, N] non-negative -> [B, N] fp32 normalised per ``mode`` (see the module docstring)."""
    x = x.float()
    if mode == "sum":
        return x / x.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    if mode == "softmax":
        return torch.softmax(x, dim=-1)
    if mode == "l2":
        return F.normalize(x, dim=-1)
    raise ValueError(f"unknown att_norm {mode!r}; valid: {', '.join(ATT_NORMS)}")


def kl_per_sample(e: torch.Tensor, m: torch.Tensor, clamp: float) -> torch.Tensor:
    """``sum_i E_i (log clamp(E_i) - log clamp(M_i))`` per row: [B, N], [B, N] -> [B]."""
    return (e * (e.clamp(min=clamp).log() - m.clamp(min=clamp).log())).sum(-1)


def att_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    teacher_mask: torch.Tensor,
    *,
    mode: str = DEFAULT_ATT_NORM,
    clamp: float = 1e-8,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``L_att`` (Eq. 5): ``KL(E_a || M_a)`` after ``mode`` normalisation, averaged over samples.

    Args:
        student_attn: [B, N] M_a, the head- and query-row-averaged attention to the visual keys.
        teacher_attn: [B, N] E_a, raw non-negative teacher attention (zeros without an entry).
        teacher_mask: [B] bool, samples with a teacher entry.
        mode: ``l2`` (default), ``sum`` or ``softmax``.
        clamp: lower clamp before the logs.
        rows: optional [B] number of query rows per sample; samples with 0 rows are left out.
    Returns:
        0-dim float32 (a graph-connected zero when no sample qualifies).
    """
    keep = teacher_mask.to(torch.bool)
    if rows is not None:
        keep = keep & (rows > 0)
    if not bool(keep.any()):
        return _connected_zero(student_attn)
    e = normalise_attention(teacher_attn[keep], mode)
    m = normalise_attention(student_attn[keep], mode)
    per_sample = kl_per_sample(e, m, clamp)
    if mode == "l2":  # the reference's batchmean on a 1-D [N] vector divides by N
        per_sample = per_sample / e.shape[-1]
    return per_sample.mean()
