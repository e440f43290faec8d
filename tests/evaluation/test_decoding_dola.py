"""DoLa (evaluation/decoding/dola.py) against an independent reference: per step one FULL forward of
the prompt and the answer so far (no cache, one question at a time) with ``output_hidden_states``,
the early layers through ``lm_head`` without the final norm, the divergence and the relative top
written out, argmax. Batched (left-padded, different lengths) equals one-by-one."""

from __future__ import annotations

import math

import pytest
import torch
from decoding_helpers import KEYS, QUESTIONS, make_student, pixels, prompt_ids

from evaluation import decoding as D
from evaluation.decoding import base as B
from evaluation.decoding import dola as DL
from evaluation.generate import load_generator
from shared.errors import MedAlignError
from student_train import families as F

MAX_NEW = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model forwards gain nothing from intra-op threads and lose much on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return load_generator(make_student(tmp_path_factory.mktemp("dola") / "llama"))


def _ctx(gen, qs, px, keys=None, max_new=MAX_NEW):
    seqs = [prompt_ids(gen, q) for q in qs]
    ids, mask = B.left_pad(seqs, gen.pad_id)
    return B.DecodeContext(gen=gen, input_ids=ids, attention_mask=mask, prompts=seqs, pixels=px,
                           seeds=[B.question_seed(0, k) for k in (keys or qs)], max_new_tokens=max_new,
                           family=gen.family)


def _decode(gen, qs, px, keys=None, **over):
    m = D.get("dola")
    with torch.inference_mode():
        return m.decode(_ctx(gen, qs, px, keys), m.resolve(gen.family, over))


