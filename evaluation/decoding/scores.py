"""The score pieces the decoding methods share (re-exported by :mod:`evaluation.decoding.base`).

* :func:`plausible`: the adaptive plausibility cutoff of the contrastive methods, from the main
  branch's RAW logits (T = 1), before any temperature.
* :func:`contrast`: ``(1 + alpha) l - alpha l'``; :func:`log_probs`.
* :func:`warp`: temperature, then top-k, then top-p (transformers' order and rules).
* :class:`RowSampler`: argmax, or one draw per row from that row's own ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def plausible(scores: torch.Tensor, main_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """The adaptive plausibility cutoff (VCD's): ``scores`` with -inf wherever the main branch's RAW
    logits (T = 1) are below ``log(beta) + max``, i.e. where its probability is below ``beta * max``."""
    if beta <= 0:
        return scores
    cutoff = math.log(beta) + main_logits.max(dim=-1, keepdim=True).values
    return scores.masked_fill(main_logits < cutoff, float("-inf"))


def contrast(logits: torch.Tensor, negative: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 + alpha) l - alpha l'``, the contrastive score of VCD, DAMRO and AVISC."""
    return (1 + alpha) * logits - alpha * negative


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def warp(scores: torch.Tensor, temperature: float | None = 1.0, top_k: int | None = None,
         top_p: float | None = None) -> torch.Tensor:
    """Temperature, then top-k, then top-p (transformers' order and rules; at least one token kept)."""
    if temperature is not None and temperature != 1.0:
        scores = scores / float(temperature)
    if top_k is not None:
        k = min(int(top_k), scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - float(top_p))
        remove_sorted[..., -1] = False  # keep at least the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


class RowSampler:
    """Picks one token per row: argmax (``sample=False``), or a draw from ``softmax(scores)`` with the
    row's own ``torch.Generator`` (created on the scores' device at the first draw)."""

    def __init__(self, seeds: Sequence[int], sample: bool):
        self.seeds, self.sample = list(seeds), bool(sample)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.sample:
            return scores.argmax(dim=-1)
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(scores.float(), dim=-1)
        return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
