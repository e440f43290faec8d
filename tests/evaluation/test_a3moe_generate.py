"""A3MoE at generation: a run with ``moe.json`` loads through ``load_generator`` (MoE installed, LoRA of
the other linears merged); the prefill's routing equals a training forward's for the same prompt;
greedy equals a token-by-token loop of full forwards (no cache, training's explicit masks); beam
search and Branch.select carry each row's routing; contrastive methods keep one routing per branch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from decoding_helpers import (
    QUESTIONS,
    make_student,
    pixels,
    prompt_ids,
    single_thread,  # noqa: F401 - the fixture, used by pytestmark below
)

from evaluation import generate as G
from evaluation import generate_config as C
from evaluation.decoding import base as B
from student_train import a3moe as M
from student_train import inputs as I

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 8


def make_moe_run(model_dir: Path, out: Path, settings: M.MoeSettings, seed: int = 3) -> Path:
    """A run dir as an A3Tune training writes it: a LoRA (non-zero B) on the linears other than
    q/k, the MoE with non-zero experts and sharp routers, the template in config.json."""
    from peft import LoraConfig, get_peft_model

    from student_train.model import load_student

    model, _ = load_student(model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r"^model\.language_model\..*\.("
                                            r"v_proj|o_proj|gate_proj|up_proj|down_proj)$"))
    torch.manual_seed(seed)
    h = M.install_moe(peft, settings)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        for m in h.modules():
            m.moe_b.normal_(0, 0.5)
            if m.moe_router is not None:
                m.moe_router.weight.mul_(10.0)
    peft.save_pretrained(out)
    M.save_moe(peft, out)
    (out / "config.json").write_text(json.dumps({"data": {"template": "vicuna_v1"}}))
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("moe_gen") / "llama")


@pytest.fixture(scope="module")
def gen(student, tmp_path_factory):
    run = make_moe_run(student, tmp_path_factory.mktemp("moe_run"), M.MoeSettings())
    return G.load_generator(student, run)


class Recorder:
    """Per LlavaModel forward: ("prefill", cache, routing [L, B, E]) or ("step", cache, fixed routing)."""

    def __init__(self, model):
        self.events: list[tuple[str, object, torch.Tensor]] = []
        st = M.get_moe(model).state

        def hook(_m, _a, kw, out):
            cache = getattr(out, "past_key_values", None)
            if st.fixed_routing is not None:
                self.events.append(("step", cache, st.fixed_routing.clone()))
            elif st.q_routing:
                self.events.append(("prefill", cache, torch.stack([st.q_routing[i] for i in sorted(st.q_routing)])))

        self.handle = M.unwrap(model).model.register_forward_hook(hook, with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def prefills(self) -> list[torch.Tensor]:
        return [r for kind, _, r in self.events if kind == "prefill"]


def train_routing(gen, question: str, px: torch.Tensor) -> torch.Tensor:
    """[L, E]: the q routing of a training forward (encode_sample + expand + moe_inputs(query_mask))."""
    model = gen.model
    img = gen.image_token_id
    it = I.expand(I.encode_sample(gen.tokenizer, gen.template, question, "the left lung", img), img,
                  gen.num_image_tokens)
    ids = it["input_ids"][None]
    with torch.no_grad(), M.moe_inputs(model, question_mask=it["query_mask"][None]):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px[None], use_cache=False)
    st = M.get_moe(model).state
    return torch.stack([st.q_routing[i][0] for i in sorted(st.q_routing)])


def full_forward_logits(gen, seq: list[int], n_prompt: int, px: torch.Tensor) -> torch.Tensor:
    """Last-position logits of ONE full forward (no cache) with training's explicit masks: the
    prompt's image positions and its question tokens (after the image, up to the prompt's end)."""
    model = M.unwrap(gen.model)
    ids = torch.tensor([seq])
    image = ids == gen.image_token_id
    image[:, n_prompt:] = False
    question = torch.zeros_like(image)
    question[0, int(torch.nonzero(image[0]).max()) + 1:n_prompt] = True
    emb = model.get_input_embeddings()(ids)
    feats = model.model.get_image_features(pixel_values=px[None], return_dict=True).pooler_output[0]
    emb = emb.clone()
    emb[image] = feats.to(emb.dtype)
    with M.moe_inputs(model, question_mask=question, image_mask=image):
        out = model(inputs_embeds=emb, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits[0, -1].float()


def test_the_run_loads_with_its_moe(gen):
    h = M.get_moe(gen.model)
    assert h is not None and h.settings == M.MoeSettings()
    assert not gen.model.training and not any(m.training for m in h.modules())
    assert not any("lora" in n for n, _ in gen.model.named_parameters())  # the LoRA is merged


def test_generation_routing_equals_the_training_routing(gen):
    px = pixels(gen, 3, seed=1)
    with torch.inference_mode(), Recorder(gen.model) as rec:
        G.generate_ids(gen, QUESTIONS, px, C.DecodingConfig(mode="greedy", max_new_tokens=3))
    routing = rec.prefills()
    assert len(routing) == 1 and routing[0].shape == (4, 3, 8)  # one prefill, left-padded batch of 3
    for b, q in enumerate(QUESTIONS):
        torch.testing.assert_close(routing[0][:, b], train_routing(gen, q, px[b]), rtol=1e-4, atol=1e-5)
    assert (routing[0][:, 0] - routing[0][:, 1]).abs().max() > 1e-2  # the questions really route differently


def test_located_question_is_the_training_query_mask(gen):
    for q in QUESTIONS:
        ids, start = I.encode_prompt(gen.tokenizer, gen.template, q, gen.image_token_id, gen.num_image_tokens,
                                     add_bos=gen.add_bos)
        t = torch.tensor([ids])
        located = M.locate_question(t == gen.image_token_id, torch.ones_like(t))[0]
        it = I.expand(I.encode_sample(gen.tokenizer, gen.template, q, "yes", gen.image_token_id),
                      gen.image_token_id, gen.num_image_tokens)
        assert torch.nonzero(located).flatten().tolist() == list(range(start, len(ids)))
        assert torch.equal(it["query_mask"][:len(ids)], located) and not it["query_mask"][len(ids):].any()


def test_greedy_equals_a_loop_of_full_forwards(gen):
    px = pixels(gen, 3, seed=2)
    got = G.generate_ids(gen, QUESTIONS, px, C.DecodingConfig(mode="greedy", max_new_tokens=STEPS))
    with torch.no_grad():
        for b, q in enumerate(QUESTIONS):
            seq = prompt_ids(gen, q)
            n = len(seq)
            want: list[int] = []
            for _ in range(STEPS):
                tok = int(full_forward_logits(gen, seq, n, px[b]).argmax())
                if tok in gen.eos_ids:
                    break
                want.append(tok)
                seq = seq + [tok]
            assert got[b] == want, q
    assert any(len(a) > 2 for a in got)


def test_beam_rows_keep_their_question_routing(gen):
    px = pixels(gen, 2, seed=3)
    dec = C.DecodingConfig(mode="beam", args=("num_beams=2",), max_new_tokens=6)
    with torch.inference_mode(), Recorder(gen.model) as rec:
        both = G.generate_ids(gen, QUESTIONS[:2], px, dec)
    prefill = rec.prefills()[0]
    assert prefill.shape[1] == 4  # the prompt is expanded to num_beams rows before the prefill
    steps = [r for kind, _, r in rec.events if kind == "step"]
    assert steps
    for r in steps:  # beam reordering stays within a question: row j belongs to question j // 2
        torch.testing.assert_close(r, prefill[:, [0, 0, 2, 2]])
    assert (prefill[:, 0] - prefill[:, 2]).abs().max() > 1e-2
    for b in range(2):
        assert G.generate_ids(gen, [QUESTIONS[b]], px[b:b + 1], dec) == [both[b]]


def test_branch_select_carries_the_routing(gen):
    """select() reorders and repeats rows: the steps after it equal those of a branch prefilled in that order."""
    px = pixels(gen, 2, seed=4)
    tok = torch.tensor

    def ctx_of(idx):
        seqs = [prompt_ids(gen, QUESTIONS[i]) for i in idx]
        ids, mask = B.left_pad(seqs, gen.pad_id)
        return B.DecodeContext(gen=gen, input_ids=ids, attention_mask=mask, prompts=seqs, pixels=px[idx],
                               seeds=[0] * len(idx), max_new_tokens=4, family=gen.family)

    with torch.inference_mode():
        ca = ctx_of([0, 1])
        a = B.Branch(ca)
        a.prefill(input_ids=ca.input_ids, pixel_values=ca.pixels)
        a.step(tok([5, 6]))
        a.select(tok([1, 0, 1]))
        got = a.step(tok([7, 8, 9]))
        c = ctx_of([1, 0, 1])
        b = B.Branch(c)
        b.prefill(input_ids=c.input_ids, pixel_values=c.pixels)
        b.step(tok([6, 5, 6]))
        want = b.step(tok([7, 8, 9]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,args", [("vcd", ("alpha=0", "sample=false")), ("avisc", ("alpha=0", "sample=false")),
                                       ("m3id", ("lambda=0", "sample=false"))])
def test_contrastive_branches_keep_their_own_routing(gen, mode, args):
    """With the contrast switched off these methods pick the main branch's argmax, i.e. greedy:
    the second branch's prefill (noised image / blinded embeddings / no image) routes differently
    and must not overwrite the main branch's routing."""
    px = pixels(gen, 2, seed=5)
    greedy = G.generate_ids(gen, QUESTIONS[:2], px, C.DecodingConfig(mode="greedy", max_new_tokens=6))
    with torch.inference_mode(), Recorder(gen.model) as rec:
        got = G.generate_ids(gen, QUESTIONS[:2], px, C.DecodingConfig(mode=mode, args=args, max_new_tokens=6))
    assert got == greedy
    first, second = rec.prefills()[:2]
    assert (first - second).abs().max() > 1e-4
    prefill_of = {id(c): r for kind, c, r in rec.events if kind == "prefill"}
    for kind, c, r in rec.events:
        if kind == "step":
            torch.testing.assert_close(r, prefill_of[id(c)])


