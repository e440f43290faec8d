"""`medalign-eval generate`: prompts as in training, batched = one-by-one, adapter + W, resume, scoring.

Every model here is a tiny random-weight student (student_train.tiny), built once per module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from decoding_helpers import LAYER, make_w_run
from PIL import Image

from evaluation import generate as G
from evaluation import generate_config as C
from evaluation import questions as Q
from student_train import families as F
from student_train import inputs as I
from evaluation.cli import main
from student_train.tiny import save_tiny_llava

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("gen") / "llama", "llama", layers=4, seed=0)


@pytest.fixture(scope="module")
def zero_run(student, tmp_path_factory):
    return make_w_run(student, tmp_path_factory.mktemp("zero_run"), 0.0)[0]


@pytest.fixture(scope="module")
def w_run(student, tmp_path_factory):
    return make_w_run(student, tmp_path_factory.mktemp("w_run"), 3.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """5 records: int and string ids, CLOSED/OPEN, non-square images of different sizes."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    sizes = [(40, 24), (24, 40), (32, 32), (50, 30), (20, 36)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    qa = [(10, "Is there a mass?", "no", "CLOSED"),
          ("a11", "What organ is shown in this image?", "liver", "OPEN"),
          (12, "Is the liver normal? Please choose from the following two options: [yes, no]", "yes", "CLOSED"),
          (13, "Where is the lesion located in the left upper lobe of the lung?", "left", "OPEN"),
          ("14", "Are the kidneys enlarged?", "yes", "CLOSED")]
    recs = [{"id": rid, "image": f"img{i}.png", "answer_type": at,
             "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
            for i, (rid, q, a, at) in enumerate(qa)]
    data = root / "test.json"
    data.write_text(json.dumps(recs))
    return data, root


def _pixels(gen, root, names):
    return torch.stack([I.student_pixels(gen.image_processor, root / n, gen.background) for n in names])


# --------------------------------------------------------------------------- inputs as in training


def test_prompt_tokens_equal_training_encoding(student):
    """The generation prompt is the training sample's prefix (image tokens expanded as in training)."""
    from student_train.inputs import adds_bos, encode_sample, expand
    from student_train.model import load_student
    from student_train.templates import get_template

    _, tok = load_student(student)
    img = tok.convert_tokens_to_ids("<image>")
    for name in ("vicuna_v1", "mistral_instruct", "llava_v1"):
        t = get_template(name)
        for q in ("Is there a mass?", "What organ is shown in this image?  "):
            enc = encode_sample(tok, t, q, "the liver", img)
            train = expand(enc, img, 16)
            prompt_len = int((train["labels"] == -100).sum())
            ids, q_start = I.encode_prompt(tok, t, q, img, 16, add_bos=adds_bos(tok))
            assert ids == train["input_ids"][:prompt_len].tolist(), name
            # the query rows of L_att are exactly the prompt tokens after the image
            assert train["query_mask"].nonzero().squeeze(1).tolist() == list(range(q_start, len(ids)))


def test_left_pad():
    ids, mask = G.left_pad([[5, 6, 7], [8], [1, 2]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 1, 2]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


# --------------------------------------------------------------------------- closed suffix, questions


def test_closed_suffix_modes():
    s = Q.CLOSED_SUFFIX
    assert s == " Please choose from the following two options: [yes, no]"
    assert Q.with_closed_suffix("Is it?", "CLOSED", "auto") == "Is it?" + s
    assert Q.with_closed_suffix("What?", "OPEN", "auto") == "What?"
    assert Q.with_closed_suffix("What?", None, "auto") == "What?"
    assert Q.with_closed_suffix("What?", "OPEN", "always") == "What?" + s
    assert Q.with_closed_suffix("Is it?", "CLOSED", "never") == "Is it?"
    already = "Is it? Please choose from the following two options: [Yes, No]"
    assert Q.with_closed_suffix(already, "CLOSED", "auto") == already
    assert Q.with_closed_suffix(already, "CLOSED", "always") == already


def test_load_questions_ids_and_suffix(dataset):
    data, _ = dataset
    qs = Q.load_questions(data)
    assert [q.qid for q in qs] == [10, "a11", 12, 13, "14"]
    assert qs[0].question == "Is there a mass?" + Q.CLOSED_SUFFIX
    assert qs[1].question == "What organ is shown in this image?"
    assert qs[2].question.count("Please choose") == 1
    assert [q.qid for q in Q.load_questions(data, limit=2)] == [10, "a11"]
    assert Q.load_questions(data, "never")[0].question == "Is there a mass?"


def test_load_questions_refuses_duplicates_and_no_image(tmp_path):
    from shared.errors import MedAlignError

    conv = [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": conv},
                             {"id": "1", "image": "b.png", "conversations": conv},
                             {"id": 2, "conversations": conv}]))
    with pytest.raises(MedAlignError, match=r"2 record\(s\).*repeats record 0.*no image"):
        Q.load_questions(p)


