"""OPERA's rules as plain tensor code (Huang et al. 2024; the authors' ``opera_beam_search`` in
their transformers-4.29 fork), used by :mod:`evaluation.decoding.opera`, which runs the model.

Notation: K beams, C candidates per beam, n answer tokens so far; the "local window" of a
candidate is the ``(n + 1) x (n + 1)`` lower-triangular block of the last layer's attention over the
answer (the n answer rows so far plus the candidate's row; max over heads, each row renormalised
over all its keys, prompt included), times ``scale_factor``.

* :func:`candidates`: the top-C tokens of each beam by raw logits.
* :func:`column_scores`: ``phi_j = 1e-7 * prod_{i >= j} window[i, j]`` per column (the authors'
  arithmetic: see :data:`SCORE_DTYPES`).
* :func:`over_trust`: the penalty per candidate (for the first 10 answer tokens minus the
  candidate's attention mass on the image, a bonus; then ``max_j phi_j``) and ``argmax_j phi_j``.
* :func:`mode`: torch.mode's rule (the most frequent value, the smallest of equals).
* :class:`Hypotheses`: finished beams, as transformers' ``BeamHypotheses`` (length penalty 1 on
  the answer length, early_stopping False).
* :class:`Retrospection`: the history and the rollback rule, list for list as the authors' code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

#: ``score_dtype`` values. ``model``: the authors' arithmetic on a model of that dtype (the scaled
#: attention and the column product rounded to the model's dtype, the product accumulated in fp32 as
#: a CUDA reduction does, times 1e-7 in that dtype, then stored in float16 as their
#: ``attn_local_scores`` tensor is: scores under ~6e-8 become 0, over 65504 inf). ``float32``: all
#: in float32, nothing rounded.
SCORE_DTYPES = ("model", "float32")
#: The authors' ``window_size``: the history, the rollback counters and the rejected-token lists
#: cover this many answer positions; no rollback reaches past it.
WINDOW = 512
#: The penalty is the image bonus while the answer (with the candidate) has at most this many tokens,
#: and no rollback goes to a summary token before this position.
FIRST_TOKENS = 10
#: The score of every non-candidate token (and of a rejected one after a rollback).
FILL = -999.0


def candidates(logits: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``c`` tokens of each row by raw logits [K, V] -> (logits [K, c] fp32, tokens [K, c]), best first."""
    values, tokens = torch.topk(logits.float(), c, dim=-1, largest=True, sorted=True)
    return values, tokens


def column_scores(window: torch.Tensor, scale: float, dtype: torch.dtype | None) -> torch.Tensor:
    """``1e-7 * prod_{i >= j} (scale * window)[..., i, j]`` for every column j.

    window: [..., m, m] lower-triangular fp32 attention (rows renormalised). ``dtype``: None for
    float32 throughout; else the model's dtype, with the authors' rounding (:data:`SCORE_DTYPES`).
    Returns [..., m] fp32.
    """
    x = scale * window.float() if dtype is None else (window.to(dtype) * scale).float()
    # prod over rows i >= j of column j: a cumulative product from the bottom row up, read on the diagonal
    rev = torch.flip(x, dims=[-2]).cumprod(dim=-2)
    prod = torch.flip(rev, dims=[-2]).diagonal(dim1=-2, dim2=-1)
    if dtype is None:
        return 1e-7 * prod
    return (1e-7 * prod.to(dtype)).to(torch.float16).float()


