"""DoLa (Chuang et al. 2024, "Decoding by Contrasting Layers"), as the authors' ``dola_greedy_decode``.

Each step compares the next-token distribution of the mature layer N (the last decoder layer: the
model's own logits, final norm included) with that of every candidate early ("premature") layer
j in J: ``lm_head`` applied to layer j's hidden state WITHOUT the final norm, layer 0 being the
input embeddings. That is what the authors' transformers-4.28 fork computes
(``LlamaForCausalLM.forward`` with ``early_exit_layers``: ``lm_head(outputs.hidden_states[j])``,
where ``hidden_states[j]`` for j < N is the raw residual stream and only the last entry has passed
the final norm). The early layer with the largest divergence, as their code computes it,

    JSD_j = 0.5 * [KL(M || P_N) + KL(M || P_j)] / |V|,   M = (P_N + P_j) / 2

(``F.kl_div(log P, M).mean(-1)``: a mean over the vocabulary, not a sum), is chosen per question
and step (theirs: one layer per batch, the batch mean), and the score is

    log p_N(x) - log p_j(x)   on V_head = {x : p_N(x) >= alpha * max p_N}   (at least one token), -inf elsewhere.

Greedy by default (``sample=false``); ``sample=true`` draws from the score after the warpers, as
their ``dola_sample``. Only the last position reaches ``lm_head``: forward hooks on the decoder
layers keep the last position's hidden state of the candidate layers (:class:`LayerTap`), so a step
costs one forward plus |J| one-position ``lm_head`` products.
"""

from __future__ import annotations

import math
from typing import Any, Self

import torch
import torch.nn.functional as F

from evaluation.decoding import register
from evaluation.decoding.base import (
    SAMPLE,
    WARPERS,
    Branch,
    DecodeContext,
    Key,
    Method,
    run_steps,
    warp,
)
from shared.errors import MedAlignError
from student_train.alignment import decoder_layers
from student_train.families import StudentFamily

#: MedAlign's candidate early layers for both families (32-layer LLaVA-Med, 28-layer HuatuoGPT).
MEDALIGN_LAYERS = (0, 2, 4, 6, 8, 10, 12, 14)
AUTO = "auto"
#: MedAlign's DoLa calls pass max_new_tokens=1024 for both families.
MAX_NEW_TOKENS = 1024


# --------------------------------------------------------------------------- the maths


def relative_top_mask(mature_logp: torch.Tensor, alpha: float, min_keep: int = 1) -> torch.Tensor:
    """True where a token is OUTSIDE the relative-top set of the mature layer (the authors'
    ``relative_top_filter``): ``log p < min(log(alpha) + max log p, the min_keep-th best log p)``.

    mature_logp: [B, V] log-probabilities; alpha in (0, 1).
    """
    kth = torch.sort(mature_logp, dim=-1, descending=True).values[..., min_keep - 1]
    thresh = torch.minimum(kth, mature_logp.max(dim=-1).values + math.log(alpha))
    return mature_logp < thresh[..., None]


def layer_divergence(mature_logits: torch.Tensor, early_logits: torch.Tensor) -> torch.Tensor:
    """The authors' per-layer divergence, ``0.5 * (KL(M || P_N) + KL(M || P_j))`` averaged over the
    vocabulary. mature_logits [B, V], early_logits [J, B, V] -> [J, B] (fp32)."""
    mature = mature_logits.float()[None]
    early = early_logits.float()
    m = 0.5 * (mature.softmax(-1) + early.softmax(-1))
    kl_mature = F.kl_div(mature.log_softmax(-1), m, reduction="none").mean(-1)
    kl_early = F.kl_div(early.log_softmax(-1), m, reduction="none").mean(-1)
    return 0.5 * (kl_mature + kl_early)