def test_template_resolution(student, zero_run, tmp_path):
    from shared.errors import MedAlignError

    assert G.resolve_template(student, None, None)[0].name == "vicuna_v1"          # medalign.json
    assert G.resolve_template(student, None, "llava_v1")[0].name == "llava_v1"     # --template, no run
    assert G.resolve_template(student, zero_run, None)[0].name == "vicuna_v1"      # run config
    with pytest.raises(MedAlignError, match="trained with the vicuna_v1 template"):
        G.resolve_template(student, zero_run, "llava_v1")
    run2 = tmp_path / "run2"
    run2.mkdir()
    (run2 / "config.json").write_text(json.dumps({"data": {"template": None}}))
    (run2 / "data_stats.json").write_text(json.dumps({"template": "mistral_instruct"}))
    assert G.run_template_name(run2) == "mistral_instruct"


def test_decoding_kwargs():
    from shared.errors import MedAlignError

    fam = F.FAMILIES["llava-med"]
    assert C.DecodingConfig(mode="greedy", max_new_tokens=128).resolved(fam).generate_kwargs() == {
        "max_new_tokens": 128, "do_sample": False, "num_beams": 1}
    b = C.DecodingConfig(mode="beam", args={"num_beams": 3}, max_new_tokens=8).resolved(fam).generate_kwargs()
    assert b["num_beams"] == 3 and b["do_sample"] is False
    assert C.DecodingConfig(mode="beam", args=("num_beams=3",), max_new_tokens=8).resolved(fam).generate_kwargs() == b
    nuc = C.DecodingConfig(mode="nucleus", args={"top_p": 0.8, "temperature": 0.7}, max_new_tokens=8).resolved(fam)
    # nucleus draws in G.PerQuestionSampler (one stream per question); generate's own step is greedy
    assert nuc.samples and nuc.generate_kwargs() == {"max_new_tokens": 8, "do_sample": False, "num_beams": 1}
    assert nuc.params == {"top_p": 0.8, "temperature": 0.7, "sample": True}
    with pytest.raises(MedAlignError, match="unknown --decoding 'sample'; valid: greedy, beam, nucleus"):
        C.DecodingConfig(mode="sample")
    with pytest.raises(MedAlignError, match="unknown --decoding-arg 'top_p' for --decoding beam; valid: num_beams, sample"):
        C.DecodingConfig(mode="beam", args=("top_p=0.9",))
    with pytest.raises(MedAlignError, match="expected int"):
        C.DecodingConfig(mode="beam", args=("num_beams=many",))
    with pytest.raises(MedAlignError, match="not KEY=VALUE"):
        C.DecodingConfig(mode="beam", args=("num_beams",))
    for mode, bad in (("nucleus", dict(top_p=0)), ("nucleus", dict(temperature=0)), ("beam", dict(num_beams=0)),
                      ("greedy", dict(sample=True))):
        with pytest.raises(MedAlignError):
            C.DecodingConfig(mode=mode, args=bad).resolved(fam)


