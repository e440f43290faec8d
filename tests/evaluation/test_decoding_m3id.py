"""M3ID (evaluation/decoding/m3id.py) against an independent per-step loop: full forwards, no cache,
one question at a time (the image branch and the text-only branch); a run with a non-zero W."""

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
from evaluation.decoding import get
from evaluation.decoding.base import question_seed
from student_train.families import FAMILIES

STEPS = 8

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("m3id") / "llama")


@pytest.fixture(scope="module")
def gens(student, tmp_path_factory):
    """(the run's generator: adapter + W; the base model for the references; W)."""
    run_dir, w = make_w_run(student, tmp_path_factory.mktemp("w_run"))
    return G.load_generator(student, run_dir), G.load_generator(student), w


def _reference(base, w, question, px, *, lam=0.02, beta=0.1, threshold=None, temperature=1.0, sample=False,
               seed=0, steps=STEPS):
    """M3ID by full recomputation: l_c (prompt with the image, W on its image positions) and l_u (the
    prompt with its image tokens deleted, no image) from full forwards; g = exp(-lam t), t = 1, 2, ...;
    log p_c + (1 - g) / g (log p_c - log p_u); p_c < beta * max p_c -> -inf; / T; argmax or a draw."""
    model = base.model
    ids = prompt_ids(base, question)
    text = [t for t in ids if t != base.image_token_id]
    seq, seq_u, out = list(ids), list(text), []
    g = torch.Generator().manual_seed(seed) if sample else None
    with torch.no_grad():
        for t in range(1, steps + 1):
            lc = full_logits(model, seq, len(ids), px, base.image_token_id, rotation=(w, LAYER))
            lu = full_logits(model, seq_u, len(text), None, base.image_token_id)
            pc, pu = torch.log_softmax(lc, -1), torch.log_softmax(lu, -1)
            gamma = math.exp(-lam * t)
            s = pc + (1 - gamma) / gamma * (pc - pu)
            if threshold is not None and float(pc.exp().max()) >= threshold:
                s = pc.clone()
            p = torch.softmax(lc, -1)
            s[p < beta * p.max()] = float("-inf")
            s = s / temperature
            nxt = int(torch.multinomial(torch.softmax(s, -1), 1, generator=g)) if sample else int(s.argmax())
            if nxt in base.eos_ids:
                break
            out.append(nxt)
            seq.append(nxt)
            seq_u.append(nxt)
    return out


def _m3id(**args):
    return C.DecodingConfig(mode="m3id", args=args, max_new_tokens=STEPS)


def test_m3id_equals_reference(gens):
    gen, base, w = gens
    px = pixels(gen, 3, seed=7)
    i = 0  # argmax, a strong lambda so that the correction matters
    got = G.generate_ids(gen, [QUESTIONS[i]], px[i:i + 1], _m3id(sample=False, **{"lambda": 0.5}), keys=[KEYS[i]])[0]
    assert len(got) > 2 and got == _reference(base, w, QUESTIONS[i], px[i:i + 1], lam=0.5)
    i = 2  # sampled at T = 0.7 with the defaults otherwise
    got = G.generate_ids(gen, [QUESTIONS[i]], px[i:i + 1], _m3id(temperature=0.7), keys=[KEYS[i]])[0]
    assert got == _reference(base, w, QUESTIONS[i], px[i:i + 1], temperature=0.7, sample=True,
                             seed=question_seed(0, KEYS[i]))
    # the uncertainty gate: threshold 1 corrects everywhere (= no gate); a tiny one nowhere (= greedy)
    dec = {"sample": False, "lambda": 0.5}
    ungated = G.generate_ids(gen, QUESTIONS, px, _m3id(**dec), keys=KEYS)
    assert G.generate_ids(gen, QUESTIONS, px, _m3id(threshold=1.0, **dec), keys=KEYS) == ungated
    greedy = G.generate_ids(gen, QUESTIONS, px, C.DecodingConfig(mode="greedy", max_new_tokens=STEPS))
    assert ungated != greedy
    assert G.generate_ids(gen, QUESTIONS, px, _m3id(threshold=1e-6, **dec), keys=KEYS) == greedy
    gated = G.generate_ids(gen, [QUESTIONS[0]], px[:1], _m3id(threshold=0.3, **dec), keys=KEYS[:1])[0]
    assert gated == _reference(base, w, QUESTIONS[0], px[:1], lam=0.5, threshold=0.3)


def test_m3id_batched_equals_one_by_one(gens):
    """Left-padded batch of 3 prompt lengths (and text-only prompts of 3 other lengths) = each alone."""
    gen, _, _ = gens
    px = pixels(gen, 3, seed=8)
    for dec in (_m3id(sample=False, **{"lambda": 0.5}), _m3id()):
        batched = G.generate_ids(gen, QUESTIONS, px, dec, keys=KEYS)
        single = [G.generate_ids(gen, [q], px[i:i + 1], dec, keys=[KEYS[i]])[0] for i, q in enumerate(QUESTIONS)]
        assert batched == single and all(batched)


def test_m3id_lambda_zero_argmax_is_greedy(gens):
    gen, _, _ = gens
    px = pixels(gen, 3, seed=9)
    greedy = G.generate_ids(gen, QUESTIONS, px, C.DecodingConfig(mode="greedy", max_new_tokens=STEPS))
    assert G.generate_ids(gen, QUESTIONS, px, _m3id(sample=False, **{"lambda": 0.0}), keys=KEYS) == greedy


def test_m3id_defaults_per_family():
    m = get("m3id")
    assert m.resolve(FAMILIES["huatuo"], {})["temperature"] == 0.7
    llava = m.resolve(FAMILIES["llava-med"], {})
    assert (llava["lambda"], llava["beta"], llava["temperature"], llava["threshold"], llava["sample"]) == \
        (0.02, 0.1, 1.0, None, True)
    assert m.max_new_tokens(FAMILIES["huatuo"]) == 1024


def test_m3id_per_token_cost_is_that_of_cached_decoding(student):
    """Two greedy-shaped cached streams: the image prompt and the (shorter) text-only prompt, then one
    single-token forward per branch and token."""
    gen = G.load_generator(student)
    gen.eos_ids = [len(gen.tokenizer) + 1]  # never generated
    px = pixels(gen, 2, seed=10)
    with count_forwards(gen.model) as lengths:
        out = G.generate_ids(gen, QUESTIONS[:2], px, _m3id(), keys=KEYS[:2])
    assert [len(o) for o in out] == [STEPS, STEPS]
    n = gen.num_image_tokens
    longest = max(len(prompt_ids(gen, q)) for q in QUESTIONS[:2])
    assert sorted(lengths, reverse=True)[:2] == [longest, longest - n]
    assert lengths.count(1) == 2 * (STEPS - 1) and len(lengths) == 2 * STEPS