def dola_scores(mature_logits: torch.Tensor, early_logits: torch.Tensor,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One DoLa step. mature_logits [B, V], early_logits [J, B, V] (any float dtype).

    Returns (scores [B, V] fp32, chosen [B] long: the index into J of each row's early layer, the
    first of equal divergences). ``alpha`` 0 turns the relative-top filter off (every token scored,
    as the authors' ``relative_top=0``).
    """
    chosen = layer_divergence(mature_logits, early_logits).argmax(dim=0)
    early = early_logits[chosen, torch.arange(early_logits.shape[1], device=early_logits.device)]
    mature_logp = mature_logits.float().log_softmax(-1)
    scores = mature_logp - early.float().log_softmax(-1)
    if alpha > 0:
        scores = scores.masked_fill(relative_top_mask(mature_logp, alpha), float("-inf"))
    return scores, chosen


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` on the DoLa scores: at the tokens ``seen``
    ([B, V] bool) a negative score is multiplied by ``penalty``, a positive one divided by it."""
    if penalty == 1.0:
        return scores
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def parse_layers(value: str, mature: int) -> list[int]:
    """The candidate early layers of ``layers`` (``auto``: MedAlign's 0, 2, ..., 14 below the mature
    layer; else a comma list, each in [0, mature))."""
    if value.strip().lower() == AUTO:
        return [j for j in MEDALIGN_LAYERS if j < mature]
    try:
        out = [int(v) for v in value.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise MedAlignError(f"dola: layers must be 'auto' or a comma list of layer indices, got {value!r}") from None
    bad = [j for j in out if not 0 <= j < mature]
    if not out or bad or len(set(out)) != len(out):
        raise MedAlignError(f"dola: layers {value!r} must be distinct indices in [0, {mature}) (0 = the embeddings, "
                            f"mature layer {mature})")
    return out


# --------------------------------------------------------------------------- the hooks


class LayerTap:
    """Forward hooks keeping the LAST position's hidden state at chosen layer indices (0 = the input
    of decoder layer 0, i.e. the embeddings; j >= 1 = the output of decoder layer j - 1, after any
    hook registered before, such as the rotation W), without the final norm. A context manager."""

    def __init__(self, model: torch.nn.Module, layers: list[int]):
        self.layers = sorted(set(layers))
        self.states: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._model = model

    def __enter__(self) -> Self:
        decs = decoder_layers(self._model)
        for j in self.layers:
            if j == 0:
                self._handles.append(decs[0].register_forward_pre_hook(self._pre_hook(j), with_kwargs=True))
            else:
                self._handles.append(decs[j - 1].register_forward_hook(self._hook(j)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keep(self, j: int, hidden: torch.Tensor) -> None:
        self.states[j] = hidden[:, -1].detach().clone()  # not a view: the [B, T, d] prefill state is freed

    def _pre_hook(self, j: int):
        def hook(_module, args, kwargs):
            self._keep(j, args[0] if args else kwargs["hidden_states"])
        return hook

    def _hook(self, j: int):
        def hook(_module, _args, output):
            self._keep(j, output[0] if isinstance(output, tuple) else output)
        return hook

    def take(self, layers: list[int]) -> torch.Tensor:
        """[len(layers), B, d]: the kept states of the last forward, in the order of ``layers``."""
        missing = [j for j in layers if j not in self.states]
        if missing:
            raise RuntimeError(f"no hidden state was captured at layers {missing}")
        return torch.stack([self.states[j] for j in layers])


# --------------------------------------------------------------------------- the method


@register
class DoLa(Method):
    name = "dola"
    summary = (
        "DoLa (Chuang et al. 2024): contrast the last layer's next-token log-probabilities with those "
        "of the early layer (lm_head on its hidden state, no final norm, 0 = embeddings) that diverges "
        "most from it, log p_N - log p_j on the tokens within the relative top alpha of the last layer; "
        "greedy. The early layer is chosen per question and step by the authors' divergence "
        "(0.5 [KL(M||P_N) + KL(M||P_j)], M the mean distribution, averaged over the vocabulary). Only "
        "the last position goes through lm_head (hooks on the decoder layers).")
    reference_notes = (
        "MedAlign calls the fork's DoLa with candidate layers [0, 2, ..., 14] and mature layer 32 "
        "(LLaVA-Med) / 28 (HuatuoGPT), relative_top 0.1, 1024 new tokens for both, no repetition penalty (the DoLa authors' "
        "scripts use 1.2: repetition_penalty=1.2), and passes top_p=0.95, top_k=0, temperature=0.9 "
        "without do_sample, so the greedy DoLa path runs and those three are unused (unless the "
        "model's generation config samples). The authors' code picks one early layer for the whole "
        "batch (the divergence averaged over the rows; MedAlign's batch is 1); here it is chosen per "
        "question, so a batch answers as one-by-one. Their softmaxes run in the model's dtype "
        "(float16); here in float32. The repetition penalty, when given, counts the prompt's and the "
        "answer's tokens, as transformers does on input_ids.")
    keys = (
        Key("alpha", float, 0.1, "relative-top cutoff: keep tokens with p_N >= alpha * max p_N (0: no cutoff)"),
        Key("layers", str, AUTO, "candidate early layers, comma list (0 = embeddings); auto: 0,2,...,14 "
            "below the mature layer, MedAlign's set"),
        Key("mature", int, None, "the mature layer N (none: the last decoder layer, the model's own "
            "logits; an earlier one is read without the final norm, as the authors' code)", optional=True),
        Key("repetition_penalty", float, 1.0, "transformers' repetition penalty on the scores (1: none)"),
        SAMPLE(False), *WARPERS)

    def __init__(self) -> None:
        self.chosen: list[list[int]] = []
        """The early layer each question chose at each step in the last :meth:`decode` (diagnostics, tests)."""

    def check(self, args: dict[str, Any]) -> None:
        super().check(args)
        if not 0 <= args["alpha"] < 1:
            raise MedAlignError(f"dola: alpha must be in [0, 1), got {args['alpha']}")
        if not args["repetition_penalty"] > 0:
            raise MedAlignError(f"dola: repetition_penalty must be > 0, got {args['repetition_penalty']}")
        if args["mature"] is not None and args["mature"] < 1:
            raise MedAlignError(f"dola: mature must be >= 1, got {args['mature']}")
        if args["layers"].strip().lower() != AUTO:
            parse_layers(args["layers"], 10 ** 6)  # the syntax now; the range once the model is known

    def max_new_tokens(self, family: StudentFamily) -> int:
        return MAX_NEW_TOKENS

    def plan(self, model: torch.nn.Module, args: dict[str, Any]) -> tuple[int, list[int]]:
        """(mature layer, candidate early layers) for ``model``, checked against its depth."""
        depth = len(decoder_layers(model))
        mature = depth if args["mature"] is None else int(args["mature"])
        if mature > depth:
            raise MedAlignError(f"dola: mature {mature} is beyond the student's {depth} decoder layers")
        return mature, parse_layers(args["layers"], mature)

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        model = ctx.model
        mature, early = self.plan(model, args)
        depth = len(decoder_layers(model))
        lm_head = model.get_output_embeddings()
        alpha, penalty = float(args["alpha"]), float(args["repetition_penalty"])
        vocab = int(lm_head.weight.shape[0])
        seen = torch.zeros((ctx.batch, vocab), dtype=torch.bool, device=ctx.device)
        if penalty != 1.0:
            for i, p in enumerate(ctx.prompts):
                seen[i, torch.tensor(p, dtype=torch.long, device=ctx.device)] = True
        rows = torch.arange(ctx.batch, device=ctx.device)
        sampler = ctx.sampler(args["sample"])
        self.chosen = [[] for _ in range(ctx.batch)]
        tapped = early + ([mature] if mature < depth else [])

        with LayerTap(model, tapped) as tap:
            main = Branch(ctx)
            first = [main.prefill(input_ids=ctx.input_ids, pixel_values=ctx.pixels)]

            def score(t: int, logits: list[torch.Tensor]) -> torch.Tensor:
                early_logits = lm_head(tap.take(early))
                mature_logits = logits[0] if mature == depth else lm_head(tap.take([mature])[0])
                scores, chosen = dola_scores(mature_logits, early_logits, alpha)
                for i, c in enumerate(chosen.tolist()):
                    self.chosen[i].append(early[c])
                scores = repetition_penalty(scores, seen, penalty)
                if args["sample"]:
                    scores = warp(scores, args["temperature"], args["top_k"], args["top_p"])
                return scores

            def pick(scores: torch.Tensor) -> torch.Tensor:
                tokens = sampler(scores)
                seen[rows, tokens] = True
                return tokens

            return run_steps(ctx, first, [main], score, pick)