def test_defaults_are_the_reference_evaluation(tmp_path):
    """Beam search with 5 beams and no early_stopping (the reference passes none), max_new_tokens and
    half precision per student family (LLaVA-Med: 1024, float16; HuatuoGPT: 128, bfloat16; on CUDA)."""
    from shared.errors import MedAlignError

    dec = C.DecodingConfig()
    assert (dec.mode, dec.max_new_tokens) == ("beam", "auto")
    assert dec.resolved(F.FAMILIES["huatuo"]).params == {"num_beams": 5, "sample": False}
    with pytest.raises(MedAlignError, match="resolved"):
        dec.generate_kwargs()
    for backbone, (tokens, half) in {"llama": (1024, "float16"), "mistral": (1024, "float16"),
                                     "qwen2": (128, "bfloat16")}.items():
        d = tmp_path / backbone
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": backbone}}))
        fam = F.student_family(d)
        kw = dec.resolved(fam).generate_kwargs()
        assert kw == {"max_new_tokens": tokens, "do_sample": False, "num_beams": 5}  # no early_stopping
        cfg = C.GenerateConfig(model=str(d), data="t.json", image_root=".", out="o.jsonl")
        assert cfg.dtype == "auto"
        assert cfg.resolved(fam, torch.device("cuda")).dtype == half
        on_cpu = cfg.resolved(fam, torch.device("cpu"))
        assert on_cpu.dtype == "float32" and on_cpu.decoding.max_new_tokens == tokens
        # explicit settings win over the family's
        explicit = C.GenerateConfig(model=str(d), data="t.json", image_root=".", out="o.jsonl", dtype="float32",
                                    decoding=C.DecodingConfig(mode="greedy", max_new_tokens=7))
        r = explicit.resolved(fam, torch.device("cuda"))
        assert (r.dtype, r.decoding.mode, r.decoding.max_new_tokens) == ("float32", "greedy", 7)
    with pytest.raises(MedAlignError, match="integer or auto"):
        C.DecodingConfig(max_new_tokens="many")


def test_cli_defaults_write_beam_metadata(student, dataset, tmp_path):
    """``medalign-eval generate`` with no decoding flags answers with 5-beam search, and the line's
    metadata records the resolved settings (a resumed file is compared against those)."""
    from click.testing import CliRunner

    from evaluation.cli import main

    data, root = dataset
    out = tmp_path / "beam.jsonl"
    res = CliRunner().invoke(main, ["generate", "--model", str(student), "--data", str(data), "--image-root",
                                    str(root), "--out", str(out), "--limit", "2", "--device", "cpu",
                                    "--max-new-tokens", "6"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    meta = [json.loads(x)["metadata"] for x in out.read_text().splitlines()]
    assert len(meta) == 2 and all(m["decoding"] == "beam" and m["decoding_args"] == {"num_beams": 5, "sample": False}
                                  and m["max_new_tokens"] == 6 and m["dtype"] == "float32" and "seed" not in m
                                  for m in meta)
    assert "beam (num_beams=5, sample=false)" in res.output and "llava-med default: 1024" in res.output


# --------------------------------------------------------------------------- generation


def test_batched_equals_one_by_one_greedy(student, dataset):
    """Batch of 3 with different prompt lengths, LEFT-padded: the same tokens as one at a time."""
    _, root = dataset
    gen = G.load_generator(student)
    qs = ["Is there a mass?", "Where is the lesion located in the left upper lobe of the lung and is it a mass?",
          "CT?"]
    lens = [len(I.encode_prompt(gen.tokenizer, gen.template, q, gen.image_token_id, 16, add_bos=True)[0]) for q in qs]
    assert len(set(lens)) == 3
    px = _pixels(gen, root, ["img0.png", "img1.png", "img2.png"])
    dec = C.DecodingConfig(mode="greedy", max_new_tokens=12)
    batched = G.generate_ids(gen, qs, px, dec)
    single = [G.generate_ids(gen, [q], px[i:i + 1], dec)[0] for i, q in enumerate(qs)]
    assert batched == single
    assert all(len(x) > 0 for x in batched)
    # and the greedy tokens are the argmax of an independent no-cache forward, step by step
    assert single[2] == _manual_greedy(gen.model, gen, qs[2], px[2:3], 12)


def test_batched_equals_one_by_one_beam(student, dataset):
    """The default decoding (5 beams, no early stopping), LEFT-padded batch of 3 prompts of different
    lengths: the same answers as one question at a time."""
    _, root = dataset
    gen = G.load_generator(student)
    qs = ["Is there a mass?", "Where is the lesion located in the left upper lobe of the lung and is it a mass?",
          "CT?"]
    px = _pixels(gen, root, ["img0.png", "img1.png", "img2.png"])
    dec = C.DecodingConfig(mode="beam", args={"num_beams": 5}, max_new_tokens=12)
    batched = G.generate_ids(gen, qs, px, dec)
    single = [G.generate_ids(gen, [q], px[i:i + 1], dec)[0] for i, q in enumerate(qs)]
    assert batched == single and all(len(x) > 0 for x in batched)
    greedy = [G.generate_ids(gen, [q], px[i:i + 1], C.DecodingConfig(mode="greedy", max_new_tokens=12))[0]
              for i, q in enumerate(qs)]
    assert greedy != single  # beam search is not greedy here, so the comparison means something


def _manual_greedy(model, gen, question, px, steps, rotation=None):
    """Greedy decoding by full recomputation (no KV cache, no generate). ``rotation = (W, layer)``
    adds ``X W^T`` to the image positions of ``layers[layer-1]``'s output in every forward
    (independent of student_train.alignment)."""
    ids, _ = I.encode_prompt(gen.tokenizer, gen.template, question, gen.image_token_id, gen.num_image_tokens,
                             add_bos=gen.add_bos)
    seq = torch.tensor([ids])
    handle = None
    if rotation is not None:
        w, layer = rotation
        state = {}

        def hook(_m, _a, out):
            h = out[0] if isinstance(out, tuple) else out
            vm = state["vm"]
            h = h.clone()
            h[vm] = h[vm] + h[vm].float() @ w.t()
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

        handle = model.model.language_model.layers[layer - 1].register_forward_hook(hook)
    out = []
    try:
        with torch.no_grad():
            for _ in range(steps):
                if rotation is not None:
                    state["vm"] = seq == gen.image_token_id
                logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), pixel_values=px,
                               use_cache=False).logits
                nxt = int(logits[0, -1].argmax())
                if nxt in gen.eos_ids:
                    break
                out.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    finally:
        if handle is not None:
            handle.remove()
    return out


