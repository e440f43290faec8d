"""`medalign-eval attention`: the question -> image attention map vs an independent computation, and the figure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from evaluation import attention_map as A
from evaluation import generate as G
from evaluation import generate_config as C
from student_train import inputs as I
from evaluation.cli import main
from student_train.tiny import save_tiny_llava

LAYER = 2
QUESTION = "Where is the lesion located in the left upper lobe?"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("att") / "llama", "llama", layers=4, seed=0)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(1)
    p = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(p)
    return p


@pytest.fixture(scope="module")
def w_run(student, tmp_path_factory):
    from student_train.alignment import get_handles
    from student_train.config import AlignArgs, LoraArgs
    from student_train.model import load_student, prepare_student, save_trained

    model, _ = load_student(student)
    peft = prepare_student(model, LoraArgs(lora_r=4), AlignArgs(align_layer=LAYER, alpha=1.0, beta=0.0),
                           train_projector=False)
    w = get_handles(peft).rotation.weight
    torch.manual_seed(0)
    with torch.no_grad():
        w.copy_(3.0 * torch.randn_like(w) / w.shape[0] ** 0.5)
    out = tmp_path_factory.mktemp("run")
    save_trained(peft, out)
    return out, w.detach().clone()


def _reference_map(student, gen, image, layer, weight=None):
    """M_a computed independently of the capture under test: the whole model on eager attention
    with ``output_attentions``, W (when given) added to the image positions of ``layers[layer-1]``'s
    output by a plain forward hook, then the probabilities of the rows after the image to the image
    columns, averaged over heads and rows."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(student, attn_implementation="eager").eval()
    ids, q_start = I.encode_prompt(gen.tokenizer, gen.template, QUESTION, gen.image_token_id, gen.num_image_tokens,
                                   add_bos=gen.add_bos)
    input_ids = torch.tensor([ids])
    vis = input_ids[0] == gen.image_token_id
    handle = None
    if weight is not None:
        def hook(_m, _a, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[0, vis] = h[0, vis] + h[0, vis].float() @ weight.t()
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        handle = model.model.language_model.layers[layer - 1].register_forward_hook(hook)
    px = I.student_pixels(gen.image_processor, image, gen.background)[None]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=px,
                        use_cache=False, output_attentions=True)
    finally:
        if handle is not None:
            handle.remove()
    probs = out.attentions[layer][0].double()  # [H, T, T]
    return probs[:, q_start:, :][:, :, vis].mean(0).mean(0).numpy()


def test_map_equals_eager_attention(student, image):
    gen = G.load_generator(student)
    px = I.student_pixels(gen.image_processor, image, gen.background)[None]
    for layer in (1, LAYER, 3):
        got, rows = A.question_attention(gen, QUESTION, px, layer)
        ref = _reference_map(student, gen, image, layer)
        assert got.shape == (16,) and rows > 3
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
        assert got.std() > 1e-3 * got.mean()  # not a flat map
    # the generation path is back on SDPA afterwards
    assert gen.model.config.text_config._attn_implementation == "sdpa"


def test_map_with_rotation(student, w_run, image):
    """With a run's W, the map at the align layer sees the rotated states (reference: capture + W)."""
    run_dir, w = w_run
    gen = G.load_generator(student, run_dir)
    base = G.load_generator(student)
    px = I.student_pixels(gen.image_processor, image, gen.background)[None]
    got, _ = A.question_attention(gen, QUESTION, px, LAYER)
    ref = _reference_map(student, gen, image, LAYER, weight=w)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    plain, _ = A.question_attention(base, QUESTION, px, LAYER)
    assert not np.allclose(got, plain, rtol=1e-3)
    # W sits on layers[l-1]'s output: layers below l are untouched
    np.testing.assert_allclose(A.question_attention(gen, QUESTION, px, 1)[0],
                               A.question_attention(base, QUESTION, px, 1)[0], rtol=1e-5, atol=1e-7)


def test_default_layer(w_run, tmp_path):
    run_dir, _ = w_run
    assert A.default_layer(None, 4) == 3          # 20 clipped to the model
    assert A.default_layer(None, 32) == 20
    assert A.default_layer(run_dir, 4) == LAYER   # rotation.json
    cfg_only = tmp_path / "r"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text(json.dumps({"align": {"align_layer": 1}}))
    assert A.default_layer(cfg_only, 4) == 1


def test_cli_attention_writes_figure(student, w_run, image, tmp_path):
    run_dir, _ = w_run
    fig, js = tmp_path / "fig.png", tmp_path / "map.json"
    r = CliRunner().invoke(main, ["attention", "--model", str(student), "--adapter", str(run_dir), "--image", str(image),
                                  "--question", QUESTION, "--out", str(fig), "--map-out", str(js),
                                  "--device", "cpu", "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 5000
    m = json.loads(js.read_text())
    assert m["layer"] == LAYER and m["grid"] == 4 and len(m["attn"]) == 16
    gen = G.load_generator(student, run_dir)
    px = I.student_pixels(gen.image_processor, image, gen.background)[None]
    np.testing.assert_allclose(m["attn"], A.question_attention(gen, QUESTION, px, LAYER)[0], rtol=1e-5)
    assert m["answer"] == G.generate_answers(gen, [QUESTION], px, C.DecodingConfig(mode="greedy", max_new_tokens=6))[0]
    r = CliRunner().invoke(main, ["attention", "--model", str(student), "--image", str(image), "--question", "q?",
                                  "--out", str(fig), "--layer", "9", "--device", "cpu"])
    assert r.exit_code == 2 and "--layer 9 is out of range" in r.output
