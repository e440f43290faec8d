"""DAMRO (Gong et al. 2024, "Dive into the Attention Mechanism of LVLM to Reduce Object
Hallucination"), as the authors' code (github coder-gx/DAMRO, their patched ``modeling_llava.py``
and ``sample_method/sample.py``).

* The outliers: the ``K`` image tokens the vision tower's CLS token attends to most, by ONE
  full-width attention ``softmax(q k^T / sqrt(C))`` (no head split, C the vision width) computed from
  the ``q_proj`` / ``k_proj`` outputs of the feature layer (the encoder layer whose output the student
  reads: ``vision_feature_layer`` -2), CLS row, CLS column dropped (:func:`cls_outliers`).
* The negative branch: the same prompt whose image tokens are only those K features, in the
  authors' order (by attention, highest first: ``torch.topk``'s), so its prompt is N - K tokens
  shorter (:func:`keep_image_tokens`); W rotates its K image positions as a plain prefill would.
* The score: ``(1 + alpha) l - alpha l_out`` on raw logits, the plausibility cutoff from the main
  branch's raw logits, then the warpers (none by default: the authors sample straight from the
  softmax, T = 1).

One vision pass: the main branch's prefill (ids + pixels, as plain generation) runs the tower, and
forward hooks keep the feature layer's q/k and the projector's output for the negative branch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evaluation.decoding import register
from evaluation.decoding._hooks import recorded_outputs
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
from student_train.families import StudentFamily

#: MedAlign's scripts run DAMRO with 1024 new tokens for both student families.
MAX_NEW_TOKENS = 1024


def cls_outliers(q: torch.Tensor, k: torch.Tensor, top_k: int) -> torch.Tensor:
    """The K image tokens the CLS token attends to most, by one full-width attention.

    Args:
        q, k: [B, 1 + N, C] ``q_proj`` / ``k_proj`` outputs of the vision layer (CLS first).
        top_k: K.
    Returns:
        [B, K] long patch indices (0..N-1, CLS excluded), highest attention first.
    """
    c = q.shape[-1]
    scores = (q[:, :1].float() @ k.float().transpose(-1, -2)).squeeze(1) * c ** -0.5  # [B, 1 + N]
    cls_row = torch.softmax(scores, dim=-1)[:, 1:]
    return torch.topk(cls_row, int(top_k), dim=1).indices


def keep_image_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                      k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LEFT-padded prompts with only their first ``k`` image tokens (the others removed).

    Every row holds the same number N of image tokens, so every row loses N - k positions and stays
    left-padded. Returns ``(input_ids, attention_mask, image_mask)`` [B, T - N + k].
    """
    rank = image_mask.long().cumsum(dim=1)
    keep = ~image_mask | (rank <= int(k))
    b = input_ids.shape[0]
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every prompt needs the same number of image tokens, got {image_mask.sum(1).tolist()}")
    return (input_ids[keep].view(b, -1), attention_mask[keep].view(b, -1), image_mask[keep].view(b, -1))


def feature_layer_projections(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(q_proj, k_proj)`` of the vision encoder layer whose output the student reads."""
    cfg = model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise MedAlignError(f"damro: the student reads several vision layers ({layer}); DAMRO needs one")
    if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
        raise MedAlignError("damro: the student keeps the vision CLS token among its image features "
                            f"(vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}); "
                            "DAMRO's outliers are patches ranked by the CLS row")
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    # hidden_states[f] is the output of layers[f - 1] for f >= 0 (index 0: the embeddings) and of layers[f] for f < 0
    attn = layers[layer if layer < 0 else layer - 1].self_attn
    return attn.q_proj, attn.k_proj


@register
class DAMRO(Method):
    name = "damro"
    summary = (
        "DAMRO (Gong et al. 2024), as the authors' code: the K outlier image tokens by the vision tower's "
        "CLS row of one full-width attention softmax(q k^T / sqrt(C)) from the feature layer's q_proj/k_proj; "
        "a negative branch whose prompt holds only those K image features; (1 + alpha) l - alpha l_out "
        "with the beta cutoff, sampling at T = 1.")
    reference_notes = (
        "its own variant (clip_encoder.get_damro_mask_idx) ranks the patches by the LAST vision layer's "
        "CLS attention averaged over heads and zeroes the other image embeddings in place (the prompt keeps "
        "its 576 positions); but its forward resets the mask (self.damro_mask_idx = None whenever "
        "inputs_embeds are given, which generate always does), so its negative branch is the main branch "
        "and its DAMRO is T = 1 sampling with the 0.1 cutoff, the same no-op as its VCD. Defaults here are "
        "its script's alpha 0.5 and K 10 (the authors' own: alpha 2, K 10); its calls pass top_k=None, "
        "top_p=1, T=1, so no warper applied there either. 1024 new tokens (both families).")
    keys = (
        Key("alpha", float, 0.5, "contrast strength: (1 + alpha) l - alpha l_out"),
        CUTOFF,
        Key("k", int, 10, "outlier image tokens kept in the negative branch"),
        SAMPLE(True),
        *WARPERS,
    )

    def check(self, args: dict[str, Any]) -> None:
        super().check(args)
        if args["k"] < 1:
            raise MedAlignError(f"damro: k must be >= 1, got {args['k']}")

    def max_new_tokens(self, family: StudentFamily) -> int:
        return MAX_NEW_TOKENS

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        model = ctx.model
        n = int(ctx.image_mask[0].sum())
        if args["k"] > n:
            raise MedAlignError(f"damro: k={args['k']} is more than the student's {n} image tokens")
        q_proj, k_proj = feature_layer_projections(model)
        main = Branch(ctx)
        with recorded_outputs({"q": q_proj, "k": k_proj, "features": model.model.multi_modal_projector}) as rec:
            first = main.prefill(input_ids=ctx.input_ids, pixel_values=ctx.pixels)
        idx = cls_outliers(rec["q"], rec["k"], int(args["k"]))  # [B, K]
        feats = rec["features"]  # [B, N, d]
        kept = torch.gather(feats, 1, idx.to(feats.device)[..., None].expand(-1, -1, feats.shape[-1]))
        ids, mask, image_mask = keep_image_tokens(ctx.input_ids, ctx.attention_mask, ctx.image_mask, int(args["k"]))
        neg = Branch(ctx, attention_mask=mask)
        first_neg = neg.prefill(inputs_embeds=ctx.embed(kept, input_ids=ids, image_mask=image_mask),
                                image_mask=image_mask)
        alpha, beta = float(args["alpha"]), float(args["beta"])

        def score(t: int, logits: list[torch.Tensor]) -> torch.Tensor:
            l, l_out = logits
            return warp(plausible(contrast(l, l_out, alpha), l, beta), args["temperature"], args["top_k"],
                        args["top_p"])

        return run_steps(ctx, [first, first_neg], [main, neg], score, ctx.sampler(args["sample"]))
