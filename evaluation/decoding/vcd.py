"""VCD, visual contrastive decoding (Leng et al., CVPR 2024), as the authors' ``vcd_sample.py``.

A second branch sees the image after a DDPM forward-noising step (``vcd_add_noise.py``: step
``noise_step`` of a 1000-step schedule ``beta = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5``,
``x' = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` on the normalised pixels; t = 500 gives
``0.863 x + 0.505 eps``). Per step: ``(1 + alpha) l - alpha l'`` on raw logits, the adaptive
plausibility cutoff from the clean branch's raw logits, then the warpers, then a draw. The noise is
drawn per question (its own stream, from ``--seed`` and the question's id), so a batch, a single
question and a resumed run see the same noised image.
"""

from __future__ import annotations

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
    contrast,
    plausible,
    run_steps,
    warp,
)
from shared.errors import MedAlignError
from student_train.families import StudentFamily

NOISE_STEPS = 1000


def ddpm_coefficients(step: int, steps: int = NOISE_STEPS) -> tuple[float, float]:
    """``(sqrt(abar_t), sqrt(1 - abar_t))`` of the authors' schedule at ``step`` (0-based, < ``steps``)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, steps)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[int(step)]
    return float(abar.sqrt()), float((1 - abar).sqrt())


def add_diffusion_noise(pixels: torch.Tensor, step: int, generators: list[torch.Generator]) -> torch.Tensor:
    """``pixels`` [B, 3, S, S] noised to DDPM step ``step``, row i with standard normal noise drawn
    (on the CPU, fp32) from ``generators[i]``; maths in fp32, returned in the pixels' dtype and device."""
    a, b = ddpm_coefficients(step)
    eps = torch.stack([torch.randn(tuple(pixels.shape[1:]), generator=g) for g in generators])
    return (a * pixels.float() + b * eps.to(pixels.device)).to(pixels.dtype)


@register
class VCD(Method):
    name = "vcd"
    summary = ("Visual contrastive decoding (Leng et al. 2024): a second branch on the image noised to DDPM "
               "step noise_step; score (1 + alpha) l - alpha l' on raw logits; tokens whose clean-branch "
               "probability is below beta * max removed (the cutoff, from raw logits at T = 1); then "
               "temperature / top_k / top_p; sampled (seeded per question, the noise too).")
    reference_notes = ("MedAlign merges the images into inputs_embeds before generate, so its VCD branch receives "
                       "the CLEAN embeddings (images_cd is never read): l' = l, and its VCD column equals T = 1 "
                       "sampling with the 0.1 cutoff. Its call passes no top_k, so transformers 4.37's default "
                       "top-k 50 applied there (here: top_k=none unless given). alpha 1, beta 0.1, noise step "
                       "500, T = 1 and 1024 new tokens for both students, as its scripts; batch size 1.")
    keys = (Key("alpha", float, 1.0, "contrast strength (0: plain sampling with the cutoff)"),
            CUTOFF,
            Key("noise_step", int, 500, f"DDPM forward step of the noised image (0..{NOISE_STEPS - 1})"),
            SAMPLE(True), *WARPERS)

    def check(self, args: dict[str, Any]) -> None:
        super().check(args)
        if args["alpha"] < 0:
            raise MedAlignError(f"vcd: alpha must be >= 0, got {args['alpha']}")
        if not 0 <= args["noise_step"] < NOISE_STEPS:
            raise MedAlignError(f"vcd: noise_step must be in 0..{NOISE_STEPS - 1}, got {args['noise_step']}")

    def uses_seed(self, args: dict[str, Any]) -> bool:
        return True  # the noise is drawn even when sample=false

    def max_new_tokens(self, family: StudentFamily) -> int:
        return 1024  # MedAlign's VCD calls, for both students

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        noised = add_diffusion_noise(ctx.pixels, args["noise_step"], ctx.generators("vcd-noise"))
        clean, noisy = Branch(ctx), Branch(ctx)
        first = [clean.prefill(input_ids=ctx.input_ids, pixel_values=ctx.pixels),
                 noisy.prefill(input_ids=ctx.input_ids, pixel_values=noised)]

        def score(_t: int, logits: list[torch.Tensor]) -> torch.Tensor:
            lc, ln = logits
            s = plausible(contrast(lc, ln, args["alpha"]), lc, args["beta"])
            return warp(s, args["temperature"], args["top_k"], args["top_p"])

        return run_steps(ctx, first, [clean, noisy], score, ctx.sampler(args["sample"]))
