"""VCD (evaluation/decoding/vcd.py) against an independent per-step loop: full forwards, no cache,
one question at a time, the noise and its schedule written out here; a run with a non-zero W."""

from __future__ import annotations

import math

import pytest
import torch
from decoding_helpers import (
    KEYS,
    LAYER,
    QUESTIONS,
    count_forwards,
    full_logits,
    make_student,
    make_w_run,
    pixels,
    prompt_ids,
    single_thread,  # noqa: F401 - the fixture, used by pytestmark
)

from evaluation import generate as G
from evaluation import generate_config as C
from evaluation.decoding.base import question_seed

STEPS = 8


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("vcd") / "llama")


@pytest.fixture(scope="module")
def w_run(student, tmp_path_factory):
    return make_w_run(student, tmp_path_factory.mktemp("w_run"))


@pytest.fixture(scope="module")
def gens(student, w_run):
    """(the run's generator: adapter + W; the base model for the references; W)."""
    run_dir, w = w_run
    return G.load_generator(student, run_dir), G.load_generator(student), w


def _noised(px: torch.Tensor, seed: int, key: str, step: int = 500) -> torch.Tensor:
    """The authors' DDPM forward step, written out: beta_t = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5)
    + 1e-5, abar_t = prod_{s <= t} (1 - beta_s), x' = sqrt(abar_t) x + sqrt(1 - abar_t) eps."""
    betas = [1 / (1 + math.exp(-(-6 + 12 * i / 999))) * (0.5e-2 - 1e-5) + 1e-5 for i in range(1000)]
    abar = math.prod(1 - b for b in betas[:step + 1])
    g = torch.Generator().manual_seed(question_seed(question_seed(seed, key), "vcd-noise"))
    eps = torch.randn(tuple(px.shape[1:]), generator=g)
    return (math.sqrt(abar) * px[0] + math.sqrt(1 - abar) * eps)[None]


def _reference(base, w, question, px, noised, *, alpha=1.0, beta=0.1, sample=False, seed=0, steps=STEPS):
    """VCD by full recomputation: both branches' logits from full forwards, (1 + a) l - a l', the cutoff
    p < beta * max p (clean branch) -> -inf, then argmax or a draw with the question's own generator."""
    model = base.model
    ids = prompt_ids(base, question)
    seq, out = list(ids), []
    g = torch.Generator().manual_seed(seed) if sample else None
    with torch.no_grad():
        for _ in range(steps):
            lc = full_logits(model, seq, len(ids), px, base.image_token_id, rotation=(w, LAYER))
            ln = full_logits(model, seq, len(ids), noised, base.image_token_id, rotation=(w, LAYER))
            s = (1 + alpha) * lc - alpha * ln
            p = torch.softmax(lc, -1)
            s[p < beta * p.max()] = float("-inf")
            nxt = int(torch.multinomial(torch.softmax(s, -1), 1, generator=g)) if sample else int(s.argmax())
            if nxt in base.eos_ids:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def _vcd(**args):
    return C.DecodingConfig(mode="vcd", args=args, max_new_tokens=STEPS)


def test_noise_schedule_coefficients():
    from evaluation.decoding.vcd import ddpm_coefficients

    a, b = ddpm_coefficients(500)
    assert (round(a, 3), round(b, 3)) == (0.863, 0.505)
    assert abs(a * a + b * b - 1) < 1e-6


def test_vcd_equals_reference_argmax_and_sampled(gens):
    gen, base, w = gens
    px = pixels(gen, 3, seed=3)
    i = 2  # argmax
    nz = _noised(px[i:i + 1], 0, KEYS[i])
    got = G.generate_ids(gen, [QUESTIONS[i]], px[i:i + 1], _vcd(sample=False), keys=[KEYS[i]])[0]
    assert len(got) > 2 and got == _reference(base, w, QUESTIONS[i], px[i:i + 1], nz)
    i = 0  # sampled, alpha 2
    nz = _noised(px[i:i + 1], 0, KEYS[i])
    got = G.generate_ids(gen, [QUESTIONS[i]], px[i:i + 1], _vcd(alpha=2.0), keys=[KEYS[i]])[0]
    assert got == _reference(base, w, QUESTIONS[i], px[i:i + 1], nz, alpha=2.0, sample=True,
                             seed=question_seed(0, KEYS[i]))
    # the contrast matters here: the clean-branch argmax under the cutoff differs
    plain = G.generate_ids(gen, QUESTIONS, px, _vcd(alpha=0.0, sample=False), keys=KEYS)
    assert plain != G.generate_ids(gen, QUESTIONS, px, _vcd(alpha=3.0, sample=False), keys=KEYS)


def test_vcd_batched_equals_one_by_one_noise_per_question(gens):
    """Left-padded batch of 3 prompt lengths = each alone, argmax (the noise is the question's own)
    and sampled; a different --seed draws other noise."""
    gen, _, _ = gens
    px = pixels(gen, 3, seed=4)
    for dec in (_vcd(sample=False, alpha=2.0), _vcd()):
        batched = G.generate_ids(gen, QUESTIONS, px, dec, keys=KEYS)
        single = [G.generate_ids(gen, [q], px[i:i + 1], dec, keys=[KEYS[i]])[0] for i, q in enumerate(QUESTIONS)]
        assert batched == single and all(batched)
    other = C.DecodingConfig(mode="vcd", args={"sample": False, "alpha": 2.0}, max_new_tokens=STEPS, seed=1)
    seeds = [G.generate_ids(gen, QUESTIONS, px, other, keys=KEYS)]
    assert seeds[0] != G.generate_ids(gen, QUESTIONS, px, _vcd(sample=False, alpha=2.0), keys=KEYS)


def test_vcd_alpha_zero_argmax_is_greedy(gens):
    gen, _, _ = gens
    px = pixels(gen, 3, seed=5)
    greedy = G.generate_ids(gen, QUESTIONS, px, C.DecodingConfig(mode="greedy", max_new_tokens=STEPS))
    assert G.generate_ids(gen, QUESTIONS, px, _vcd(alpha=0.0, sample=False), keys=KEYS) == greedy


def test_vcd_per_token_cost_is_that_of_cached_decoding(student, w_run):
    """Answers forced to full length: VCD runs exactly two greedy-shaped streams (two prompt forwards,
    then one single-token forward per branch and token), so its per-token cost grows with the answer
    exactly as plain cached decoding's does."""
    gen = G.load_generator(student, w_run[0])
    gen.eos_ids = [len(gen.tokenizer) + 1]  # never generated
    px = pixels(gen, 2, seed=6)
    with count_forwards(gen.model) as greedy_lengths:
        G.generate_ids(gen, QUESTIONS[:2], px, C.DecodingConfig(mode="greedy", max_new_tokens=8))
    with count_forwards(gen.model) as vcd_lengths:
        out = G.generate_ids(gen, QUESTIONS[:2], px, C.DecodingConfig(mode="vcd", max_new_tokens=8), keys=KEYS[:2])
    assert [len(o) for o in out] == [8, 8]
    assert greedy_lengths.count(1) == 7 and len(greedy_lengths) == 8
    assert sorted(vcd_lengths) == sorted(greedy_lengths * 2)
