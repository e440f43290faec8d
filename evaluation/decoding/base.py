"""The decoding interface of ``medalign-eval generate --decoding NAME``: what a method module writes.

A method is one module in this package holding a :class:`Method` subclass decorated with
:func:`evaluation.decoding.register` (the registry imports every module of the package, so a new
module needs no other edit). Skeleton::

    from evaluation.decoding import register
    from evaluation.decoding.base import CUTOFF, SAMPLE, WARPERS, Branch, Key, Method, contrast, plausible, run_steps, warp

    @register
    class MyMethod(Method):
        name = "mine"
        summary = "What it does, with the paper (first line = the one-line summary)."
        reference_notes = "How MedAlign's code does it differently ('' when it does not)."
        keys = (Key("alpha", float, 1.0, "contrast strength"), CUTOFF,
                SAMPLE(True), *WARPERS)
        def check(self, args):                # range checks (call super: temperature, top_k, top_p, beta)
            super().check(args); ...          # raise MedAlignError
        def decode(self, ctx, args):          # -> list[list[int]], one token list per question
            main, neg = Branch(ctx), Branch(ctx)
            first = [main.prefill(input_ids=ctx.input_ids, pixel_values=ctx.pixels),
                     neg.prefill(inputs_embeds=..., image_mask=ctx.image_mask)]
            def score(t, logits):             # t = 1 for the first new token
                l, ln = logits
                return warp(plausible(contrast(l, ln, args["alpha"]), l, args["beta"]),
                            args["temperature"], args["top_k"], args["top_p"])
            return run_steps(ctx, first, [main, neg], score, ctx.sampler(args["sample"]))

Pieces:

* :class:`Key` ``(name, type, default, help)``: one ``--decoding-arg KEY=VALUE``; ``type`` is bool,
  int, float or str; ``optional=True`` also accepts ``none``. Keys are named after the paper's
  symbols (``alpha``, ``beta``, ``lambda``, ``gamma``...). Every method has ``sample`` (:data:`SAMPLE`).
* :class:`Method`: class attributes ``name``, ``summary``, ``reference_notes``, ``keys``;
  ``defaults(family) -> dict`` (override for family-dependent defaults, e.g. HuatuoGPT's T);
  ``check(args)``; ``uses_seed(args)`` (default: ``args["sample"]``; a method drawing noise says
  True); ``max_new_tokens(family)`` (``--max-new-tokens auto``; default the family's);
  ``decode(ctx, args) -> list[list[int]]``, tokens cut before the first EOS (excluded).
  ``args`` holds every key, resolved (defaults, then the user's values, typed).
* :class:`DecodeContext` ``ctx``: ``gen`` (the :class:`evaluation.generate.Generator`: ``model``,
  ``tokenizer``, ``image_token_id``...), ``model`` (the bare ``LlavaForConditionalGeneration``),
  LEFT-padded ``input_ids``/``attention_mask`` [B, T] on the device, ``prompts`` (the unpadded id
  lists), ``pixels`` [B, 3, S, S] (device, model dtype), ``image_mask`` [B, T] (= ``input_ids ==
  image_token_id`` of the PROMPT; never look for image tokens in generated text), ``seeds`` (one
  per question: :func:`question_seed` of ``--seed`` and its id), ``max_new_tokens``, ``eos_ids``,
  ``pad_id``, ``family``. ``ctx.sampler(sample)`` -> a :class:`RowSampler`; ``ctx.generators(salt)``
  -> one CPU ``torch.Generator`` per question for other randomness (e.g. VCD's noise);
  ``ctx.without_image()`` -> the prompts with the image tokens removed, left-padded (text-only
  branches); ``ctx.image_features(pixels)`` [B, N, d] and ``ctx.embed(features, input_ids=None,
  image_mask=None)`` -> ``inputs_embeds`` with those features at the image positions.
* :class:`Branch`: one forward stream with its own ``DynamicCache`` and attention mask; position ids
  from the mask (``cumsum - 1``, as ``generate``), so a padded row computes what it computes alone.
  ``prefill(input_ids=, pixel_values=)`` or ``prefill(inputs_embeds=, image_mask=)`` (W rotates
  ``image_mask``'s positions, exactly as a plain prefill: :func:`student_train.alignment.visual_positions`;
  A3MoE's k experts act there too, :func:`student_train.a3moe.image_positions`; its q routing is
  computed at each branch's prefill and kept on that branch's cache, so ``step`` / ``select`` follow it)
  -> fp32 logits of the last prompt position [B, V]; ``step(tokens [B]) -> [B, V]``; ``select(idx)``
  (keep/reorder/repeat rows: beams); ``truncate(length)`` (drop cached positions: rollback);
  ``length``; ``last`` (the last forward's output); extra keyword arguments go to the model
  (``output_hidden_states=True``...).
* Scores (in :mod:`evaluation.decoding.scores`, importable from here): :func:`plausible` (the
  adaptive plausibility cutoff from the main branch's RAW logits at T = 1: tokens with
  ``l < log(beta) + max l`` get -inf), :func:`contrast` ``(1 + a) l - a l'``,
  :func:`warp` (temperature, then top-k, then top-p; ``None`` = off), :func:`log_probs`.
* :class:`RowSampler` ``(seeds, sample)``: ``sample=False`` -> argmax of the final scores; else one
  draw per row from ``softmax(scores)`` with that row's own ``torch.Generator`` (a batch draws what
  each question draws alone, a resumed file equals an uninterrupted one).
* :func:`run_steps` ``(ctx, first, branches, score, pick)``: the generic loop. ``score(t, logits)``
  gets every branch's logits and returns the final scores [B, V]; the picked token is fed to every
  branch; a row stops at its first EOS (the finished rows are fed ``pad_id``); stops when all rows
  stopped or after ``max_new_tokens``. A method with its own loop (beams, rollback) can still use
  :class:`Answers` (per-row EOS bookkeeping).

``decode`` runs under ``torch.inference_mode`` (:func:`evaluation.generate.generate_ids`). Tests:
``tests/evaluation/decoding_helpers.py`` (a tiny student, a run with a non-zero W, ``full_logits``
for the no-cache references, ``count_forwards``, the ``single_thread`` fixture).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from evaluation.decoding.scores import RowSampler, contrast, log_probs, plausible, warp
from shared.errors import MedAlignError
from student_train.a3moe import image_positions
from student_train.alignment import unwrap, visual_positions
from student_train.families import StudentFamily

__all__ = ["CUTOFF", "SAMPLE", "WARPERS", "Answers", "Branch", "DecodeContext", "Key", "Method", "RowSampler",
           "contrast", "left_pad", "log_probs", "plausible", "positions", "question_seed", "run_steps", "warp"]

if TYPE_CHECKING:  # the Generator lives in evaluation.generate, which imports this package
    from evaluation.generate import Generator


# --------------------------------------------------------------------------- keys and methods


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Key:
    """One ``--decoding-arg KEY=VALUE`` of a method."""

    name: str
    type: type
    """bool, int, float or str."""
    default: Any
    """The default (a method whose default depends on the student family overrides :meth:`Method.defaults`)."""
    help: str
    optional: bool = False
    """``none`` (None) is a valid value too (e.g. ``top_k=none``: no top-k)."""

    def parse(self, value: Any, method: str) -> Any:
        """``value`` (a CLI string or a Python value) as this key's type, or a MedAlignError."""
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if self.optional:
                return None
            raise MedAlignError(f"--decoding-arg {self.name} of {method} cannot be none")
        bad = MedAlignError(f"--decoding-arg {self.name}={value!r} of {method}: expected {self.type.__name__}")
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            raise bad
        if self.type in (int, float):
            if isinstance(value, bool):
                raise bad
            try:
                v = self.type(value.strip() if isinstance(value, str) else value)
            except (TypeError, ValueError):
                raise bad from None
            if self.type is int and not isinstance(value, str) and float(value) != v:
                raise bad
            if self.type is float and not math.isfinite(v):
                raise bad
            return v
        return str(value)


