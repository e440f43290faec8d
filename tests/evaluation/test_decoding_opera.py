"""OPERA (evaluation/decoding/opera.py) against an independent reference written from the authors'
``opera_beam_search``: per beam and per candidate one FULL forward of prompt + answer (no cache,
one question at a time) on an EAGER copy of the student with ``output_attentions``, the column
products, the image bonus, the rollback lists and the beam bookkeeping written out in plain
Python. Batched (left-padded, different lengths) equals one-by-one; a constructed setting makes the
rollback fire; with every token a candidate, no penalty and no rollback it is transformers' beam search."""

from __future__ import annotations

import copy

import pytest
import torch
from decoding_helpers import KEYS, QUESTIONS, make_student, pixels, prompt_ids
from transformers import LlavaForConditionalGeneration

from evaluation import decoding as D
from evaluation.decoding import _opera_rules as R
from evaluation.decoding import base as B
from evaluation.decoding import opera as O
from evaluation.generate import load_generator
from shared.errors import MedAlignError
from student_train import families as F


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model forwards gain nothing from intra-op threads and lose much on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("opera") / "llama")


@pytest.fixture(scope="module")
def gen(student):
    return load_generator(student)


@pytest.fixture(scope="module")
def eager(student):
    return LlavaForConditionalGeneration.from_pretrained(student, attn_implementation="eager").eval()


def _decode(gen, qs, px, keys, max_new, **over):
    seqs = [prompt_ids(gen, q) for q in qs]
    ids, mask = B.left_pad(seqs, gen.pad_id)
    ctx = B.DecodeContext(gen=gen, input_ids=ids, attention_mask=mask, prompts=seqs, pixels=px,
                          seeds=[B.question_seed(0, k) for k in keys], max_new_tokens=max_new, family=gen.family)
    m = D.get("opera")
    with torch.inference_mode():
        return m.decode(ctx, m.resolve(gen.family, over)), list(m.rollbacks)


# --------------------------------------------------------------------------- the reference


def _mode(values):
    return min(values, key=lambda v: (-values.count(v), v))


class _Hyps:
    def __init__(self, k):
        self.k, self.items, self.done = k, [], False

    def add(self, tokens, s, length):
        score = s / length
        if len(self.items) < self.k or score > min(x[0] for x in self.items):
            self.items.append((score, list(tokens)))
            if len(self.items) > self.k:
                del self.items[min(range(len(self.items)), key=lambda i: (self.items[i][0], i))]

    def is_done(self, best, length):
        return len(self.items) >= self.k and min(x[0] for x in self.items) >= best / length


