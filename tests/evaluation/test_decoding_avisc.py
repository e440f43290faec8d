"""AVISC: the layer selection and the blind tokens, equal to a no-cache reference (full eager
attention, with W), per-question statistics (batched == one-by-one), alpha 0 == greedy, the
non-finite fallback, and a HuatuoGPT-style (qwen2) student."""

from __future__ import annotations

import pytest
import torch
from attn_helpers import MAX_NEW, decode, greedy, one_by_one, students
from attn_references import avisc_reference
from decoding_helpers import QUESTIONS, make_student, pixels, prompt_ids

from evaluation.decoding import avisc as A
from evaluation.generate import load_generator


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    return students(tmp_path_factory, "avisc")


def _reference(st, questions, px, **kw):
    gen = st.bare
    args = {"alpha": 1.0, "beta": 0.1, "gamma": 0.5, "lamb": 1.0, "max_new": MAX_NEW, "eos": gen.eos_ids} | kw
    return [avisc_reference(gen.model, st.w, prompt_ids(gen, q), px[i:i + 1], gen.image_token_id, **args)
            for i, q in enumerate(questions)]


# --------------------------------------------------------------------------- the pieces


def test_select_layers_takes_the_fewest_reaching_gamma():
    # layer shares 0.4, 0.1, 0.3, 0.2 (sorted: 0.4, 0.3, 0.2, 0.1)
    att = torch.tensor([[[0.2, 0.2], [0.05, 0.05], [0.1, 0.2], [0.1, 0.1]]])
    assert A.select_layers(att, 0.5).tolist() == [[True, False, True, False]]  # 0.4 < 0.5 <= 0.7
    assert A.select_layers(att, 0.3).tolist() == [[True, False, False, False]]
    assert A.select_layers(att, 1.0).sum().item() == 4  # never more than L, even if rounding keeps < 1


def test_blind_tokens_are_at_least_mean_plus_lambda_std_of_one_question():
    att = torch.tensor([[[0.1, 0.1, 0.6, 0.2], [9.0, 9.0, 9.0, 9.0]],
                        [[0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]]])
    layers = torch.tensor([[True, False], [True, False]])
    blind = A.blind_tokens(att, layers, 1.0)
    x = att[0, 0]
    assert blind[0].tolist() == (x >= x.mean() + x.std()).tolist() == [False, False, True, False]
    assert blind[1].tolist() == [True] * 4  # no spread: nothing falls below the threshold, nothing is zeroed


def test_finite_or_replaces_whole_rows():
    neg = torch.tensor([[1.0, float("nan")], [2.0, 3.0], [float("-inf"), 0.0]])
    main = torch.tensor([[5.0, 6.0], [7.0, 8.0], [9.0, 1.0]])
    assert A.finite_or(neg, main).tolist() == [[5.0, 6.0], [2.0, 3.0], [9.0, 1.0]]


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("kw", [{}, {"alpha": 3.0, "gamma": 0.9, "lambda": 0.0}])
def test_equals_the_no_cache_reference_with_w(st, kw):
    """The defaults, and a strong setting that visibly changes the answers (the equality has power)."""
    px = pixels(st.run, 3, seed=1)
    got = decode(st.run, "avisc", QUESTIONS, px, sample=False, **kw)
    ref = {"lamb" if k == "lambda" else k: v for k, v in kw.items()}
    assert got == _reference(st, QUESTIONS, px, **ref)
    if kw:
        assert got != greedy(st.run, QUESTIONS, px)


def test_batched_equals_one_by_one(st):
    px = pixels(st.run, 3, seed=2)
    for kw in ({"sample": False, "alpha": 3.0}, {}):  # {}: the defaults sample, seeded per question
        assert decode(st.run, "avisc", QUESTIONS, px, **kw) == one_by_one(st.run, "avisc", QUESTIONS, px, **kw)


def test_alpha_0_is_greedy(st):
    px = pixels(st.run, 3, seed=3)
    assert decode(st.run, "avisc", QUESTIONS, px, alpha=0.0, sample=False) == greedy(st.run, QUESTIONS, px)


def test_non_finite_negative_logits_fall_back_to_the_main_branch(st, monkeypatch):
    """A negative branch whose logits are NaN (prefill and steps) leaves the main branch's tokens."""
    real_prefill, real_step = A.Branch.prefill, A.Branch.step

    def prefill(self, **kw):
        out = real_prefill(self, **kw)
        self.broken = "inputs_embeds" in kw  # the negative branch is the one fed embeddings
        return torch.full_like(out, float("nan")) if self.broken else out

    def step(self, tokens, **kw):
        out = real_step(self, tokens, **kw)
        return torch.full_like(out, float("nan")) if self.broken else out

    monkeypatch.setattr(A.Branch, "prefill", prefill)
    monkeypatch.setattr(A.Branch, "step", step)
    px = pixels(st.run, 3, seed=4)
    assert decode(st.run, "avisc", QUESTIONS, px, sample=False, alpha=3.0) == greedy(st.run, QUESTIONS, px)


def test_a_qwen2_student_batched_equals_one_by_one(tmp_path):
    """HuatuoGPT's backbone and template (no BOS): the same per-question answers in a batch."""
    gen = load_generator(make_student(tmp_path / "qwen2", "qwen2"))
    px = pixels(gen, 3, seed=5)
    kw = {"sample": False, "alpha": 3.0}
    assert decode(gen, "avisc", QUESTIONS, px, **kw) == one_by_one(gen, "avisc", QUESTIONS, px, **kw)
