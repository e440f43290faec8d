"""The decoding interface (evaluation/decoding): registry and CLI, keys, the Branch (cache, padding,
prefill from embeddings with W), the shared score pieces, metadata and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from decoding_helpers import (
    KEYS,
    QUESTIONS,
    make_student,
    make_w_run,
    pixels,
    prompt_ids,
    single_thread,  # noqa: F401 - the fixture, used by pytestmark
)
from PIL import Image

from evaluation import decoding as D
from evaluation import generate as G
from evaluation import generate_config as C
from evaluation.cli import main
from evaluation.decoding import base as B
from shared.errors import MedAlignError
from student_train import families as F

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("core") / "llama")


@pytest.fixture(scope="module")
def w_run(student, tmp_path_factory):
    return make_w_run(student, tmp_path_factory.mktemp("w_run"))


def _ctx(gen, qs, px, max_new_tokens=8, keys=None, seed=0):
    seqs = [prompt_ids(gen, q) for q in qs]
    ids, mask = B.left_pad(seqs, gen.pad_id)
    return B.DecodeContext(gen=gen, input_ids=ids, attention_mask=mask, prompts=seqs, pixels=px,
                           seeds=[B.question_seed(seed, k) for k in (keys or qs)], max_new_tokens=max_new_tokens,
                           family=gen.family)


# --------------------------------------------------------------------------- registry, keys, CLI


def test_registry_is_the_choice_list():
    names = D.names()
    assert names[:3] == ("greedy", "beam", "nucleus") and len(set(names)) == len(names)
    assert tuple(C.MethodChoices()) == names
    for n in names:
        m = D.get(n)
        assert m.name == n and m.summary and any(k.name == "sample" for k in m.keys), n
    with pytest.raises(MedAlignError, match="unknown --decoding 'nope'; valid: greedy, beam, nucleus"):
        D.get("nope")


def test_key_parsing():
    k = B.Key("alpha", float, 1.0, "")
    assert k.parse("0.5", "m") == 0.5 and k.parse(2, "m") == 2.0
    for bad in ("x", "nan", True, "none"):
        with pytest.raises(MedAlignError):
            k.parse(bad, "m")
    b = B.Key("sample", bool, True, "")
    assert [b.parse(v, "m") for v in ("false", "True", "0", "yes", False)] == [False, True, False, True, False]
    with pytest.raises(MedAlignError, match="expected bool"):
        b.parse("maybe", "m")
    i = B.Key("top_k", int, None, "", optional=True)
    assert i.parse("none", "m") is None and i.parse("50", "m") == 50
    with pytest.raises(MedAlignError):
        i.parse(2.5, "m")
    m = D.get("nucleus")
    with pytest.raises(MedAlignError, match="given twice"):
        m.parse(["top_p=0.5", "top_p=0.6"])


def test_cli_help_decoding_and_errors(student, tmp_path):
    r = CliRunner().invoke(main, ["generate", "--help-decoding", "nucleus"])
    assert r.exit_code == 0 and "top_p (float, default 0.9)" in r.output and "sample (bool, default true)" in r.output
    r = CliRunner().invoke(main, ["generate", "--help"])
    assert "--decoding [" + "|".join(D.names()) + "]" in r.output.replace("\n", "").replace("  ", " ")
    base = ["generate", "--model", str(student), "--data", "d.json", "--image-root", ".", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, base + ["--decoding", "beam", "--decoding-arg", "alpha=1"])
    assert r.exit_code == 2 and "unknown --decoding-arg 'alpha' for --decoding beam; valid: num_beams, sample" in r.output
    r = CliRunner().invoke(main, base + ["--decoding", "nope"])
    assert r.exit_code == 2 and "greedy" in r.output


def test_family_defaults_and_max_new_tokens():
    class Fam(B.Method):
        name = "fam-test"
        keys = (B.Key("temperature", float, 1.0, "T"), B.SAMPLE(True))

        def defaults(self, family):
            return {**super().defaults(family), "temperature": 0.7 if family.name == "huatuo" else 1.0}

        def max_new_tokens(self, family):
            return 128

    m = Fam()
    assert m.resolve(F.FAMILIES["huatuo"], {})["temperature"] == 0.7
    assert m.resolve(F.FAMILIES["llava-med"], {"temperature": 0.5})["temperature"] == 0.5
    assert "llava-med: 1.0, huatuo: 0.7" in m.help_text(list(F.FAMILIES.values()))
    with pytest.raises(MedAlignError, match="temperature must be > 0"):
        m.resolve(F.FAMILIES["huatuo"], {"temperature": 0.0})


# --------------------------------------------------------------------------- score pieces


def test_plausibility_cutoff_and_warpers():
    logits = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    p = logits.softmax(-1)
    scores = torch.tensor([[0.0, 5.0, 1.0, 9.0]])
    cut = B.plausible(scores, logits, 0.1)
    keep = p[0] >= 0.1 * p[0].max()
    assert torch.equal(torch.isfinite(cut[0]), keep) and torch.equal(cut[0][keep], scores[0][keep])
    assert torch.equal(B.plausible(scores, logits, 0.0), scores)
    assert torch.equal(B.contrast(logits, scores, 0.0), logits)
    assert torch.allclose(B.contrast(logits, scores, 1.0), 2 * logits - scores)
    w = B.warp(logits, 0.5, 2, None)
    assert torch.isfinite(w).sum() == 2 and torch.allclose(w[0, :2], logits[0, :2] / 0.5)
    w = B.warp(logits, 1.0, None, 0.5)  # p = .70, .26, ...: top-p 0.5 keeps only the first
    assert torch.isfinite(w).sum() == 1


def test_row_sampler_rows_are_independent():
    scores = torch.randn(3, 50)
    a = B.RowSampler([1, 2, 3], True)
    b = B.RowSampler([2], True)
    rows = [a(scores) for _ in range(5)]
    alone = [b(scores[1:2]) for _ in range(5)]
    assert [int(r[1]) for r in rows] == [int(x[0]) for x in alone]
    assert torch.equal(B.RowSampler([1, 2, 3], False)(scores), scores.argmax(-1))


# --------------------------------------------------------------------------- branches


def test_embeds_prefill_with_w_equals_generate_first_step(student, w_run):
    """A run with a non-zero W: the branch prefilled from inputs_embeds (+ the image mask) gives
    generate's first-step logits, and so does the ids prefill; without the mask W is not applied."""
    run_dir, _ = w_run
    gen = G.load_generator(student, run_dir)
    px = pixels(gen, 3)
    ctx = _ctx(gen, QUESTIONS, px)
    with torch.inference_mode():
        ref = gen.model.generate(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, pixel_values=px,
                                 max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=gen.pad_id).logits[0]
        from_ids = B.Branch(ctx).prefill(input_ids=ctx.input_ids, pixel_values=px)
        emb = ctx.embed(ctx.image_features())
        from_emb = B.Branch(ctx).prefill(inputs_embeds=emb, image_mask=ctx.image_mask)
        no_w = B.Branch(ctx).prefill(inputs_embeds=emb, image_mask=None)
    assert torch.allclose(from_ids, ref, atol=1e-5) and torch.allclose(from_emb, ref, atol=1e-5)
    assert (no_w - ref).abs().max() > 1e-2  # W really matters here