def SAMPLE(default: bool) -> Key:
    """The ``sample`` key every method has: False = argmax over the method's final scores."""
    return Key("sample", bool, default, "draw from the final scores (seeded per question); false: their argmax")


#: ``beta``: the adaptive plausibility cutoff of the contrastive and guidance methods (:func:`plausible`).
CUTOFF = Key("beta", float, 0.1, "plausibility cutoff: keep tokens with p >= beta * max p of the main branch "
             "(its raw logits, T = 1)")

#: ``temperature``, ``top_k``, ``top_p``: the warpers of a sampling method, applied after its score.
WARPERS = (Key("temperature", float, 1.0, "softmax temperature, applied after the score and the cutoff"),
           Key("top_k", int, None, "keep the k best tokens (none: off; see the method's notes for what "
               "MedAlign's call passed)", optional=True),
           Key("top_p", float, None, "nucleus mass (none: off)", optional=True))


class Method:
    """A decoding method (subclass it, set the class attributes, decorate with ``register``)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    """What the method does, with its paper; the first line is the one-line summary."""
    reference_notes: ClassVar[str] = ""
    """How MedAlign's evaluation code differs (shown by ``--help-decoding``)."""
    keys: ClassVar[tuple[Key, ...]] = ()

    def key(self, name: str) -> Key:
        for k in self.keys:
            if k.name == name:
                return k
        valid = ", ".join(k.name for k in self.keys)
        raise MedAlignError(f"unknown --decoding-arg {name!r} for --decoding {self.name}; valid: {valid}")

    def defaults(self, family: StudentFamily) -> dict[str, Any]:
        """Every key's default for a student of ``family``."""
        return {k.name: k.default for k in self.keys}

    def parse(self, given: dict[str, Any] | Sequence[str]) -> dict[str, Any]:
        """The user's values (``KEY=VALUE`` strings or a dict), typed; unknown or repeated keys are errors."""
        pairs: list[tuple[str, Any]] = []
        if isinstance(given, dict):
            pairs = list(given.items())
        else:
            for item in given:
                if "=" not in item:
                    raise MedAlignError(f"--decoding-arg {item!r} is not KEY=VALUE")
                k, v = item.split("=", 1)
                pairs.append((k.strip(), v))
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise MedAlignError(f"--decoding-arg {k} is given twice")
            out[k] = self.key(k).parse(v, self.name)
        return out

    def resolve(self, family: StudentFamily, overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults for ``family`` with ``overrides`` (already parsed) on top, checked."""
        args = {**self.defaults(family), **overrides}
        self.check(args)
        return args

    def check(self, args: dict[str, Any]) -> None:
        """Raise a MedAlignError for values out of range (the common warpers are checked here)."""
        if args.get("temperature") is not None and not args["temperature"] > 0:
            raise MedAlignError(f"{self.name}: temperature must be > 0, got {args['temperature']}")
        if args.get("top_k") is not None and args["top_k"] < 1:
            raise MedAlignError(f"{self.name}: top_k must be >= 1, got {args['top_k']}")
        if args.get("top_p") is not None and not 0 < args["top_p"] <= 1:
            raise MedAlignError(f"{self.name}: top_p must be in (0, 1], got {args['top_p']}")
        if "beta" in args and args["beta"] is not None and not 0 <= args["beta"] < 1:
            raise MedAlignError(f"{self.name}: beta (the plausibility cutoff) must be in [0, 1), got {args['beta']}")

    def uses_seed(self, args: dict[str, Any]) -> bool:
        """Whether ``--seed`` changes the answers (then it is part of the file's settings)."""
        return bool(args.get("sample"))

    def max_new_tokens(self, family: StudentFamily) -> int:
        """``--max-new-tokens auto`` for this method (the family's, unless the method says otherwise)."""
        return int(family.max_new_tokens)

    def decode(self, ctx: DecodeContext, args: dict[str, Any]) -> list[list[int]]:
        raise NotImplementedError

    def help_text(self, families: Sequence[StudentFamily]) -> str:
        """The text of ``--help-decoding NAME``: summary, keys with defaults (per family where they
        differ), and how MedAlign's code differs."""
        defaults = [(f, self.defaults(f)) for f in families]
        lines = [f"{self.name}: {self.summary.strip()}", "", "keys (--decoding-arg KEY=VALUE):"]
        for k in self.keys:
            vals = {f.name: d[k.name] for f, d in defaults}
            shown = (_show(next(iter(vals.values()))) if len(set(map(repr, vals.values()))) == 1
                     else ", ".join(f"{n}: {_show(v)}" for n, v in vals.items()))
            lines.append(f"  {k.name} ({k.type.__name__}{' or none' if k.optional else ''}, default {shown}): {k.help}")
        lines.append("  (--max-new-tokens auto: " + ", ".join(f"{f.name}: {self.max_new_tokens(f)}" for f in families) + ")")
        if self.reference_notes.strip():
            lines += ["", "MedAlign's code: " + self.reference_notes.strip()]
        return "\n".join(lines)


def _show(v: Any) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


# --------------------------------------------------------------------------- seeds and padding


def question_seed(seed: int, key: str) -> int:
    """The sampling seed of one question: a function of ``--seed`` and the question's id only, so a
    question draws the same tokens whatever batch it is in and wherever a run was resumed."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LEFT-pad token id lists: ``input_ids`` [B, T] (pad id) and ``attention_mask`` [B, T] (0 on padding)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, t - len(s):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a LEFT-padded attention mask, as ``generate`` computes them (0 on padding)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


# --------------------------------------------------------------------------- context and branches


@dataclass
class DecodeContext:
    """One batch of questions to decode (see the module docstring)."""

    gen: Generator
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompts: list[list[int]]
    pixels: torch.Tensor
    seeds: list[int]
    max_new_tokens: int
    family: StudentFamily
    image_mask: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.image_mask = self.input_ids == self.gen.image_token_id

    @property
    def model(self):
        """The bare ``LlavaForConditionalGeneration`` (adapter merged, W installed when the run has one)."""
        return unwrap(self.gen.model)

    @property
    def batch(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def eos_ids(self) -> list[int]:
        return list(self.gen.eos_ids)

    @property
    def pad_id(self) -> int:
        return int(self.gen.pad_id)

    def sampler(self, sample: bool) -> RowSampler:
        return RowSampler(self.seeds, sample)

    def generators(self, salt: str) -> list[torch.Generator]:
        """One CPU generator per question for randomness other than the token draws (``salt`` names
        the use, so two uses never share a stream)."""
        return [torch.Generator().manual_seed(question_seed(s, salt)) for s in self.seeds]

    def without_image(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts with every image token removed, LEFT-padded (``input_ids``, ``attention_mask``) on the device."""
        img = self.gen.image_token_id
        ids, mask = left_pad([[t for t in p if t != img] for p in self.prompts], self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    def image_features(self, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The projected image features [B, N, d] the language model reads (``pixels``: default ``ctx.pixels``)."""
        px = self.pixels if pixels is None else pixels
        out = self.model.model.get_image_features(pixel_values=px, return_dict=True)
        return torch.stack(list(out.pooler_output))

    def embed(self, features: torch.Tensor, input_ids: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs_embeds`` [B, T, d]: the token embeddings with ``features`` [B, N, d] scattered into
        the image positions (exactly what the model's own forward builds from ids and pixels)."""
        ids = self.input_ids if input_ids is None else input_ids
        mask = self.image_mask if image_mask is None else image_mask
        emb = self.model.get_input_embeddings()(ids)
        return emb.masked_scatter(mask[..., None], features.to(emb.device, emb.dtype))


class Branch:
    """One forward stream of a method: its own ``DynamicCache`` and attention mask (see the module docstring)."""

    def __init__(self, ctx: DecodeContext, attention_mask: torch.Tensor | None = None, **forward_kwargs):
        from transformers import DynamicCache

        self.model = ctx.model
        self.attention_mask = (ctx.attention_mask if attention_mask is None else attention_mask).clone()
        self.cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        self.forward_kwargs = forward_kwargs
        self.last: Any = None

    @property
    def length(self) -> int:
        """Positions held (prompt + fed tokens, padding included)."""
        return int(self.attention_mask.shape[1])

    def _forward(self, **kw) -> torch.Tensor:
        self.last = self.model(attention_mask=self.attention_mask, cache=self.cache, use_cache=True,
                               logits_to_keep=1, **self.forward_kwargs, **kw)
        return self.last.logits[:, -1].to(dtype=torch.float32, copy=True)

    def prefill(self, *, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                **kw) -> torch.Tensor:
        """The prompt forward -> the last position's logits [B, V] fp32. Either ``input_ids`` (+
        ``pixel_values`` when it holds image tokens) or ``inputs_embeds`` (+ ``image_mask``, the
        positions W rotates; None: none rotated)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Branch.prefill needs exactly one of input_ids and inputs_embeds")
        pos = positions(self.attention_mask)
        if inputs_embeds is not None:
            with visual_positions(self.model, image_mask), image_positions(self.model, image_mask):
                return self._forward(inputs_embeds=inputs_embeds, position_ids=pos, **kw)
        return self._forward(input_ids=input_ids, pixel_values=pixel_values, position_ids=pos, **kw)

    def step(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """Feed one token per row ([B]) -> the next logits [B, V] fp32."""
        ones = self.attention_mask.new_ones((self.attention_mask.shape[0], 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        pos = self.attention_mask.sum(-1, keepdim=True) - 1
        return self._forward(input_ids=tokens.reshape(-1, 1).to(self.attention_mask.device), position_ids=pos, **kw)

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (any order, repeats allowed: beam reordering/expansion) of the cache and mask."""
        index = index.to(self.attention_mask.device)
        self.cache.reorder_cache(index)
        self.attention_mask = self.attention_mask.index_select(0, index)

    def truncate(self, length: int) -> None:
        """Forget the positions from ``length`` on (a rollback): the cache and mask keep ``length`` columns."""
        drop = self.length - int(length)
        if drop < 0:
            raise ValueError(f"cannot truncate a branch of {self.length} positions to {length}")
        if drop:
            self.cache.crop(-drop)
            self.attention_mask = self.attention_mask[:, :length]


class Answers:
    """The tokens generated per row, each row stopping at its first EOS (excluded)."""

    def __init__(self, batch: int, eos_ids: Sequence[int], pad_id: int, device: torch.device):
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(sorted({int(e) for e in eos_ids}), device=device)
        self.pad_id = int(pad_id)

    @property
    def done(self) -> bool:
        return bool(self.finished.all())

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        """Record one token per row; returns the tokens to feed (``pad_id`` for rows already finished)."""
        tokens = tokens.reshape(-1)
        is_eos = torch.isin(tokens, self.eos)
        for i, (t, was_done, e) in enumerate(zip(tokens.tolist(), self.finished.tolist(), is_eos.tolist())):
            if not was_done and not e:
                self.tokens[i].append(int(t))
        feed = tokens.masked_fill(self.finished, self.pad_id)
        self.finished = self.finished | is_eos
        return feed


def run_steps(ctx: DecodeContext, first: list[torch.Tensor], branches: list[Branch],
              score: Callable[[int, list[torch.Tensor]], torch.Tensor],
              pick: Callable[[torch.Tensor], torch.Tensor]) -> list[list[int]]:
    """The generic multi-branch loop (see the module docstring): ``first`` = each branch's prefill
    logits; ``score(t, logits)`` -> final scores, ``t`` counting the answer's tokens from 1."""
    answers = Answers(ctx.batch, ctx.eos_ids, ctx.pad_id, ctx.device)
    logits = first
    for t in range(1, ctx.max_new_tokens + 1):
        feed = answers.push(pick(score(t, logits)))
        if answers.done or t == ctx.max_new_tokens:
            break
        logits = [b.step(feed) for b in branches]
    return answers.tokens
