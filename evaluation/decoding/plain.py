"""The plain decodings: greedy, beam search and nucleus sampling, through transformers' ``generate``.

``generate`` is the reference implementation of these and the fastest path (one call per batch);
the contrastive methods use :func:`evaluation.decoding.base.run_steps` instead. Nucleus sampling
draws per question with :class:`PerQuestionSampler` (a logits processor), so ``generate``'s own
step stays greedy and a batch gives each question the tokens it gets alone.
"""

from __future__ import annotations

from typing import Any

import torch

from evaluation.decoding import register
from evaluation.decoding.base import SAMPLE, DecodeContext, Key, Method, warp
from shared.errors import MedAlignError


class PerQuestionSampler:
    """Nucleus sampling with one random stream per batch row (a transformers logits processor).

    Each step, row i's scores are divided by ``temperature``, cut to the smallest set of tokens
    whose probability reaches ``top_p`` (at least one token; transformers' ``TopPLogitsWarper``
    rule), and one token is drawn with row i's own ``torch.Generator``; the returned scores are
    ``-inf`` except at that token, so ``generate``'s greedy step takes it. Rows never share random
    numbers, so a batch gives each question the tokens it gets alone.
    """

    def __init__(self, seeds: list[int], top_p: float, temperature: float):
        self.seeds, self.top_p, self.temperature = list(seeds), float(top_p), float(temperature)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = warp(scores.float(), self.temperature, None, self.top_p).softmax(dim=-1)
        out = torch.full_like(scores, float("-inf"))
        for i, g in enumerate(self.generators):
            token = torch.multinomial(probs[i], 1, generator=g)
            out[i, token] = 0.0
        return out


def _generate(ctx: DecodeContext, **kwargs: Any) -> list[list[int]]:
    """One ``model.generate`` call on the batch; rows cut at their first EOS (excluded)."""
    gen = ctx.gen
    out = gen.model.generate(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, pixel_values=ctx.pixels,
                             pad_token_id=ctx.pad_id, eos_token_id=ctx.eos_ids,
                             max_new_tokens=int(ctx.max_new_tokens), **kwargs)
    result = []
    for row in out[:, ctx.input_ids.shape[1]:].cpu().tolist():
        cut = next((i for i, t in enumerate(row) if t in gen.eos_ids), len(row))
        result.append(row[:cut])
    return result


class _Deterministic(Method):
    def check(self, args: dict[str, Any]) -> None:
        super().check(args)
        if args["sample"]:
            raise MedAlignError(f"--decoding {self.name} does not sample (sample=true): use --decoding nucleus")


@register
class Greedy(_Deterministic):
    name = "greedy"
    summary = "The most likely token at every step (do_sample False, 1 beam)."
    reference_notes = "The reference's scripts report greedy too (same settings)."
    keys = (SAMPLE(False),)

    def generate_kwargs(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": 1}

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        return _generate(ctx, **self.generate_kwargs(args))


@register
class Beam(_Deterministic):
    name = "beam"
    summary = ("Beam search (the paper's and the reference's default decoding): num_beams beams, no sampling, "
               "no early_stopping (transformers' default: stop when no running beam can beat the finished ones).")
    reference_notes = "The reference passes no early_stopping either; 5 beams."
    keys = (Key("num_beams", int, 5, "beams"), SAMPLE(False))

    def check(self, args: dict[str, Any]) -> None:
        super().check(args)
        if args["num_beams"] < 1:
            raise MedAlignError(f"beam: num_beams must be >= 1, got {args['num_beams']}")

    def generate_kwargs(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": int(args["num_beams"])}

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        return _generate(ctx, **self.generate_kwargs(args))


@register
class Nucleus(Method):
    name = "nucleus"
    summary = ("Nucleus (top-p) sampling at a temperature, each question drawing from its own stream "
               "(seeded by --seed and its id). sample=false: the argmax, i.e. greedy.")
    reference_notes = ""
    keys = (Key("top_p", float, 0.9, "nucleus mass"), Key("temperature", float, 1.0, "softmax temperature"),
            SAMPLE(True))

    def generate_kwargs(self, args: dict[str, Any]) -> dict[str, Any]:
        # the draw happens in PerQuestionSampler, which leaves one finite score per row
        return {"do_sample": False, "num_beams": 1}

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        from transformers import LogitsProcessorList

        extra: dict[str, Any] = {}
        if args["sample"]:
            extra["logits_processor"] = LogitsProcessorList(
                [PerQuestionSampler(ctx.seeds, args["top_p"], args["temperature"])])
        return _generate(ctx, **self.generate_kwargs(args), **extra)
