"""OPERA (Huang et al. 2024, "Over-trust Penalty and Retrospection-Allocation"), as the authors'
``opera_beam_search`` (their transformers-4.29 fork), on transformers' ``DynamicCache``.

A beam search (K = 5 beams) whose step score is computed from the top C = 5 candidates of each
beam by raw logits (every other token :data:`FILL` = -999, then log-softmax): each candidate's
logit minus an over-trust penalty read from the last decoder layer's attention over the answer
(max over heads, rows renormalised), in the local window of the answer tokens so far plus the
candidate, times ``scale_factor``: the penalty is ``max_j 1e-7 * prod_{i>=j} window[i, j]`` (a
column that every later token attends to strongly is a "summary token"), and for the first 10
answer tokens minus the candidate's attention mass on the image instead (a bonus). Retrospection:
when every beam's history of summary locations holds more than ``threshold`` entries at the current
location (10 or later), the search goes back to the token after it and forbids the tokens chosen
there, at most C times per position (rules: :mod:`evaluation.decoding._opera_rules`).

How it runs here: one question at a time (a rollback rewinds one question; the K beams of a
question run as a batch). The prompt is prefilled once and its cache repeated for the beams
(``Branch.select``); each step feeds the K chosen tokens (``Branch.step``), then the K x C
candidates in ONE forward of C tokens per beam whose 4D mask lets each candidate see the cache and
itself only (all at the same position), after which the cache is cropped back; a rollback crops
the cache to the prompt and re-feeds the restored beams' answers in one forward. The attention rows
come from an attention function registered with transformers' ``AttentionInterface``
(:data:`OPERA_IMPL`: SDPA for every layer, plus, for the last layer's queries only, their
probabilities in fp32); ``output_attentions`` is never used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from evaluation.decoding import register
from evaluation.decoding._opera_rules import (
    FILL,
    SCORE_DTYPES,
    Hypotheses,
    Retrospection,
    candidates,
    mode,
    over_trust,
    select_beams,
)
from evaluation.decoding.base import SAMPLE, Branch, DecodeContext, Key, Method
from shared.errors import MedAlignError
from student_train.alignment import decoder_layers, unwrap
from student_train.families import StudentFamily

#: The attention implementation registered by this module.
OPERA_IMPL = "medalign_opera"
_MARK = "_medalign_opera_capture"
#: MedAlign's settings per student family (``llava-med-1.5`` / ``huatuoGPT_V`` ``model_vqa.py``).
FAMILY_DEFAULTS = {"llava-med": {"scale_factor": 25.0, "threshold": 25},
                   "huatuo": {"scale_factor": 50.0, "threshold": 15}}
MAX_NEW_TOKENS = 128


# --------------------------------------------------------------------------- the attention function


@dataclass
class Capture:
    """The last layer's attention probabilities of the current forward's queries, while ``active``."""

    active: bool = False
    rows: torch.Tensor | None = None
    """[B, q, S] fp32: max over heads of the softmax probabilities (0 where masked)."""


def _allowed(mask: torch.Tensor | None, b: int, q: int, s: int, device: torch.device) -> torch.Tensor:
    """The attention mask as bool [B, 1, q, S] (True = attend); None = causal, the queries last."""
    if mask is None:
        keys = torch.arange(s, device=device)
        rows = torch.arange(q, device=device) + (s - q)
        return (keys[None, :] <= rows[:, None])[None, None].expand(b, 1, q, s)
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask[:, :1].expand(b, 1, q, s)


def opera_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """SDPA for every layer; at the marked (last) layer, while its :class:`Capture` is active, also
    the max-over-heads attention probabilities of the queries (GQA without repeating the keys)."""
    cap: Capture | None = getattr(module, _MARK, None)
    if cap is not None and cap.active:
        b, h, q, d = query.shape
        hkv, s = key.shape[1], key.shape[2]
        scale = scaling if scaling is not None else d ** -0.5
        with torch.autocast(device_type=query.device.type, enabled=False):
            qf = query.float().reshape(b, hkv, (h // hkv) * q, d)
            scores = ((qf @ key.float().transpose(-1, -2)) * scale).reshape(b, h, q, s)
            scores = scores.masked_fill(~_allowed(attention_mask, b, q, s, query.device), float("-inf"))
            cap.rows = torch.nan_to_num(scores.softmax(-1), nan=0.0).amax(dim=1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


_registered = False


def register_attention() -> None:
    """Register :data:`OPERA_IMPL` with the attention and the attention-mask interfaces, once."""
    global _registered
    if not _registered:
        AttentionInterface.register(OPERA_IMPL, opera_attention_forward)
        AttentionMaskInterface.register(OPERA_IMPL, sdpa_mask)
        _registered = True


@contextlib.contextmanager
def last_layer_capture(model: torch.nn.Module) -> Iterator[Capture]:
    """Inside, the language model runs on :data:`OPERA_IMPL` and its last layer's attention reports
    to the yielded :class:`Capture`; both are restored after."""
    base = unwrap(model)
    register_attention()
    module = decoder_layers(base)[-1].self_attn
    previous = base.config.text_config._attn_implementation
    cap = Capture()
    setattr(module, _MARK, cap)
    base.set_attn_implementation({"text_config": OPERA_IMPL})
    try:
        yield cap
    finally:
        delattr(module, _MARK)
        base.set_attn_implementation({"text_config": previous})


# --------------------------------------------------------------------------- the beams' stream


class BeamBranch(Branch):
    """A :class:`Branch` for the beams of one question, with the two forwards OPERA adds."""

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # embeddings, not ids: a generated image-token id is never taken for an image position (W)
        return self.model.get_input_embeddings()(tokens.to(self.attention_mask.device))

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed m tokens per row ([K, m], m >= 1) in one forward -> the last one's next logits [K, V] fp32."""
        k, m = tokens.shape
        start = self.attention_mask.sum(-1, keepdim=True)
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((k, m))], dim=1)
        pos = start + torch.arange(m, device=start.device)[None]
        return self._forward(inputs_embeds=self._embed(tokens), position_ids=pos)

    def probe(self, tokens: torch.Tensor, cap: Capture) -> torch.Tensor:
        """The last layer's attention rows of C candidate tokens per row ([K, C]), each seeing the
        cache and itself only (one forward, the same position for all); the cache is left as it was.

        Returns [K, C, S + 1] fp32 (max over heads): the S cached keys, then the candidate itself.
        """
        k, c = tokens.shape
        s = self.length
        allowed = torch.zeros((k, 1, c, s + c), dtype=torch.bool, device=self.attention_mask.device)
        allowed[..., :s] = self.attention_mask.bool()[:, None, None, :]
        allowed[..., s:] = torch.eye(c, dtype=torch.bool, device=allowed.device)
        pos = self.attention_mask.sum(-1, keepdim=True).expand(k, c)
        cap.active = True
        try:
            self.model(inputs_embeds=self._embed(tokens), attention_mask=allowed, position_ids=pos, cache=self.cache,
                       use_cache=True, logits_to_keep=1, **self.forward_kwargs)
        finally:
            cap.active = False
            self.cache.crop(-c)
        rows = cap.rows  # [K, C, S + C]
        own = torch.diagonal(rows[..., s:], dim1=-2, dim2=-1)
        return torch.cat([rows[..., :s], own[..., None]], dim=-1)