def test_zero_adapter_equals_base(student, zero_run, dataset):
    _, root = dataset
    base = G.load_generator(student)
    run = G.load_generator(student, zero_run)
    qs = ["Is there a mass?", "What organ is shown in this image?"]
    px = _pixels(base, root, ["img0.png", "img3.png"])
    dec = C.DecodingConfig(mode="greedy", max_new_tokens=10)
    assert G.generate_ids(run, qs, px, dec) == G.generate_ids(base, qs, px, dec)


def test_rotation_applied_at_prefill(student, w_run, dataset):
    """W != 0 changes the answers, and generate (KV cache: W on the prefill only) equals an
    independent no-cache greedy loop that rotates the image positions of every full forward."""
    run_dir, w = w_run
    _, root = dataset
    base = G.load_generator(student)
    run = G.load_generator(student, run_dir)
    qs = ["Is there a mass?", "What organ is shown in this image?", "Are the kidneys enlarged?"]
    px = _pixels(base, root, ["img0.png", "img1.png", "img4.png"])
    dec = C.DecodingConfig(mode="greedy", max_new_tokens=10)
    with_w = G.generate_ids(run, qs, px, dec)
    without = G.generate_ids(base, qs, px, dec)
    assert with_w != without
    for i, q in enumerate(qs):
        assert with_w[i] == _manual_greedy(base.model, base, q, px[i:i + 1], 10, rotation=(w, LAYER))


def test_beam_and_nucleus_are_seeded(student, dataset):
    _, root = dataset
    gen = G.load_generator(student)
    qs = ["Is there a mass?", "CT?"]
    px = _pixels(gen, root, ["img0.png", "img1.png"])

    def nuc(seed):
        return C.DecodingConfig(mode="nucleus", max_new_tokens=8, args={"top_p": 0.95}, seed=seed)

    a = G.generate_ids(gen, qs, px, nuc(5))
    assert a == G.generate_ids(gen, qs, px, nuc(5))
    assert any(G.generate_ids(gen, qs, px, nuc(s)) != a for s in (6, 7, 8))
    beam = C.DecodingConfig(mode="beam", args={"num_beams": 3}, max_new_tokens=8)
    assert G.generate_ids(gen, qs, px, beam) == G.generate_ids(gen, qs, px, beam)


def test_nucleus_batch_equals_one_by_one(student, dataset):
    """Each question samples from its own stream (seed, id): in a batch of 3, alone, or in another
    order it draws the same tokens."""
    _, root = dataset
    gen = G.load_generator(student)
    qs = ["Is there a mass?", "Where is the lesion located in the left upper lobe of the lung and is it a mass?",
          "CT?"]
    keys = ["10", "a11", "12"]
    px = _pixels(gen, root, ["img0.png", "img1.png", "img2.png"])
    dec = C.DecodingConfig(mode="nucleus", max_new_tokens=10, args={"top_p": 0.9, "temperature": 1.0}, seed=3)
    batched = G.generate_ids(gen, qs, px, dec, keys=keys)
    single = [G.generate_ids(gen, [q], px[i:i + 1], dec, keys=[keys[i]])[0] for i, q in enumerate(qs)]
    assert batched == single
    rev = G.generate_ids(gen, qs[::-1], px.flip(0), dec, keys=keys[::-1])
    assert rev[::-1] == batched
    greedy = G.generate_ids(gen, qs, px, C.DecodingConfig(mode="greedy", max_new_tokens=10))
    assert greedy != batched  # it really samples