def test_branch_loop_equals_generate_greedy(student, w_run):
    """run_steps with the plain score and argmax = generate's greedy, batched (left padding) and alone;
    and every step of every branch feeds exactly one token (cached decoding)."""
    run_dir, _ = w_run
    gen = G.load_generator(student, run_dir)
    px = pixels(gen, 3, seed=1)
    dec = C.DecodingConfig(mode="greedy", max_new_tokens=10)
    want = G.generate_ids(gen, QUESTIONS, px, dec)
    lengths = []
    h = gen.model.model.language_model.register_forward_pre_hook(
        lambda _m, a, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with torch.inference_mode():
            for idx in ([0, 1, 2], [0], [1], [2]):
                ctx = _ctx(gen, [QUESTIONS[i] for i in idx], px[idx], max_new_tokens=10)
                main_b = B.Branch(ctx)
                first = [main_b.prefill(input_ids=ctx.input_ids, pixel_values=ctx.pixels)]
                got = B.run_steps(ctx, first, [main_b], lambda t, lg: lg[0], ctx.sampler(False))
                assert got == [want[i] for i in idx]
    finally:
        h.remove()
    assert all(n == 1 for n in lengths if n < 20) and sum(n > 20 for n in lengths) == 4  # 4 prefills


def test_branch_select_and_truncate(student):
    gen = G.load_generator(student)
    px = pixels(gen, 2, seed=2)
    ctx = _ctx(gen, QUESTIONS[:2], px)
    tok = torch.tensor
    with torch.inference_mode():
        a = B.Branch(ctx)
        a.prefill(input_ids=ctx.input_ids, pixel_values=px)
        n = a.length
        a.step(tok([5, 6]))
        a.step(tok([7, 8]))
        a.truncate(n + 1)
        got = a.step(tok([9, 10]))
        b = B.Branch(ctx)
        b.prefill(input_ids=ctx.input_ids, pixel_values=px)
        b.step(tok([5, 6]))
        want = b.step(tok([9, 10]))
        assert torch.allclose(got, want, atol=1e-5)
        b.select(tok([1, 1, 0]))  # reorder and repeat rows
        got = b.step(tok([11, 11, 12]))
        c = B.Branch(ctx)
        c.prefill(input_ids=ctx.input_ids, pixel_values=px)
        c.step(tok([5, 6]))
        c.step(tok([9, 10]))
        want = c.step(tok([12, 11]))
        assert torch.allclose(got, want[[1, 1, 0]], atol=1e-5)


def test_answers_stop_per_row():
    ans = B.Answers(2, [0], pad_id=9, device=torch.device("cpu"))
    assert ans.push(torch.tensor([3, 0])).tolist() == [3, 0]
    assert ans.push(torch.tensor([0, 4])).tolist() == [0, 9]  # row 1 finished: fed pad
    assert ans.done and ans.tokens == [[3], []]


# --------------------------------------------------------------------------- metadata and resume


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    recs = []
    for i, (rid, q) in enumerate(zip(KEYS, QUESTIONS)):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        recs.append({"id": rid, "image": f"img{i}.png", "answer_type": "OPEN",
                     "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "a"}]})
    (root / "test.json").write_text(json.dumps(recs))
    return root / "test.json", root


def test_resolved_args_in_metadata_and_resume_refuses_others(student, dataset, tmp_path):
    data, root = dataset
    out = tmp_path / "n.jsonl"
    args = ["generate", "--model", str(student), "--data", str(data), "--image-root", str(root), "--out", str(out),
            "--device", "cpu", "--max-new-tokens", "4", "--decoding", "nucleus"]
    r = CliRunner().invoke(main, args + ["--decoding-arg", "top_p=0.5", "--limit", "2"])
    assert r.exit_code == 0, r.output
    meta = [json.loads(x)["metadata"] for x in out.read_text().splitlines()]
    assert all(m["decoding_args"] == {"top_p": 0.5, "temperature": 1.0, "sample": True} and m["seed"] == 0
               for m in meta)
    r = CliRunner().invoke(main, args + ["--decoding-arg", "top_p=0.6"])
    assert r.exit_code == 2 and "written with other settings (decoding_args" in r.output
    r = CliRunner().invoke(main, args + ["--decoding-arg", "top_p=0.5"])  # the same: resumes, answers the third
    assert r.exit_code == 0 and "wrote 1 answer(s)" in r.output