def _reference(gen, eager, question, px, *, k=5, c=5, scale=25.0, threshold=25, weight=1.0, half=True,
               max_new=10):
    """OPERA for one question, straightforwardly (see the module docstring); returns (answer, rollbacks)."""
    prompt = prompt_ids(gen, question)
    t = len(prompt)
    image = [j for j, tok in enumerate(prompt) if tok == gen.image_token_id]
    eos = set(gen.eos_ids)

    with torch.no_grad():  # the prompt's embeddings with the image features at its image positions (a
        # candidate may be the image token id itself: it is a plain token there, never an image slot)
        feats = torch.cat(list(eager.model.get_image_features(pixel_values=px, return_dict=True).pooler_output))
        embed = eager.get_input_embeddings()
        prompt_emb = embed(torch.tensor(prompt)).index_put((torch.tensor(image),), feats)

    def run(answers):  # one full forward of equally long answers -> last logits [N, V], attention [N, S, S]
        with torch.no_grad():
            emb = torch.stack([torch.cat([prompt_emb, embed(torch.tensor(a, dtype=torch.long))]) for a in answers])
            out = eager(inputs_embeds=emb, output_attentions=True, use_cache=False)
        att = out.attentions[-1].float().amax(1)
        return out.logits[:, -1].float(), att / att.sum(-1, keepdim=True)

    def col_scores(win):  # [m, m] lower-triangular
        out = []
        for j in range(win.shape[0]):
            s = 1e-7 * (scale * win[j:, j]).prod()
            out.append(float(s.half() if half else s))
        return out

    vocab = eager.config.text_config.vocab_size
    beams, bscores, hyps = [[] for _ in range(k)], [0.0] + [-1e9] * (k - 1), _Hyps(k)
    history, locs, times, rejects = [], [], [0] * 512, [[] for _ in range(512)]
    sel, rollbacks = None, 0
    while True:
        history.append({"beams": [list(b) for b in beams], "bscores": list(bscores), "hyps": copy.deepcopy(hyps),
                        "sel": sel})
        n = len(beams[0])
        cand, beam_locs = [], []
        values, tokens = torch.topk(run(beams)[0], c)
        _, att = run([beams[b] + [tok] for b in range(k) for tok in tokens[b].tolist()])
        for b in range(k):
            cand_locs = []
            for j, (v, tok) in enumerate(zip(values[b].tolist(), tokens[b].tolist())):
                a = att[b * c + j]
                win = a[t:t + n + 1, t:t + n + 1]
                scores = col_scores(win)
                loc = scores.index(max(scores))
                penalty = -float(a[t + n, image].sum()) if n + 1 <= 10 else max(scores)
                cand.append((b, tok, v - weight * penalty))
                cand_locs.append(loc)
            beam_locs.append(_mode(cand_locs))
        locs.append(beam_locs)
        loc = _mode(beam_locs)
        nxt = None
        if all(sum(step[b] == loc for step in locs) > threshold for b in range(k)) and loc >= 10:
            pos = loc + 1
            if times[pos] >= c:
                pos -= 1
            if times[pos] < c:
                times[pos] += 1
                for j in range(n + 1 - pos - 2):
                    history.pop()
                    locs.pop()
                    rejects[-(j + 1)] = []
                restore, chooser = history[-2], history[-1]
                history.pop()
                locs.pop()
                rejects[pos + 1] = []
                rejects[pos] = rejects[pos] + [bb * vocab + tt for bb, tt in zip(*chooser["sel"])]
                beams, bscores, hyps = restore["beams"], restore["bscores"], restore["hyps"]
                n = len(beams[0])
                logits = run(beams)[0]
                nxt = (logits - (999.0 + logits.min(-1, keepdim=True).values)).reshape(-1)
                nxt[rejects[pos]] = -999.0
                nxt = nxt.reshape(k, vocab)
                rollbacks += 1
        if nxt is None:
            nxt = torch.full((k, vocab), -999.0)
            for b, tok, s in cand:
                nxt[b, tok] = s
        flat = (nxt.log_softmax(-1) + torch.tensor(bscores)[:, None]).reshape(-1).tolist()
        top = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[: (1 + len(eos)) * k]
        new = []
        for rank, i in enumerate(top):
            b, tok = divmod(i, vocab)
            if tok in eos:
                if rank < k:
                    hyps.add(beams[b], flat[i], n + 1)
            else:
                new.append((flat[i], b, tok))
            if len(new) == k:
                break
        hyps.done = hyps.done or hyps.is_done(flat[top[0]], n + 1)
        sel = ([b for _, b, _ in new], [tok for _, _, tok in new])
        beams, bscores = [beams[b] + [tok] for _, b, tok in new], [s for s, _, _ in new]
        if hyps.done or len(beams[0]) >= max_new:
            break
    if not hyps.done:
        for b in range(k):
            hyps.add(beams[b], bscores[b], len(beams[b]))
    best = hyps.items[0]
    for item in hyps.items[1:]:
        if item[0] >= best[0]:
            best = item
    return best[1], rollbacks


# --------------------------------------------------------------------------- the rules


def test_column_scores_and_the_authors_float16_storage():
    g = torch.Generator().manual_seed(0)
    win = torch.rand(2, 6, 6, generator=g).tril()
    got = R.column_scores(win, 7.0, None)
    for j in range(6):
        torch.testing.assert_close(got[..., j], 1e-7 * (7.0 * win[..., j:, j]).prod(-1))
    assert R.column_scores(torch.full((1, 1), 0.01), 1.0, torch.float32).item() == 0.0  # 1e-9: under fp16
    assert R.column_scores(torch.full((3, 3), 1.0).tril(), 1e5, torch.float32)[0].item() == float("inf")
    assert R.column_scores(torch.full((1, 1), 0.01), 1.0, None).item() > 0


