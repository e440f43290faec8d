"""M3ID, multi-modal mutual-information decoding (Favero et al., CVPR 2024).

A second branch reads the same prompt WITHOUT its image tokens (the text-only "unconditioned"
model). With ``gamma_t = exp(-lambda t)``, ``t`` counting the answer's tokens from 1 (the first new
token has t = 1, as the authors' code), the score on log-probabilities is
``l_c + ((1 - gamma_t) / gamma_t) (l_c - l_u)``: the correction toward the image grows as the
answer gets longer and the language prior takes over. Then the plausibility cutoff (from the main
branch's raw logits), temperature / top_k / top_p, and a draw (seeded per question). The paper's
uncertainty gate (correct only where the main branch's top-1 probability is below ``threshold``)
is the ``threshold`` key, off by default as in MedAlign's code.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from evaluation.decoding import register
from evaluation.decoding.base import (
    CUTOFF,
    SAMPLE,
    WARPERS,
    Branch,
    DecodeContext,
    Key,
    Method,
    log_probs,
    plausible,
    run_steps,
    warp,
)
from shared.errors import MedAlignError
from student_train.families import StudentFamily


def m3id_scores(main_logits: torch.Tensor, text_logits: torch.Tensor, t: int, lam: float,
                threshold: float | None = None) -> torch.Tensor:
    """``l_c + ((1 - g) / g) (l_c - l_u)`` with ``g = exp(-lam t)`` on log-probabilities; with a
    ``threshold``, rows whose top-1 probability (main branch, T = 1) is at or above it keep ``l_c``."""
    lc, lu = log_probs(main_logits), log_probs(text_logits)
    g = math.exp(-float(lam) * int(t))
    scores = lc + ((1 - g) / g) * (lc - lu)
    if threshold is not None:
        uncertain = lc.max(dim=-1, keepdim=True).values.exp() < float(threshold)
        scores = torch.where(uncertain, scores, lc)
    return scores


@register
class M3ID(Method):
    name = "m3id"
    summary = ("Multi-modal mutual-information decoding (Favero et al. 2024): a second branch on the prompt "
               "without its image tokens; l_c + ((1 - g_t) / g_t)(l_c - l_u) on log-probabilities with "
               "g_t = exp(-lambda t), t = 1 for the first answer token; the beta cutoff from the main branch's "
               "raw logits; then temperature / top_k / top_p; sampled (seeded per question).")
    reference_notes = ("Its lambda is hard-coded 0.02 (the lamb=1.0 it passes is not read), beta 0.1, T = 1 for "
                       "LLaVA-Med and 0.7 for HuatuoGPT, top_p 1 and top_k None (no warper), 1024 new tokens for "
                       "both students, no uncertainty gate, batch size 1. Its text-only branch cuts the image "
                       "embeddings at the hard-coded positions 34..610 and passes an attention mask one column "
                       "short (harmless at batch 1 with no padding); here the image tokens are removed from the "
                       "prompt ids, so any template and batch works.")
    keys = (Key("lambda", float, 0.02, "decay of gamma_t = exp(-lambda t) (0: gamma 1, no correction)"),
            CUTOFF,
            Key("threshold", float, None, "the paper's uncertainty gate: correct only where the main branch's "
                "top-1 probability is below it (none: always)", optional=True),
            SAMPLE(True), *WARPERS)

    def defaults(self, family: StudentFamily) -> dict[str, Any]:
        d = super().defaults(family)
        d["temperature"] = 0.7 if family.name == "huatuo" else 1.0  # MedAlign's two scripts
        return d

    def check(self, args: dict[str, Any]) -> None:
        super().check(args)
        if args["lambda"] < 0:
            raise MedAlignError(f"m3id: lambda must be >= 0, got {args['lambda']}")
        if args["threshold"] is not None and not 0 < args["threshold"] <= 1:
            raise MedAlignError(f"m3id: threshold must be in (0, 1], got {args['threshold']}")

    def max_new_tokens(self, family: StudentFamily) -> int:
        return 1024  # MedAlign's M3ID calls, for both students

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        text_ids, text_mask = ctx.without_image()
        main, text = Branch(ctx), Branch(ctx, attention_mask=text_mask)
        first = [main.prefill(input_ids=ctx.input_ids, pixel_values=ctx.pixels), text.prefill(input_ids=text_ids)]

        def score(t: int, logits: list[torch.Tensor]) -> torch.Tensor:
            lc, lu = logits
            s = plausible(m3id_scores(lc, lu, t, args["lambda"], args["threshold"]), lc, args["beta"])
            return warp(s, args["temperature"], args["top_k"], args["top_p"])

        return run_steps(ctx, first, [main, text], score, ctx.sampler(args["sample"]))