def test_report_preset_generates(student, tmp_path):
    run = make_moe_run(student, tmp_path / "run", M.MOE_PRESETS["report"])
    g = G.load_generator(student, run)
    h = M.get_moe(g.model)
    assert h.settings.q_experts == 1 and h.settings.k_top_k == 2
    px = pixels(g, 1, seed=6)
    got = G.generate_ids(g, QUESTIONS[:1], px, C.DecodingConfig(mode="greedy", max_new_tokens=STEPS))
    with torch.no_grad():
        seq = prompt_ids(g, QUESTIONS[0])
        n = len(seq)
        want: list[int] = []
        for _ in range(STEPS):
            t = int(full_forward_logits(g, seq, n, px[0]).argmax())
            if t in g.eos_ids:
                break
            want.append(t)
            seq = seq + [t]
    assert got[0] == want


def test_every_decoding_method_runs_with_the_moe(gen):
    from evaluation.decoding import names

    px = pixels(gen, 2, seed=7)
    for name in names():
        out = G.generate_ids(gen, QUESTIONS[:2], px, C.DecodingConfig(mode=name, max_new_tokens=3))
        assert len(out) == 2, name


def test_cli_generate_with_a_moe_run(student, tmp_path):
    """``medalign-eval generate --adapter RUN_DIR`` installs the run's MoE: its answers are the loaded
    generator's, and differ from the same run without its moe.json (the MoE is really used)."""
    import shutil

    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from evaluation.cli import main
    from shared.images import resolve_image_path
    from student_train.inputs import student_pixels

    rng = np.random.default_rng(0)
    recs = []
    for i, q in enumerate(QUESTIONS):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        recs.append({"id": str(i), "image": f"img{i}.png", "answer_type": "OPEN",
                     "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "a"}]})
    (tmp_path / "test.json").write_text(json.dumps(recs))
    run = make_moe_run(student, tmp_path / "run", M.MoeSettings())
    no_moe = tmp_path / "run_no_moe"
    shutil.copytree(run, no_moe)
    (no_moe / M.MOE_CONFIG).unlink()
    answers = {}
    for name, adapter in (("moe", run), ("plain", no_moe)):
        out = tmp_path / f"{name}.jsonl"
        r = CliRunner().invoke(main, ["generate", "--model", str(student), "--adapter", str(adapter), "--data",
                                      str(tmp_path / "test.json"), "--image-root", str(tmp_path), "--out", str(out),
                                      "--device", "cpu", "--max-new-tokens", "6", "--decoding", "greedy"])
        assert r.exit_code == 0, r.output
        answers[name] = [json.loads(x)["text"] for x in out.read_text().splitlines()]
    g = G.load_generator(student, run)
    px = torch.stack([student_pixels(g.image_processor, resolve_image_path(tmp_path, f"img{i}.png"), g.background)
                      for i in range(len(QUESTIONS))])
    assert answers["moe"] == G.generate_answers(g, QUESTIONS, px, C.DecodingConfig(mode="greedy", max_new_tokens=6))
    assert answers["moe"] != answers["plain"]


def test_a_trained_a3tune_run_generates_with_its_moe(student, tmp_path):
    """``medalign-train --method a3tune --a3-moe`` then generation: the run carries moe.json, and its
    routing at generation is a training forward's."""
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from student_train import cli as train_cli

    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    recs = []
    for i, q in enumerate(QUESTIONS):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        recs.append({"id": f"t{i}", "image": f"{i}.png", "answer_type": "OPEN",
                     "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "yes"}]})
    (tmp_path / "train.json").write_text(json.dumps(recs))
    run = tmp_path / "run"
    res = CliRunner().invoke(train_cli.main, [
        "--method", "a3tune", "--a3-lambda", "0", "--a3-top-heads", "4", "--a3-moe", "--model", str(student),
        "--data", str(tmp_path / "train.json"), "--image-root", str(tmp_path / "images"), "--out", str(run),
        "--max-steps", "2", "--batch-size", "2", "--lr", "5e-2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (run / M.MOE_CONFIG).is_file()
    g = G.load_generator(student, run)
    px = pixels(g, 3, seed=8)
    with torch.inference_mode(), Recorder(g.model) as rec:
        G.generate_ids(g, QUESTIONS, px, C.DecodingConfig(mode="beam", args=("num_beams=2",), max_new_tokens=3))
    routing = rec.prefills()[0]  # [L, 6, E]: 3 questions x 2 beams
    for b, q in enumerate(QUESTIONS):
        torch.testing.assert_close(routing[:, 2 * b], train_routing(g, q, px[b]), rtol=1e-4, atol=1e-5)
