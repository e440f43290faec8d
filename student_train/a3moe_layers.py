"""The A3MoE layers: a frozen base ``nn.Linear`` plus a mixture of LoRA experts (A3Tune's ``moe_llava.py``).

Two kinds, both holding their experts as ``moe_a`` [E, r, in] and ``moe_b`` [E, out, r] (fp32,
``A`` Kaiming-uniform with ``a = sqrt(5)``, ``B`` zeros, as the authors' ``LoRALayer``) and, with
E > 1, a router ``moe_router = nn.Linear(in, E)`` (fp32, with bias). One expert's update is
``lora_e(x) = (drop(x) A_e^T B_e^T) * alpha / r`` (the dropout on the input, one mask per expert).

* ``q`` (their ``LoRA_MOE_QK`` with ``dense_moe``): every token of sample ``b`` gets
  ``W x + sum_e g[b, e] lora_e(x)`` with ``g[b] = softmax(router(mean of x over b's question
  tokens))``; ``x`` is the q_proj input itself (the layer's ``input_layernorm`` output), so every
  layer routes by its own hidden states. E = 1: a plain LoRA on every token, no router. With
  ``top_k > 0`` (their non-dense branch, which no script runs) only the sample's top-k experts
  keep their gates (``reference_sparse``: the chosen expert ungated).
* ``k`` (their ``LoRA_MOE_QK_old``): only the image tokens; token-level routing
  ``p = softmax(router(x))``, the top-k experts ``S``; the update is ``sum_{e in S} p_e lora_e(x)``
  (raw softmax gates, not renormalised over S). ``reference_sparse`` is the authors' forward: no
  gate (``lora_e(x)`` itself, so the router gets no gradient from the LM loss) and, with top-k > 1,
  the experts written in ascending index order each overwriting the last, so the token gets only
  its highest-numbered selected expert.

What a forward routes by lives in :class:`MoeState`, written per ``LlavaModel`` forward by the
hooks of :mod:`student_train.a3moe` and left there until the next forward, so a gradient-
checkpointed recompute sees exactly what the forward saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MoeState:
    """What the MoE layers of one model read and write.

    Per forward (set by the pre-hook): ``question_mask`` / ``image_mask`` [B, T] bool (None in a
    decoding step), ``fixed_routing`` [L, B, Eq] (a decoding step: the prefill's q routing),
    ``image_rows`` [P] long (the sample of each image token, batch-major). Outputs of the last
    forward: ``q_routing`` {layer: [B, Eq]}, ``k_probs`` / ``k_hard`` {layer: [P, Ek]} (softmax
    probabilities; 0/1 top-k choice). Pending inputs of the next forwards (the context managers):
    ``pending`` ((question_mask, image_mask) of :func:`student_train.a3moe.moe_inputs`) and
    ``embeds_image`` (image positions of a forward fed ``inputs_embeds``).
    """

    question_mask: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    fixed_routing: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None
    q_routing: dict[int, torch.Tensor] = field(default_factory=dict)
    k_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    k_hard: dict[int, torch.Tensor] = field(default_factory=dict)
    pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
    embeds_image: torch.Tensor | None = None

    def clear(self) -> None:
        self.question_mask = self.image_mask = self.fixed_routing = self.image_rows = None
        self.q_routing, self.k_probs, self.k_hard = {}, {}, {}


def question_mean(x: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, d], [B, T] bool -> [B, d] fp32: the mean of each sample's question rows (zeros for a
    sample without one, so it routes by the router's bias alone)."""
    m = question_mask.to(torch.float32)[..., None]
    return (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


class MoeLinear(nn.Module):
    """``base`` (frozen) plus the experts of one q_proj or k_proj (see the module docstring)."""

    def __init__(self, base: nn.Linear, kind: str, layer: int, state: MoeState, *, experts: int, top_k: int,
                 r: int, alpha: float, dropout: float, reference_sparse: bool):
        super().__init__()
        if kind not in ("q", "k"):
            raise ValueError(f"kind must be 'q' or 'k', got {kind!r}")
        self.base, self.kind, self.layer = base, kind, int(layer)
        object.__setattr__(self, "state", state)  # shared, not a submodule
        self.experts, self.top_k, self.r = int(experts), int(top_k), int(r)
        self.scaling = float(alpha) / int(r)
        self.reference_sparse = bool(reference_sparse)
        self.in_features, self.out_features = base.in_features, base.out_features
        dev = base.weight.device
        a = torch.empty(self.experts, self.r, self.in_features, device=dev, dtype=torch.float32)
        for e in range(self.experts):
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
        self.moe_a = nn.Parameter(a)
        self.moe_b = nn.Parameter(torch.zeros(self.experts, self.out_features, self.r, device=dev,
                                              dtype=torch.float32))
        self.moe_router = (nn.Linear(self.in_features, self.experts, device=dev, dtype=torch.float32)
                           if self.experts > 1 else None)
        self.moe_dropout = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # code that reads ``q_proj.weight`` (dtype / device probes)
        return self.base.weight

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, layer={self.layer}, experts={self.experts}, top_k={self.top_k}, r={self.r}, "
                f"scaling={self.scaling}, reference_sparse={self.reference_sparse}")

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """``lora_e(x)`` [..., out] fp32 (x any float dtype; the dropout is this expert's own draw)."""
        return (self.moe_dropout(x.float()) @ self.moe_a[e].t()) @ self.moe_b[e].t() * self.scaling

    def _connected_zero(self) -> torch.Tensor | float:
        """0 attached to every parameter of this layer while training (DDP sees a gradient, zero, for
        experts no token chose and for a router the loss does not reach)."""
        if not (self.training and torch.is_grad_enabled()):
            return 0.0
        total = self.moe_a.sum() + self.moe_b.sum()
        if self.moe_router is not None:
            total = total + self.moe_router.weight.sum() + self.moe_router.bias.sum()
        return total * 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            delta = self._q_delta(x) if self.kind == "q" else self._k_delta(x)
            delta = delta + self._connected_zero()
        return out + delta.to(out.dtype) if isinstance(delta, torch.Tensor) else out

    # ------------------------------------------------------------------ q: dense, routed per sample

    def q_gates(self, x: torch.Tensor) -> torch.Tensor:
        """[B, E] fp32: this forward's routing (the decoding step's fixed one, or computed and kept)."""
        st = self.state
        if st.fixed_routing is not None:
            g = st.fixed_routing[self.layer]
            if g.shape[0] != x.shape[0]:
                raise RuntimeError(f"A3MoE: the cached routing holds {g.shape[0]} rows, the step {x.shape[0]}")
            return g.to(x.device, torch.float32)
        qm = st.question_mask
        if qm is None or tuple(qm.shape) != tuple(x.shape[:2]):
            raise RuntimeError("A3MoE: no question mask for this forward (call the whole LLaVA model; "
                               "training wraps its forward in a3moe.moe_inputs)")
        g = F.softmax(self.moe_router(question_mean(x, qm.to(x.device))), dim=-1)
        st.q_routing[self.layer] = g
        return g

    def _q_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.experts == 1:
            return self.expert(x, 0)
        g = self.q_gates(x)  # [B, E]
        e, r = self.experts, self.r
        if self.top_k > 0:  # sequence-level top-k: the other experts' gates are 0
            top_p, top_i = g.topk(min(self.top_k, e), dim=-1)
            if self.reference_sparse:  # theirs: the chosen expert ungated (the last in index order)
                g = torch.zeros_like(g).scatter(1, top_i.max(-1, keepdim=True).values, 1.0)
            else:
                g = torch.zeros_like(g).scatter(1, top_i, top_p)
        xf = x.float()
        if self.training and not isinstance(self.moe_dropout, nn.Identity):  # one dropout draw per expert
            h = torch.cat([self.moe_dropout(xf) @ self.moe_a[i].t() for i in range(e)], dim=-1)
        else:
            h = xf @ self.moe_a.reshape(e * r, self.in_features).t()
        # [B, T, E*r] gated per expert block, then ONE matmul with [B_1 .. B_E]: sum_e g_e B_e A_e x
        h = (h.unflatten(-1, (e, r)) * g[:, None, :, None]).flatten(-2)
        return h @ self.moe_b.permute(1, 0, 2).reshape(self.out_features, e * r).t() * self.scaling

    # ------------------------------------------------------------------ k: sparse, image tokens only

    def _k_delta(self, x: torch.Tensor) -> torch.Tensor | float:
        im = self.state.image_mask
        if im is None or tuple(im.shape) != tuple(x.shape[:2]) or not bool(im.any()):
            return 0.0
        im = im.to(x.device)
        xi = x[im]  # [P, in], batch-major
        if self.moe_router is None:
            rows_delta = self.expert(xi, 0)
        else:
            probs = F.softmax(self.moe_router(xi.float()), dim=-1)
            top_p, top_i = probs.topk(min(self.top_k, self.experts), dim=-1)
            self.state.k_probs[self.layer] = probs
            self.state.k_hard[self.layer] = torch.zeros_like(probs).scatter(1, top_i, 1.0)
            rows_delta = xi.new_zeros(xi.shape[0], self.out_features, dtype=torch.float32)
            for e in range(self.experts):
                rows, slot = torch.where(top_i == e)
                if rows.numel() == 0:
                    continue
                y = self.expert(xi[rows], e)
                if self.reference_sparse:  # theirs: no gate, and a later expert overwrites an earlier one
                    rows_delta = rows_delta.index_put((rows,), y)
                else:
                    rows_delta = rows_delta.index_add(0, rows, y * top_p[rows, slot, None])
        full = x.new_zeros(*x.shape[:2], self.out_features, dtype=torch.float32)
        return full.masked_scatter(im[..., None], rows_delta)