def test_per_question_sampler_matches_top_p_sampling():
    """The sampler's distribution: temperature, then the smallest top-p set (at least one token),
    renormalised: checked against a direct computation by drawing many times from fixed scores."""
    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    t, top_p = 0.7, 0.8
    p = torch.softmax(scores[0] / t, -1)
    order = torch.argsort(p, descending=True)
    keep, mass = [], 0.0
    for i in order.tolist():  # add tokens until the kept mass reaches top_p
        keep.append(i)
        mass += float(p[i])
        if mass >= top_p:
            break
    want = torch.zeros(5)
    want[keep] = p[keep] / p[keep].sum()
    counts = torch.zeros(5)
    for k in range(4000):
        out = G.PerQuestionSampler([k], top_p, t)(None, scores)
        assert torch.isfinite(out).sum() == 1
        counts[int(out[0].argmax())] += 1
    assert torch.allclose(counts / counts.sum(), want, atol=0.03)
    assert counts[[i for i in range(5) if i not in keep]].sum() == 0


# --------------------------------------------------------------------------- output file, resume


def _cfg(student, dataset, out, **kw):
    data, root = dataset
    dec = kw.pop("decoding", C.DecodingConfig(mode="nucleus", max_new_tokens=6, seed=3))
    return C.GenerateConfig(model=str(student), data=str(data), image_root=str(root), out=str(out),
                            decoding=dec, batch_size=2, device="cpu", **kw)


def test_resume_after_partial_line_equals_uninterrupted(student, zero_run, dataset, tmp_path):
    """Sampling (seeded per question), killed inside a batch: the rest of that batch is answered as a
    smaller batch and still gives the uninterrupted file."""
    full = tmp_path / "full.jsonl"
    logs = []
    s = G.run_generate(_cfg(student, dataset, full, adapter=str(zero_run)), log=logs.append, progress=False)
    assert s["written"] == 5
    lines = full.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5 and all(line.endswith(b"\n") for line in lines)

    part = tmp_path / "part.jsonl"
    part.write_bytes(b"".join(lines[:2]) + lines[2][:17])  # batch 0 written, killed inside batch 1
    logs.clear()
    s = G.run_generate(_cfg(student, dataset, part, adapter=str(zero_run)), log=logs.append, progress=False)
    assert any("removed a partial last line (17 bytes)" in m for m in logs)
    assert s["already_done"] == 2 and s["written"] == 3
    assert part.read_bytes() == full.read_bytes()

    # killed after the first line of batch 1: its second question is answered alone, same text
    half = tmp_path / "half.jsonl"
    half.write_bytes(b"".join(lines[:3]) + lines[3][:10])
    s = G.run_generate(_cfg(student, dataset, half, adapter=str(zero_run)), log=logs.append, progress=False)
    assert s["already_done"] == 3 and s["written"] == 2
    assert half.read_bytes() == full.read_bytes()

    # nothing left to do: the file is untouched
    before = part.read_bytes()
    s = G.run_generate(_cfg(student, dataset, part, adapter=str(zero_run)), log=logs.append, progress=False)
    assert s["written"] == 0 and part.read_bytes() == before