def test_over_trust_is_the_image_bonus_for_the_first_ten_tokens():
    mass = torch.tensor([[0.3, 0.7]])
    for m, bonus in ((10, True), (11, False)):
        win = torch.rand(1, 2, m, m).tril()
        penalty, loc = R.over_trust(win, mass, 50.0, None)
        scores = R.column_scores(win, 50.0, None)
        want = -mass if bonus else scores.max(-1).values
        torch.testing.assert_close(penalty, want)
        assert loc.tolist() == scores.argmax(-1).tolist()


def test_mode_is_torch_mode_on_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (200, 5), generator=g)
    assert R.mode(x).tolist() == torch.mode(x, dim=-1).values.tolist()


def _state(n, k=2):
    return R.State(torch.full((k, n), n), R.Hypotheses(k), torch.zeros(k), torch.arange(k) + 100 + n,
                   torch.arange(k).flip(0))


def test_rollback_rule_on_a_constructed_history():
    """Two beam slots whose summary location is 12 from step 13 on: with threshold 2, the 3rd such
    step (m = 16) rolls back to position 13, restoring the state of iteration 13 and rejecting the
    tokens iteration 13 chose; each position takes C rollbacks, then the one before it, then none."""
    retro, vocab = R.Retrospection(threshold=2, num_candidates=2), 1000
    for n in range(16):
        retro.push(_state(n), torch.tensor([12, 12]) if n >= 13 else torch.tensor([n, 3]))
        if n < 15:
            assert retro.check(12 if n >= 13 else 3, n + 1, vocab) is None
    back = retro.check(12, 16, vocab)
    assert back is not None and back.position == 13 and back.restore.n == 13
    chooser = _state(14)  # iteration 14 holds the choice made at 13
    assert back.rejected.tolist() == (chooser.sel_beams * vocab + chooser.sel_tokens).tolist()
    assert [s.n for s in retro.states] == list(range(14)) and len(retro.locs) == 14
    assert retro.check(3, 14, vocab) is None  # slot 1 holds location 3 twice only: not more than 2
    # the same position again: the rejections accumulate; after C = 2 the position before it; then none
    positions = []
    for _ in range(4):
        while len(retro.states) < 16:
            n = len(retro.states)
            retro.push(_state(n), torch.tensor([12, 12]))
        back = retro.check(12, 16, vocab)
        positions.append(None if back is None else (back.position, back.restore.n, len(back.rejected)))
    assert positions == [(13, 13, 4), (12, 12, 2), (12, 12, 4), None]
    assert retro.count == 4


def test_no_rollback_to_a_summary_token_before_position_ten():
    retro = R.Retrospection(threshold=0, num_candidates=5)
    for n in range(12):
        retro.push(_state(n), torch.tensor([9, 9]))
    assert retro.check(9, 12, 1000) is None


def test_hypotheses_keep_the_best_and_stop():
    h = R.Hypotheses(2)
    h.add([1], -2.0, 2)
    h.add([2], -3.0, 1)
    h.add([3], -1.0, 1)
    assert sorted(s for s, _ in h.items) == [-1.0, -1.0] and h.best() == [3]  # ties: the one added last
    assert h.is_done(-2.1, 2) and not h.is_done(-1.9, 2)


# --------------------------------------------------------------------------- keys


