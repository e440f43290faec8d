"""PAI: equal to a no-cache reference, batched == one-by-one, alpha 0 and gamma 1 == greedy, the
attention function coexists with MedAlign's capture and leaves the student as it found it."""

from __future__ import annotations

import pytest
import torch
from attn_helpers import MAX_NEW, decode, greedy, one_by_one, students
from attn_references import pai_reference
from decoding_helpers import QUESTIONS, pixels, prompt_ids

from evaluation.decoding import _hooks as H
from evaluation.generate import load_generator


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    return students(tmp_path_factory, "pai")


def _reference(st, questions, px, **kw):
    gen = st.bare
    args = {"alpha": 0.2, "gamma": 1.1, "beta": 0.1, "start_layer": 2, "max_new": MAX_NEW, "eos": gen.eos_ids} | kw
    return [pai_reference(gen.model, st.w, prompt_ids(gen, q), px[i:i + 1], gen.image_token_id, **args)
            for i, q in enumerate(questions)]


# --------------------------------------------------------------------------- the maths


def test_boost_adds_alpha_abs_at_image_keys_only():
    scores = torch.tensor([[[-2.0, 1.0, 3.0, -0.5]]])
    image = torch.tensor([[False, True, True, False]])
    assert H.pai_boost(scores, image, 0.5).tolist() == [[[-2.0, 1.5, 4.5, -0.5]]]


def test_boosted_last_row_equals_a_dense_boosted_softmax():
    """Grouped heads (4 query heads on 2 key heads), a masked key: the last row as a dense softmax."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    allowed = torch.tensor([[False, True, True, True, True]])
    image = torch.tensor([[False, True, True, False, False]])
    row = H.boosted_last_row(q, k, v, allowed, image, 0.3, 8 ** -0.5)
    for h in range(4):
        s = q[0, h, -1] @ k[0, h // 2].T * 8 ** -0.5
        s = torch.where(image[0], s + 0.3 * s.abs(), s).masked_fill(~allowed[0], float("-inf"))
        assert torch.allclose(row[0, h], torch.softmax(s, -1) @ v[0, h // 2], atol=1e-6)


# --------------------------------------------------------------------------- against the reference


def test_equals_the_no_cache_reference_with_w(st):
    """Default settings on the W run: every question's tokens equal the reference's exactly."""
    px = pixels(st.run, 3, seed=1)
    assert decode(st.run, "pai", QUESTIONS, px) == _reference(st, QUESTIONS, px)


@pytest.mark.parametrize("kw", [{"alpha": 3.0, "gamma": 1.0}, {"alpha": 2.0, "gamma": 1.5, "start_layer": 1}])
def test_boost_and_guidance_each_equal_the_reference(st, kw):
    """The boost alone (gamma 1: with the cache, the answer tokens' own rows were boosted) and both
    strong; each visibly changes the answers, so the equality has power."""
    px = pixels(st.run, 3, seed=2)
    got = decode(st.run, "pai", QUESTIONS, px, **kw)
    assert got == _reference(st, QUESTIONS, px, **kw)
    assert got != greedy(st.run, QUESTIONS, px)


def test_batched_equals_one_by_one(st):
    px = pixels(st.run, 3, seed=4)
    for kw in ({"alpha": 2.0, "gamma": 1.5}, {"sample": True}):
        assert decode(st.run, "pai", QUESTIONS, px, **kw) == one_by_one(st.run, "pai", QUESTIONS, px, **kw)


def test_alpha_0_gamma_1_is_greedy(st):
    px = pixels(st.run, 3, seed=5)
    assert decode(st.run, "pai", QUESTIONS, px, alpha=0.0, gamma=1.0) == greedy(st.run, QUESTIONS, px)


def test_coexists_with_the_capture_and_restores_the_student(st):
    """A student carrying MedAlign's training capture (attention implementation medalign_sdpa)
    decodes as the plain one, and gets its implementation and its capture mark back."""
    from student_train.alignment import (
        _CAPTURE_ATTR,
        ATTN_IMPL,
        decoder_layers,
        install,
    )

    plain = st.bare
    captured = load_generator(plain.model.name_or_path)
    install(captured.model, 2, rotation=False, capture=True)
    px = pixels(plain, 3, seed=6)
    kw = {"alpha": 2.0, "gamma": 1.5}
    assert decode(captured, "pai", QUESTIONS, px, **kw) == decode(plain, "pai", QUESTIONS, px, **kw)
    assert captured.model.config.text_config._attn_implementation == ATTN_IMPL
    assert plain.model.config.text_config._attn_implementation == "sdpa"
    layers = decoder_layers(captured.model)
    assert hasattr(layers[2].self_attn, _CAPTURE_ATTR)
    assert not any(hasattr(layer.self_attn, "_medalign_last_row_state") for layer in layers)


def test_bad_settings_are_errors(st):
    from shared.errors import MedAlignError

    with pytest.raises(MedAlignError, match="start_layer 4 is past"):
        decode(st.run, "pai", QUESTIONS[:1], pixels(st.run, 1), start_layer=4)
    with pytest.raises(MedAlignError, match="alpha must be >= 0"):
        decode(st.run, "pai", QUESTIONS[:1], pixels(st.run, 1), alpha=-1.0)