def over_trust(window: torch.Tensor, image_mass: torch.Tensor, scale: float,
               dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The penalty and the summary location of each candidate.

    window: [K, C, m, m] (m = the answer length with the candidate); image_mass: [K, C], the
    candidate row's renormalised attention on the image tokens. Returns (penalty [K, C] fp32,
    location [K, C] long = ``argmax_j phi_j``, the first of equal scores).
    """
    scores = column_scores(window, scale, dtype)
    best, loc = scores.max(dim=-1)
    penalty = -image_mass.float() if window.shape[-1] <= FIRST_TOKENS else best
    return penalty, loc


def mode(x: torch.Tensor) -> torch.Tensor:
    """The most frequent value along the last dimension, the smallest of equally frequent ones
    (torch.mode's result on CPU, written out so the rule does not depend on the device)."""
    flat = x.reshape(-1, x.shape[-1]).long()
    counts = (flat[:, :, None] == flat[:, None, :]).sum(-1)
    best = counts.max(dim=-1, keepdim=True).values
    cand = torch.where(counts == best, flat, torch.full_like(flat, torch.iinfo(torch.long).max))
    return cand.min(dim=-1).values.reshape(x.shape[:-1])


# --------------------------------------------------------------------------- finished beams


@dataclass
class Hypotheses:
    """Finished beams of one question: transformers' ``BeamHypotheses`` with length penalty 1 and
    ``early_stopping=False``. A beam finishing on EOS scores ``sum log p / (its answer length,
    EOS included)``; a beam still open at the end ``sum log p / its length``."""

    num_beams: int
    items: list[tuple[float, list[int]]] = field(default_factory=list)
    worst: float = 1e9
    done: bool = False

    def add(self, tokens: list[int], sum_logprobs: float, length: int) -> None:
        score = sum_logprobs / max(length, 1)
        if len(self.items) < self.num_beams or score > self.worst:
            self.items.append((score, tokens))
            if len(self.items) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        """No open beam can beat the worst finished one (once ``num_beams`` beams finished)."""
        if len(self.items) < self.num_beams:
            return False
        return self.worst >= best_sum_logprobs / max(length, 1)

    def best(self) -> list[int]:
        """The highest score (of equal scores, the one added last, as ``sorted(...).pop()``)."""
        best = self.items[0]
        for item in self.items[1:]:
            if item[0] >= best[0]:
                best = item
        return best[1]


def select_beams(scores: torch.Tensor, tokens_so_far: torch.Tensor, hyps: Hypotheses, eos_ids: list[int],
                 num_beams: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam-search selection (``BeamSearchScorer.process``) for one question.

    scores: [K, V] accumulated log-probabilities (beam score + this step's); tokens_so_far: [K, n].
    Takes the best ``(1 + number of EOS ids) * K`` continuations (2K with one EOS id, the authors'
    count; enough that K of them never end; equal scores by index); an EOS continuation ranked below K is skipped, one
    ranked within K finishes its beam (added to ``hyps``); the first K others continue. Sets
    ``hyps.done``. Returns (beam scores [K], tokens [K], source beams [K]).
    """
    vocab = scores.shape[1]
    flat = scores.reshape(-1)
    keep = min(flat.numel(), (1 + len(eos_ids)) * num_beams)
    # a stable sort: equal scores (the -999 fills) go by index on every device, as topk does not promise
    top_scores, top_idx = (t[:keep] for t in torch.sort(flat, descending=True, stable=True))
    eos = {int(e) for e in eos_ids}
    n = tokens_so_far.shape[1]
    new_scores, new_tokens, new_beams = [], [], []
    for rank, (s, i) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
        beam, token = divmod(int(i), vocab)
        if token in eos:
            if rank < num_beams:
                hyps.add(tokens_so_far[beam].tolist(), s, n + 1)
        else:
            new_scores.append(s)
            new_tokens.append(token)
            new_beams.append(beam)
        if len(new_tokens) == num_beams:
            break
    hyps.done = hyps.done or hyps.is_done(float(top_scores.max()), n + 1)
    dev = scores.device
    return (torch.tensor(new_scores, dtype=torch.float32, device=dev), torch.tensor(new_tokens, device=dev),
            torch.tensor(new_beams, device=dev))


# --------------------------------------------------------------------------- history and rollback


@dataclass
class State:
    """What one iteration starts from (the authors' ``current_state``), for a rollback to return to."""

    tokens: torch.Tensor
    """[K, n] the beams' answer tokens."""
    hyps: Hypotheses
    beam_scores: torch.Tensor
    sel_tokens: torch.Tensor | None
    """[K] the tokens the previous iteration chose (None at the first), and their source beams:"""
    sel_beams: torch.Tensor | None
    attn: torch.Tensor | None = None
    """[K, n, n] the answer's attention rows (set after this iteration's forward)."""

    @property
    def n(self) -> int:
        return int(self.tokens.shape[1])


@dataclass
class Rollback:
    """A rollback decided by :meth:`Retrospection.check`: go back to ``restore`` (its hypotheses
    object becomes the live one, as the authors' code reuses it) and forbid ``rejected`` there."""

    restore: State
    rejected: torch.Tensor
    """Flat indices ``beam * V + token`` to set to :data:`FILL` in the restored step's [K * V] logits."""
    position: int


class Retrospection:
    """The rollback rule of the authors' ``opera_beam_search``, list for list.

    Per iteration :meth:`push` records the state and each beam's summary location (the mode over
    its candidates, kept per beam SLOT: the authors' history is not reordered with the beams).
    :meth:`check` (``loc`` = the mode of those over the beams, ``m`` = n + 1) rolls back when every
    slot's history holds more than ``threshold`` entries equal to ``loc``, ``loc >= 10`` and the
    position ``loc + 1`` (else ``loc``) has been rolled back to fewer than C times; it drops the
    states after the target, as their pops do (``m - loc - 3`` of them, then one more), and returns
    the state two from the end. The tokens rejected at a position (the choices that led past it)
    accumulate over rollbacks there; only the list of ``position + 1`` is cleared, and the authors'
    ``reject_token_pos_gather[-(j+1)] = []`` clears entries counted from the END of the 512-entry
    window, which is kept.
    """

    def __init__(self, threshold: int, num_candidates: int, window: int = WINDOW):
        self.threshold, self.c, self.window = int(threshold), int(num_candidates), int(window)
        self.states: list[State] = []
        self.locs: list[torch.Tensor] = []
        self.times = [0] * self.window
        self.rejects: list[torch.Tensor | None] = [None] * self.window
        self.count = 0
        """Rollbacks taken so far."""

    def snapshot(self, tokens: torch.Tensor, hyps: Hypotheses, beam_scores: torch.Tensor,
                 sel_tokens: torch.Tensor | None, sel_beams: torch.Tensor | None) -> State:
        return State(tokens, copy.deepcopy(hyps), beam_scores.clone(), sel_tokens, sel_beams)

    def push(self, state: State, beam_locs: torch.Tensor) -> None:
        self.locs.append(beam_locs.reshape(-1).clone())
        if len(self.states) >= self.window:
            self.states.pop(0)
        self.states.append(state)

    def check(self, loc: int, m: int, vocab: int) -> Rollback | None:
        gathered = torch.stack(self.locs, dim=-1)  # [K, history]
        if not bool(((gathered == loc).sum(-1) > self.threshold).all()) or loc < FIRST_TOKENS:
            return None
        pos = loc + 1
        if pos >= self.window:
            return None  # past the authors' window (their code swallows an IndexError there)
        if self.times[pos] >= self.c:
            pos -= 1
            if self.times[pos] >= self.c:
                return None
        pops = max(0, m - pos - 2)
        if pos + 1 >= self.window or m - pos > self.window + 1 or len(self.states) - pops < 2:
            return None  # only past the window (the authors' code then fails on an index, caught)
        self.times[pos] += 1
        for j in range(pops):
            self.states.pop()
            self.locs.pop()
            self.rejects[self.window - 1 - j] = None
        restore, chooser = self.states[-2], self.states[-1]
        self.states.pop()
        self.locs.pop()
        self.rejects[pos + 1] = None
        new = chooser.sel_beams * vocab + chooser.sel_tokens
        before = self.rejects[pos]
        self.rejects[pos] = new if before is None else torch.cat([before, new])
        self.count += 1
        return Rollback(restore, self.rejects[pos], pos)