def test_output_lines(student, w_run, dataset, tmp_path):
    run_dir, _ = w_run
    out = tmp_path / "p.jsonl"
    G.run_generate(_cfg(student, dataset, out, adapter=str(run_dir), decoding=C.DecodingConfig(mode="greedy", max_new_tokens=4)),
                   log=lambda m: None, progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [10, "a11", 12, 13, "14"]
    assert rows[0]["prompt"] == "Is there a mass?" + Q.CLOSED_SUFFIX
    assert rows[1]["prompt"] == "What organ is shown in this image?"
    assert all(set(r) == {"question_id", "prompt", "text", "model_id", "metadata"} for r in rows)
    meta = rows[0]["metadata"]
    assert meta["decoding"] == "greedy" and meta["max_new_tokens"] == 4
    assert meta["teacher"] == {"expert": "unimed-b", "fingerprint": "abc123"}
    assert meta["adapter"] == str(run_dir.resolve()) and meta["template"] == "vicuna_v1"
    assert rows[0]["model_id"] == f"llama+{run_dir.name}"


def test_resume_refuses_other_settings(student, dataset, tmp_path):
    from shared.errors import MedAlignError

    out = tmp_path / "p.jsonl"
    G.run_generate(_cfg(student, dataset, out, limit=2), log=lambda m: None, progress=False)
    before = out.read_bytes()
    other = _cfg(student, dataset, out, decoding=C.DecodingConfig(mode="greedy", max_new_tokens=6))
    with pytest.raises(MedAlignError, match="written with other settings.*decoding"):
        G.run_generate(other, log=lambda m: None, progress=False)
    assert out.read_bytes() == before
    other.overwrite = True
    assert G.run_generate(other, log=lambda m: None, progress=False)["written"] == 5
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n")
    with pytest.raises(MedAlignError, match="not a JSON line"):
        G.run_generate(_cfg(student, dataset, junk), log=lambda m: None, progress=False)


def test_cli_generate_then_score(student, w_run, dataset, tmp_path):
    """`medalign-eval generate` end to end, and its output scored by `medalign-eval score`."""
    run_dir, _ = w_run
    data, root = dataset
    out = tmp_path / "preds.jsonl"
    r = CliRunner().invoke(main, ["generate", "--model", str(student), "--adapter", str(run_dir), "--data", str(data),
                                  "--image-root", str(root), "--out", str(out), "--max-new-tokens", "5",
                                  "--batch-size", "3", "--device", "cpu", "--limit", "4"])
    assert r.exit_code == 0, r.output
    assert "wrote 4 answer(s)" in r.stderr
    metrics = tmp_path / "metrics.json"
    r = CliRunner().invoke(main, ["score", "--pred", str(out), "--gt", str(data), "--task", "vqa",
                                  "--out", str(metrics)])
    assert r.exit_code == 0, r.output
    m = json.loads(metrics.read_text())
    assert m["missing_ids"] == ["14"] and m["extra_ids"] == []
    assert (m["llava_med"]["num_open"], m["llava_med"]["num_close"]) == (2, 3)


def test_cli_errors(student, dataset, tmp_path):
    data, root = dataset
    base = ["generate", "--model", str(student), "--data", str(data), "--image-root", str(root),
            "--out", str(tmp_path / "o.jsonl")]
    r = CliRunner().invoke(main, base + ["--adapter", str(tmp_path)])
    assert r.exit_code == 2 and "holds no PEFT adapter" in r.output
    r = CliRunner().invoke(main, base + ["--batch-size", "0"])
    assert r.exit_code == 2 and "--batch-size must be >= 1" in r.output
    r = CliRunner().invoke(main, ["generate", "--model", str(student), "--data", str(data),
                                  "--image-root", str(tmp_path), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and "not found under --image-root" in r.output


@pytest.mark.slow
def test_resume_after_real_kill(student, dataset, tmp_path):
    """A real `medalign-eval generate` process killed with SIGKILL mid-run, then resumed: the same
    file as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data, root = dataset
    many = tmp_path / "many.json"
    recs = json.loads(data.read_text())
    many.write_text(json.dumps([{**r, "id": i} for i in range(40) for r in [recs[i % 5]]]))
    args = ["generate", "--model", str(student), "--data", str(many), "--image-root", str(root),
            "--decoding", "nucleus", "--max-new-tokens", "24", "--batch-size", "2", "--device", "cpu"]
    full = tmp_path / "full.jsonl"
    assert CliRunner().invoke(main, args + ["--out", str(full)]).exit_code == 0
    part = tmp_path / "part.jsonl"
    cmd = [sys.executable, "-c", "from evaluation.cli import main; main()", *args, "--out", str(part)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not part.exists() or part.read_bytes().count(b"\n") < 6):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = part.read_bytes().count(b"\n")
    assert 6 <= n_before < 40
    r = CliRunner().invoke(main, args + ["--out", str(part)])
    assert r.exit_code == 0, r.output
    assert part.read_bytes() == full.read_bytes()
