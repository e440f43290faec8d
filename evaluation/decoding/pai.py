"""PAI (Liu et al. 2025, "Paying More Attention to Image"), as the authors' code (github LALBJ/PAI).

Two parts:

* the attention intervention (their ``attention.py``): in decoder layers ``[start_layer, L)`` the
  pre-softmax scores of the LAST query row of every forward of the image branch (the prefill
  included) to the image keys become ``s + alpha |s|``. With a KV cache the last row of each forward
  is the newest position, so every answer token's hidden states (and so its cached keys and values)
  are computed with the boost, as is the last prompt token's. It is the attention function of
  :mod:`evaluation.decoding._hooks`, switched off for the text-only branch;
* the guidance (their ``CFG.py``): a second branch on the same prompt without the image tokens,
  ``gamma (l_c - l_u) + l_u`` on log-probabilities, tokens below ``beta`` times the main branch's
  top probability removed; greedy (argmax). ``gamma = 1`` is plain decoding and runs no second
  branch (as theirs: the processor returns the main scores).
"""

from __future__ import annotations

from typing import Any

import torch

from evaluation.decoding import register
from evaluation.decoding._hooks import LastRowState, last_row_attention
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
from student_train.alignment import decoder_layers
from student_train.families import StudentFamily

#: MedAlign's scripts run PAI with 1024 new tokens for both student families.
MAX_NEW_TOKENS = 1024


def guidance(log_p_image: torch.Tensor, log_p_text: torch.Tensor, gamma: float) -> torch.Tensor:
    """PAI's score ``gamma (l_c - l_u) + l_u`` on log-probabilities (l_c: with the image, l_u: text only)."""
    return gamma * (log_p_image - log_p_text) + log_p_text


class SwitchedBranch(Branch):
    """A :class:`Branch` that sets PAI's boost on (image branch) or off (text-only branch) for its forwards."""

    def __init__(self, ctx: DecodeContext, state: LastRowState, boost: bool,
                 attention_mask: torch.Tensor | None = None):
        super().__init__(ctx, attention_mask)
        self.state, self.boost = state, bool(boost)

    def prefill(self, **kw) -> torch.Tensor:
        self.state.boost = self.boost
        return super().prefill(**kw)

    def step(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        self.state.boost = self.boost
        return super().step(tokens, **kw)


@register
class PAI(Method):
    name = "pai"
    summary = (
        "PAI (Liu et al. 2025): in decoder layers [start_layer, L) the last query row's pre-softmax "
        "scores to the image keys get + alpha |score| (every image-branch forward, prefill included), "
        "plus guidance against the text-only prompt, gamma (l_c - l_u) + l_u on log-probabilities with "
        "the beta cutoff; greedy.")
    reference_notes = (
        "model_vqa.py calls llama_modify(..., use_attn=True, use_cfg=True), and the boost only "
        "applies while use_cfg is False: the flag is True until the guidance processor's first call "
        "resets it, so the main prefill (the first answer token) runs without the boost and the later "
        "steps with it. Its text-only prompt is BOS + the bare question (init_cfg_processor gets "
        "cur_prompt, without the conversation template); here it is the same templated prompt with the "
        "image tokens removed, as the authors' code. The image keys are hard-coded as positions 34..610; "
        "here they come from the prompt's image tokens. Batch size 1 there (its attention mask handling "
        "keeps row 0 only). Same alpha 0.2, gamma 1.1, cutoff 0.1, layers [2, L), greedy, 1024 new "
        "tokens (both families).")
    keys = (
        Key("alpha", float, 0.2, "attention boost: image-key scores s -> s + alpha |s| in the last query row"),
        Key("gamma", float, 1.1, "guidance scale: gamma (l_c - l_u) + l_u (1: no text-only branch)"),
        CUTOFF,
        Key("start_layer", int, 2, "first decoder layer of the boost (the boost covers [start_layer, L))"),
        SAMPLE(False),
        *WARPERS,
    )

    def check(self, args: dict[str, Any]) -> None:
        super().check(args)
        if args["alpha"] < 0:
            raise MedAlignError(f"pai: alpha must be >= 0, got {args['alpha']}")
        if args["gamma"] < 0:
            raise MedAlignError(f"pai: gamma must be >= 0, got {args['gamma']}")
        if args["start_layer"] < 0:
            raise MedAlignError(f"pai: start_layer must be >= 0, got {args['start_layer']}")

    def max_new_tokens(self, family: StudentFamily) -> int:
        return MAX_NEW_TOKENS

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        n_layers = len(decoder_layers(ctx.model))
        if args["start_layer"] >= n_layers:
            raise MedAlignError(f"pai: start_layer {args['start_layer']} is past the student's {n_layers} "
                                f"decoder layers (valid 0..{n_layers - 1})")
        gamma, beta = float(args["gamma"]), float(args["beta"])
        state = LastRowState(image_keys=ctx.image_mask, layers=range(int(args["start_layer"]), n_layers),
                             alpha=float(args["alpha"]))

        def score(t: int, logits: list[torch.Tensor]) -> torch.Tensor:
            lc = log_probs(logits[0])
            s = lc if len(logits) == 1 else plausible(guidance(lc, log_probs(logits[1]), gamma), logits[0], beta)
            return warp(s, args["temperature"], args["top_k"], args["top_p"])

        with last_row_attention(ctx.model, state):
            main = SwitchedBranch(ctx, state, boost=True)
            branches, first = [main], [main.prefill(input_ids=ctx.input_ids, pixel_values=ctx.pixels)]
            if gamma != 1.0:
                ids, mask = ctx.without_image()
                text = SwitchedBranch(ctx, state, boost=False, attention_mask=mask)
                first.append(text.prefill(input_ids=ids))
                branches.append(text)
            return run_steps(ctx, first, branches, score, ctx.sampler(args["sample"]))