def _renormalised(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.sum(-1, keepdim=True)


# --------------------------------------------------------------------------- the method


@register
class Opera(Method):
    name = "opera"
    summary = (
        "OPERA (Huang et al. 2024), as the authors' opera_beam_search: beam search over the top "
        "num_attn_candidates tokens of each beam (by raw logits; the others -999, then log-softmax), each "
        "minus penalty_weights x an over-trust penalty from the last layer's attention over the answer "
        "(max over heads, rows renormalised, times scale_factor; per column j 1e-7 x the product of the "
        "column from row j down; the penalty = the largest column score; for the first 10 answer tokens "
        "minus the attention mass on the image instead); rollback (retrospection) when every beam's "
        "history holds more than threshold summary locations at the current one (from position 10 on), "
        "rejecting the tokens chosen after it, at most num_attn_candidates times per position. One "
        "question at a time (its beams batched).")
    reference_notes = (
        "MedAlign runs it with 5 beams, 5 candidates, penalty weight 1, 128 new tokens, scale_factor 25 "
        "and threshold 25 for LLaVA-Med but 50 and 15 (the authors' defaults) for HuatuoGPT; here the "
        "student's family chooses the same. Its key_position hard-codes the image as columns 34..610 "
        "(577 columns, one past LLaVA-Med's 576 image tokens; here the prompt's image tokens) and starts "
        "the answer window at the prompt length (LLaVA-Med) or one before it (HuatuoGPT: the last prompt "
        "token joins the products; here the answer always). MedAlign's copy of opera_beam_search is in "
        "its transformers 4.37 fork (transformers.zip, not readable in the stored snapshot); what follows "
        "holds if it is the authors' code unchanged. Their column scores are a float16 tensor and, on a "
        "float16 model, the attention and the product are float16 too: scores under ~6e-8 round to 0 "
        "(the location then falls on column 0, which never triggers a rollback) and over 65504 to inf; "
        "score_dtype=model (default) keeps that arithmetic for the model's dtype, float32 does not round. "
        "Finished beams score sum log p / answer length (EOS included): 4.37's scorer with the prompt "
        "passed as inputs_embeds, MedAlign's case (the authors' 4.29 divides by the whole sequence, prompt "
        "included). Kept from their code: the per-beam location history is not reordered with the "
        "beams, the restored step's finished-beam list stays the live one, rejected tokens persist at "
        "their position, and nothing rolls back past their 512-token window. Their rollback rebuilds the "
        "context from input_ids[:, 1:-1], written for 4.29, where an inputs_embeds prompt starts the ids "
        "with one BOS; on 4.37 those ids hold only the answer, so the rebuilt context lacks the answer's "
        "first token; here the cache is cropped to the prompt and the whole restored answer re-fed. "
        "Their attention comes from output_attentions on the whole model in its dtype; here only the "
        "last layer's rows, in float32. Ties between equal scores (the -999 fills) go by token index. "
        "No sampling variant (sample=true is refused), as theirs.")
    keys = (
        Key("num_beams", int, 5, "beams"),
        Key("num_attn_candidates", int, 5, "candidates per beam (also the rollbacks allowed per position)"),
        Key("scale_factor", float, 50.0, "scale of the attention in the column products (MedAlign: "
            "LLaVA-Med 25, HuatuoGPT 50)"),
        Key("threshold", int, 15, "rollback when every beam's history holds more than this many summary "
            "locations at the current one (MedAlign: LLaVA-Med 25, HuatuoGPT 15)"),
        Key("penalty_weights", float, 1.0, "weight of the penalty subtracted from the candidates' logits"),
        Key("score_dtype", str, "model", "arithmetic of the column scores: model (the authors' rounding "
            "for the model's dtype, stored in float16) | float32"),
        SAMPLE(False))

    def __init__(self) -> None:
        self.rollbacks: list[int] = []
        """The rollbacks each question of the last :meth:`decode` took (diagnostics; the tests read it)."""

    def defaults(self, family: StudentFamily) -> dict[str, Any]:
        out = super().defaults(family)
        out.update(FAMILY_DEFAULTS.get(family.name, {}))
        return out

    def max_new_tokens(self, family: StudentFamily) -> int:
        return MAX_NEW_TOKENS

    def check(self, args: dict[str, Any]) -> None:
        super().check(args)
        if args["sample"]:
            raise MedAlignError("opera is a beam search without a sampling variant; sample=true is not supported")
        for k in ("num_beams", "num_attn_candidates"):
            if args[k] < 1:
                raise MedAlignError(f"opera: {k} must be >= 1, got {args[k]}")
        if args["threshold"] < 0:
            raise MedAlignError(f"opera: threshold must be >= 0, got {args['threshold']}")
        if not args["scale_factor"] > 0:
            raise MedAlignError(f"opera: scale_factor must be > 0, got {args['scale_factor']}")
        if args["score_dtype"] not in SCORE_DTYPES:
            raise MedAlignError(f"opera: score_dtype must be one of {', '.join(SCORE_DTYPES)}, got "
                                f"{args['score_dtype']!r}")

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        self.rollbacks = []
        out = []
        with last_layer_capture(ctx.model) as cap:
            for i in range(ctx.batch):
                tokens, count = self._answer(ctx, i, args, cap)
                out.append(tokens)
                self.rollbacks.append(count)
        return out

    def _answer(self, ctx: DecodeContext, i: int, args: dict[str, Any], cap: Capture) -> tuple[list[int], int]:
        """One question's beam search -> (its answer, cut before EOS; the rollbacks taken)."""
        k, c = int(args["num_beams"]), int(args["num_attn_candidates"])
        scale, weight = float(args["scale_factor"]), float(args["penalty_weights"])
        dtype = None if args["score_dtype"] == "float32" else ctx.model.dtype
        dev = ctx.device
        prompt = torch.tensor([ctx.prompts[i]], dtype=torch.long, device=dev)
        t = prompt.shape[1]
        image = prompt[0] == ctx.gen.image_token_id
        branch = BeamBranch(ctx, attention_mask=torch.ones_like(prompt))
        first = branch.prefill(input_ids=prompt, pixel_values=ctx.pixels[i:i + 1]).expand(k, -1)
        branch.select(torch.zeros(k, dtype=torch.long, device=dev))
        logits, vocab = first, first.shape[-1]

        hyps, retro = Hypotheses(k), Retrospection(int(args["threshold"]), c)
        tokens = torch.zeros((k, 0), dtype=torch.long, device=dev)
        beam_scores = torch.full((k,), -1e9, device=dev)
        beam_scores[0] = 0.0
        attn = torch.zeros((k, 0, 0), device=dev)
        sel_tokens = sel_beams = new_row = None
        while True:
            state = retro.snapshot(tokens, hyps, beam_scores, sel_tokens, sel_beams)
            if new_row is not None:  # the row of the token the last selection fed
                attn = torch.cat([F.pad(attn, (0, 1))[sel_beams], new_row[:, None, :]], dim=1)
            state.attn = attn
            n = tokens.shape[1]
            cand_logits, cand_tokens = candidates(logits, c)
            rows = _renormalised(branch.probe(cand_tokens, cap))  # [K, C, T + n + 1]
            image_mass = rows[..., :t][..., image].sum(-1)
            window = torch.cat([F.pad(attn, (0, 1))[:, None].expand(k, c, n, n + 1), rows[:, :, None, t:]], dim=2)
            penalty, loc = over_trust(window, image_mass, scale, dtype)
            beam_locs = mode(loc)
            retro.push(state, beam_locs)
            cand_scores = cand_logits - weight * penalty if weight else cand_logits
            back = retro.check(int(mode(beam_locs[None])[0]), n + 1, vocab)
            if back is None:
                next_logits = torch.full((k, vocab), FILL, device=dev).scatter(-1, cand_tokens, cand_scores)
            else:  # retrospection: return to the restored step, its chosen tokens forbidden
                st = back.restore
                tokens, hyps, beam_scores, attn = st.tokens, st.hyps, st.beam_scores, st.attn
                branch.truncate(t)
                logits = branch.feed(tokens) if tokens.shape[1] else first
                next_logits = logits - (999.0 + logits.min(dim=-1, keepdim=True).values)
                next_logits = next_logits.reshape(-1).index_fill(0, back.rejected, FILL).reshape(k, vocab)
            scores = next_logits.log_softmax(dim=-1) + beam_scores[:, None]
            beam_scores, sel_tokens, sel_beams = select_beams(scores, tokens, hyps, ctx.eos_ids, k)
            tokens = torch.cat([tokens[sel_beams], sel_tokens[:, None]], dim=1)
            if hyps.done or tokens.shape[1] >= ctx.max_new_tokens:
                break
            branch.select(sel_beams)
            cap.active = True
            try:
                logits = branch.step(sel_tokens)
            finally:
                cap.active = False
            new_row = _renormalised(cap.rows[:, -1])[:, t:]
        if not hyps.done:
            for b in range(k):
                hyps.add(tokens[b].tolist(), float(beam_scores[b]), tokens.shape[1])
        best = hyps.best()
        cut = next((j for j, tok in enumerate(best) if tok in ctx.eos_ids), len(best))
        return best[:cut], retro.count
