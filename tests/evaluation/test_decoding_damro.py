"""DAMRO: the outliers and the shortened negative prompt, equal to a no-cache reference (with W on
the negative branch's K image positions), batched == one-by-one, alpha 0 == greedy."""

from __future__ import annotations

import pytest
import torch
from attn_helpers import MAX_NEW, decode, greedy, one_by_one, students
from attn_references import damro_reference
from decoding_helpers import QUESTIONS, pixels, prompt_ids

from evaluation.decoding import damro as D
from shared.errors import MedAlignError


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    return students(tmp_path_factory, "damro")


def _reference(st, questions, px, **kw):
    gen = st.bare
    args = {"alpha": 0.5, "beta": 0.1, "k": 10, "max_new": MAX_NEW, "eos": gen.eos_ids} | kw
    return [damro_reference(gen.model, st.w, prompt_ids(gen, q), px[i:i + 1], gen.image_token_id, **args)
            for i, q in enumerate(questions)]


# --------------------------------------------------------------------------- the pieces


def test_cls_outliers_rank_the_cls_row_of_one_full_width_attention():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    idx = D.cls_outliers(q, k, 3)
    for b in range(2):
        row = torch.softmax(q[b, 0] @ k[b].T / 8 ** 0.5, -1)[1:]  # CLS row, CLS column dropped
        assert idx[b].tolist() == sorted(range(5), key=lambda j: -float(row[j]))[:3]


def test_keep_image_tokens_shortens_every_row_alike():
    img = 9
    ids = torch.tensor([[0, 0, 5, img, img, img, 7], [5, 6, img, img, img, 7, 8]])
    mask = (torch.arange(7)[None] >= torch.tensor([[2], [0]])).long()
    new_ids, new_mask, new_img = D.keep_image_tokens(ids, mask, ids == img, 1)
    assert new_ids.tolist() == [[0, 0, 5, img, 7], [5, 6, img, 7, 8]]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert new_img.tolist() == [[False, False, False, True, False], [False, False, True, False, False]]


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("kw", [{"sample": False}, {"sample": False, "alpha": 2.0, "k": 4}])
def test_equals_the_no_cache_reference_with_w(st, kw):
    """MedAlign's defaults (alpha 0.5, K 10) and the authors' alpha 2 with K 4 of the 16 tokens;
    the strong setting visibly changes the answers, so the equality has power."""
    px = pixels(st.run, 3, seed=1)
    got = decode(st.run, "damro", QUESTIONS, px, **kw)
    assert got == _reference(st, QUESTIONS, px, **{k: v for k, v in kw.items() if k != "sample"})
    if kw.get("alpha") == 2.0:
        assert got != greedy(st.run, QUESTIONS, px)


def test_batched_equals_one_by_one(st):
    px = pixels(st.run, 3, seed=2)
    for kw in ({"sample": False, "k": 4, "alpha": 2.0}, {}):  # {}: the defaults sample, seeded per question
        assert decode(st.run, "damro", QUESTIONS, px, **kw) == one_by_one(st.run, "damro", QUESTIONS, px, **kw)


def test_alpha_0_is_greedy(st):
    px = pixels(st.run, 3, seed=3)
    assert decode(st.run, "damro", QUESTIONS, px, alpha=0.0, sample=False) == greedy(st.run, QUESTIONS, px)


def test_bad_settings_are_errors(st):
    with pytest.raises(MedAlignError, match="k=17 is more than the student's 16 image tokens"):
        decode(st.run, "damro", QUESTIONS[:1], pixels(st.run, 1), k=17)
    with pytest.raises(MedAlignError, match="k must be >= 1"):
        decode(st.run, "damro", QUESTIONS[:1], pixels(st.run, 1), k=0)
