"""AVISC (Woo et al. 2024, "Don't Miss the Forest for the Trees: Attentional Vision Calibration"), as
the authors' code (github sangminwoo/AvisC, ``avisc_utils/avisc_sample.py``), per question.

At the main branch's prefill (ids + pixels, as plain generation), through the attention function of
:mod:`evaluation.decoding._hooks` (the last query row only, never ``output_attentions``):

1. per decoder layer, the head-averaged attention of the last prompt token to the N image tokens;
2. the layers: the fewest, by their share of the total image attention (highest first), whose
   cumulative share reaches ``gamma`` (their ``count_top_p``: ``#(cumsum < gamma) + 1``)
   (:func:`select_layers`);
3. "blind" tokens: the image tokens whose attention averaged over those layers is at least
   ``mean + lambda std`` over the question's N tokens (:func:`blind_tokens`);
4. the negative branch: the same prompt with every NON-blind image embedding zeroed (their
   ``masking_scheme="zeros"``), W rotating its image positions as at a plain prefill.

The score is ``(1 + alpha) l - alpha l_neg`` on raw logits with the plausibility cutoff from the main
branch's raw logits, then the warpers (T = 1 by default); a row whose negative logits are not all
finite uses its main logits instead (theirs: the whole batch, on NaN).
"""

from __future__ import annotations

from typing import Any

import torch

from evaluation.decoding import register
from evaluation.decoding._hooks import (
    LastRowState,
    last_row_attention,
    recorded_outputs,
)
from evaluation.decoding.base import (
    CUTOFF,
    SAMPLE,
    WARPERS,
    Branch,
    DecodeContext,
    Key,
    Method,
    contrast,
    plausible,
    run_steps,
    warp,
)
from shared.errors import MedAlignError
from student_train.alignment import decoder_layers
from student_train.families import StudentFamily

#: MedAlign's scripts run AVISC with 1024 new tokens for both student families.
MAX_NEW_TOKENS = 1024


def select_layers(attention: torch.Tensor, gamma: float) -> torch.Tensor:
    """The fewest layers holding ``gamma`` of the image attention, per question.

    Args:
        attention: [B, L, N] head-averaged attention of the last prompt token to the image tokens.
    Returns:
        [B, L] bool, the selected layers.
    """
    share = attention.sum(-1)
    share = share / share.sum(-1, keepdim=True)
    ordered, order = torch.sort(share, dim=-1, descending=True)
    n_layers = share.shape[-1]
    count = ((ordered.cumsum(-1) < gamma).sum(-1) + 1).clamp(max=n_layers)  # [B]
    taken = torch.arange(n_layers, device=share.device)[None, :] < count[:, None]  # in sorted order
    return taken.scatter(1, order, taken)


def blind_tokens(attention: torch.Tensor, layers: torch.Tensor, lamb: float) -> torch.Tensor:
    """The "blind" image tokens: attention (averaged over the selected layers) >= mean + lambda std
    over the question's tokens (unbiased std, as ``torch.std``). attention [B, L, N], layers [B, L] bool
    -> [B, N] bool."""
    w = layers.to(attention.dtype)[..., None]
    mean_over_layers = (attention * w).sum(1) / w.sum(1)  # [B, N]
    threshold = mean_over_layers.mean(-1, keepdim=True) + lamb * mean_over_layers.std(-1, keepdim=True)
    return ~(mean_over_layers < threshold)


def finite_or(negative: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
    """Rows of ``negative`` holding a non-finite value are replaced by ``main``'s rows."""
    bad = ~torch.isfinite(negative).all(dim=-1, keepdim=True)
    return torch.where(bad, main, negative)


@register
class AVISC(Method):
    name = "avisc"
    summary = (
        "AVISC (Woo et al. 2024): at the prefill, the last prompt token's head-averaged attention to the "
        "image tokens per layer; the fewest layers holding gamma of it; blind tokens > mean + lambda std "
        "(one question's statistics); a negative branch with every non-blind image embedding zeroed; "
        "(1 + alpha) l - alpha l_neg with the beta cutoff, sampling at T = 1.")
    reference_notes = (
        "the same method and defaults (alpha 1, beta 0.1, gamma 0.5, lambda 1, zeros, T 1; top_k=None and "
        "top_p=1 are passed, so no warper), but: the image tokens are hard-coded as positions 34..610; the "
        "mean and std and the layer shares are taken over the whole batch and the masked indices of all "
        "rows are merged (batch size 1 there); the NaN fallback replaces the whole batch's negative "
        "logits. Here everything is per question. 1024 new tokens (both families).")
    keys = (
        Key("alpha", float, 1.0, "contrast strength: (1 + alpha) l - alpha l_neg"),
        CUTOFF,
        Key("gamma", float, 0.5, "share of the image attention the selected layers hold"),
        Key("lambda", float, 1.0, "blind tokens: attention >= mean + lambda std"),
        SAMPLE(True),
        *WARPERS,
    )

    def check(self, args: dict[str, Any]) -> None:
        super().check(args)
        if not 0 < args["gamma"] <= 1:
            raise MedAlignError(f"avisc: gamma must be in (0, 1], got {args['gamma']}")

    def max_new_tokens(self, family: StudentFamily) -> int:
        return MAX_NEW_TOKENS

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        model = ctx.model
        n_layers = len(decoder_layers(model))
        state = LastRowState(image_keys=ctx.image_mask, capture=True)
        main = Branch(ctx)
        with last_row_attention(model, state), recorded_outputs({"features": model.model.multi_modal_projector}) as rec:
            first = main.prefill(input_ids=ctx.input_ids, pixel_values=ctx.pixels)
        attention = torch.stack([state.captured[i] for i in range(n_layers)], dim=1)  # [B, L, N]
        blind = blind_tokens(attention, select_layers(attention, float(args["gamma"])), float(args["lambda"]))
        feats = rec["features"]
        neg = Branch(ctx)
        first_neg = neg.prefill(inputs_embeds=ctx.embed(feats * blind.to(feats.device, feats.dtype)[..., None]),
                                image_mask=ctx.image_mask)
        alpha, beta = float(args["alpha"]), float(args["beta"])

        def score(t: int, logits: list[torch.Tensor]) -> torch.Tensor:
            l, l_neg = logits
            return warp(plausible(contrast(l, finite_or(l_neg, l), alpha), l, beta), args["temperature"],
                        args["top_k"], args["top_p"])

        return run_steps(ctx, [first, first_neg], [main, neg], score, ctx.sampler(args["sample"]))