def test_family_defaults_and_checks():
    m = D.get("opera")
    lm, hu = m.resolve(F.FAMILIES["llava-med"], {}), m.resolve(F.FAMILIES["huatuo"], {})
    assert (lm["scale_factor"], lm["threshold"], hu["scale_factor"], hu["threshold"]) == (25.0, 25, 50.0, 15)
    assert (lm["num_beams"], lm["num_attn_candidates"], lm["penalty_weights"], lm["sample"]) == (5, 5, 1.0, False)
    assert m.max_new_tokens(F.FAMILIES["llava-med"]) == m.max_new_tokens(F.FAMILIES["huatuo"]) == 128
    for bad in ({"sample": True}, {"num_beams": 0}, {"threshold": -1}, {"score_dtype": "float16"}):
        with pytest.raises(MedAlignError):
            m.resolve(F.FAMILIES["llava-med"], bad)
    text = m.help_text(list(F.FAMILIES.values()))
    assert "llava-med: 25.0, huatuo: 50.0" in text and "34..610" in text


# --------------------------------------------------------------------------- against the reference


def test_equals_the_reference_batched_and_one_by_one(gen, eager):
    """MedAlign's LLaVA-Med settings (5 beams, 5 candidates, scale 25, threshold 25)."""
    px = pixels(gen, 3)
    want = [_reference(gen, eager, q, px[i:i + 1], max_new=8)[0] for i, q in enumerate(QUESTIONS)]
    got, _ = _decode(gen, QUESTIONS, px, KEYS, 8)
    assert got == want
    for i, q in enumerate(QUESTIONS):
        assert _decode(gen, [q], px[i:i + 1], [KEYS[i]], 8)[0] == [want[i]]
    assert len({tuple(w) for w in want}) == 3


@pytest.mark.parametrize("score_dtype", ["float32", "model"])
def test_rollback_fires_and_equals_the_reference(gen, eager, score_dtype):
    """scale 100, threshold 2 on this student: summary tokens at positions >= 10 that every beam keeps
    attending to, so the search rolls back (measured: question "CT?" rolls back at its 16th token)."""
    over = {"num_beams": 3, "num_attn_candidates": 3, "scale_factor": 100.0, "threshold": 2,
            "score_dtype": score_dtype}
    qs, px = [QUESTIONS[2], QUESTIONS[0]], pixels(gen, 3)[[2, 0]]
    ref = [_reference(gen, eager, q, px[i:i + 1], k=3, c=3, scale=100.0, threshold=2,
                      half=score_dtype == "model", max_new=20) for i, q in enumerate(qs)]
    got, rollbacks = _decode(gen, qs, px, [KEYS[2], KEYS[0]], 20, **over)
    assert got == [a for a, _ in ref]
    assert rollbacks == [r for _, r in ref] and rollbacks[0] > 0


def test_every_token_a_candidate_without_penalty_or_rollback_is_beam_search(gen):
    qs, px = QUESTIONS[:2], pixels(gen, 2)
    vocab = gen.model.config.text_config.vocab_size
    got, _ = _decode(gen, qs, px, KEYS[:2], 8, num_beams=3, num_attn_candidates=vocab, penalty_weights=0.0,
                     threshold=10 ** 6)
    for i, q in enumerate(qs):
        with torch.inference_mode():
            out = gen.model.generate(input_ids=torch.tensor([prompt_ids(gen, q)]), pixel_values=px[i:i + 1],
                                     num_beams=3, do_sample=False, max_new_tokens=8, pad_token_id=gen.pad_id,
                                     eos_token_id=gen.eos_ids)
        row = out[0, len(prompt_ids(gen, q)):].tolist()
        assert got[i] == row[:next((j for j, tok in enumerate(row) if tok in gen.eos_ids), len(row))]


def test_only_the_last_layer_attention_through_the_registered_function(gen):
    """No forward asks for output_attentions; the language model runs on OPERA's attention function
    during the decode and on its own implementation after."""
    seen = []
    model = gen.model
    before = model.config.text_config._attn_implementation
    handle = model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append((kw.get("output_attentions"), model.config.text_config._attn_implementation)),
        with_kwargs=True)
    try:
        _decode(gen, QUESTIONS[:1], pixels(gen, 1), KEYS[:1], 4)
    finally:
        handle.remove()
    assert seen and all(not oa and impl == O.OPERA_IMPL for oa, impl in seen)
    assert model.config.text_config._attn_implementation == before
    assert not hasattr(model.model.language_model.layers[-1].self_attn, O._MARK)