def _reference(gen, question, px, layers, mature=None, alpha=0.1, penalty=1.0, max_new=MAX_NEW):
    """Greedy DoLa for one question, straightforwardly: full forwards, no cache."""
    model = gen.model
    depth = model.config.text_config.num_hidden_layers
    mature = depth if mature is None else mature
    ids = prompt_ids(gen, question)
    answer: list[int] = []
    for _ in range(max_new):
        seq = torch.tensor([ids + answer])
        with torch.no_grad():
            out = model(input_ids=seq, pixel_values=px, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states  # embeddings, each layer's output; the last one after the final norm
        head = model.lm_head.weight.float()
        final = out.logits[0, -1].float() if mature == depth else hs[mature][0, -1].float() @ head.T
        logp_n = final - torch.logsumexp(final, -1)
        best, best_js = None, -1.0
        for j in layers:
            e = hs[j][0, -1].float() @ head.T
            logp_j = e - torch.logsumexp(e, -1)
            mid = 0.5 * (logp_n.exp() + logp_j.exp())
            js = 0.5 * ((mid * (mid.log() - logp_n)).mean() + (mid * (mid.log() - logp_j)).mean())
            if js.item() > best_js:
                best, best_js = logp_j, js.item()
        score = logp_n - best
        score[logp_n < logp_n.max() + math.log(alpha)] = float("-inf")
        if penalty != 1.0:
            for tok in set(ids + answer):
                score[tok] = score[tok] * penalty if score[tok] < 0 else score[tok] / penalty
        tok = int(score.argmax())
        if tok in gen.eos_ids:
            break
        answer.append(tok)
    return answer


# --------------------------------------------------------------------------- the maths


def test_relative_top_keeps_the_head_and_at_least_one_token():
    logp = torch.log_softmax(torch.tensor([[2.0, 1.9, -0.5, -5.0], [9.0, 0.0, 0.0, 0.0]]), -1)
    out = DL.relative_top_mask(logp, 0.1)
    assert out.tolist() == [[False, False, True, True], [False, True, True, True]]
    assert not DL.relative_top_mask(logp, 0.99)[:, 0].any()  # the best token always stays


def test_divergence_is_the_authors_formula_and_picks_per_row():
    g = torch.Generator().manual_seed(0)
    mature, early = torch.randn(3, 50, generator=g), torch.randn(4, 3, 50, generator=g)
    js = DL.layer_divergence(mature, early)
    p, q = mature.softmax(-1), early.softmax(-1)
    m = 0.5 * (p[None] + q)
    want = 0.5 * ((m * (m.log() - p[None].log())).mean(-1) + (m * (m.log() - q.log())).mean(-1))
    torch.testing.assert_close(js, want)
    scores, chosen = DL.dola_scores(mature, early, 0.0)
    assert chosen.tolist() == js.argmax(0).tolist()
    for b in range(3):  # alpha 0: every token, log p_N - log p_chosen
        torch.testing.assert_close(scores[b], mature[b].log_softmax(-1) - early[chosen[b], b].log_softmax(-1))


def test_layers_auto_is_medalign_set_below_the_mature_layer():
    assert DL.parse_layers("auto", 32) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert DL.parse_layers("auto", 28) == [0, 2, 4, 6, 8, 10, 12, 14]  # MedAlign's HuatuoGPT set too
    assert DL.parse_layers("auto", 4) == [0, 2]
    assert DL.parse_layers("3, 0", 4) == [3, 0]
    for bad in ("4", "0,0", "x", ""):
        with pytest.raises(MedAlignError, match="layers"):
            DL.parse_layers(bad, 4)


def test_keys_and_checks():
    m = D.get("dola")
    for fam in F.FAMILIES.values():
        args = m.resolve(fam, {})
        assert (args["alpha"], args["layers"], args["mature"], args["repetition_penalty"], args["sample"]) == \
            (0.1, "auto", None, 1.0, False)
        assert m.max_new_tokens(fam) == 1024  # MedAlign's DoLa calls, both families
    for bad in ({"alpha": 1.0}, {"repetition_penalty": 0}, {"mature": 0}, {"layers": "1,x"}):
        with pytest.raises(MedAlignError):
            m.resolve(F.FAMILIES["llava-med"], bad)
    text = m.help_text(list(F.FAMILIES.values()))
    assert "relative top" in text and "MedAlign's code:" in text and "repetition_penalty=1.2" in text


# --------------------------------------------------------------------------- the hooks


def test_tapped_states_are_the_hidden_states_without_the_final_norm(gen):
    """LayerTap's layer j == output_hidden_states[j] at the last position for j < N (0 = embeddings,
    j = the output of decoder layer j - 1, not normed); at j = N it is the raw stream too, whose
    final norm gives transformers' hidden_states[N] and, through lm_head, the model's logits."""
    model, px = gen.model, pixels(gen, 1)
    seq = torch.tensor([prompt_ids(gen, QUESTIONS[0])])
    norm = model.model.language_model.norm
    with torch.no_grad(), DL.LayerTap(model, [0, 1, 2, 3, 4]) as tap:
        out = model(input_ids=seq, pixel_values=px, output_hidden_states=True, use_cache=False)
        for j in range(4):
            torch.testing.assert_close(tap.take([j])[0], out.hidden_states[j][:, -1])
        last = tap.take([4])[0]
        assert not torch.allclose(last, out.hidden_states[4][:, -1])
        torch.testing.assert_close(norm(last), out.hidden_states[4][:, -1])
        torch.testing.assert_close(model.lm_head(norm(last)), out.logits[:, -1], rtol=1e-4, atol=1e-4)


def test_only_the_last_position_reaches_lm_head(gen):
    shapes = []
    handle = gen.model.lm_head.register_forward_hook(lambda _m, a, _o: shapes.append(tuple(a[0].shape)))
    try:
        _decode(gen, QUESTIONS, pixels(gen, 3), KEYS, layers="0,1,2,3")
    finally:
        handle.remove()
    assert shapes and all(s[-2] in (1, 3) and len(s) == 3 for s in shapes), shapes  # [B, 1, d] or [J, B, d]
    assert {s[0] for s in shapes} == {3, 4}  # the model's own call (B = 3) and the 4 early layers


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("over", [{"layers": "0,1,2,3"}, {"layers": "auto", "alpha": 0.3},
                                  {"layers": "0,1", "mature": 3}, {"layers": "1,2,3", "repetition_penalty": 1.5}])
def test_equals_the_reference_batched_and_one_by_one(gen, over):
    px = pixels(gen, 3)
    layers = DL.parse_layers(over["layers"], over.get("mature", 4))
    want = [_reference(gen, q, px[i:i + 1], layers, mature=over.get("mature"), alpha=over.get("alpha", 0.1),
                       penalty=over.get("repetition_penalty", 1.0)) for i, q in enumerate(QUESTIONS)]
    assert _decode(gen, QUESTIONS, px, KEYS, **over) == want
    for i, q in enumerate(QUESTIONS):
        assert _decode(gen, [q], px[i:i + 1], [KEYS[i]], **over) == [want[i]]
    assert any(len(set(w)) > 1 for w in want)  # the answers are not degenerate


def test_layer_is_chosen_per_question(gen):
    m = D.get("dola")
    px = pixels(gen, 3)
    _decode(gen, QUESTIONS, px, KEYS, layers="0,1,2,3")
    batched = [list(c) for c in m.chosen]
    for i, q in enumerate(QUESTIONS):
        _decode(gen, [q], px[i:i + 1], [KEYS[i]], layers="0,1,2,3")
        assert m.chosen[0] == batched[i]
    assert len({x for row in batched for x in row}) > 1


def test_sampling_is_seeded_per_question(gen):
    px = pixels(gen, 3)
    over = {"layers": "0,1,2,3", "sample": True, "alpha": 0.5, "temperature": 1.5}
    batched = _decode(gen, QUESTIONS, px, KEYS, **over)
    assert [_decode(gen, [q], px[i:i + 1], [KEYS[i]], **over)[0] for i, q in enumerate(QUESTIONS)] == batched
    assert batched != _decode(gen, QUESTIONS, px, KEYS, layers="0,1,2,3", alpha=0.5)
