"""`medalign-eval tsne`: the visual tokens it embeds (W applied as in generation) and the command end to end.

* :func:`evaluation.tsne.visual_states` equals the model's own ``output_hidden_states[L]`` at the
  image positions, and, with a run's W, the hidden states of the BASE model with W added by an
  independent hook (tests/evaluation/decoding_helpers.rotated); before the align layer W changes nothing.
* the command on a tiny student + run, a regions folder and a synthetic expert cache writes the
  figure and the JSON, whose token counts are those of the masks' patches.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from decoding_helpers import LAYER, make_student, make_w_run, rotated, single_thread  # noqa: F401
from PIL import Image

from cache_helpers import write_cache
from evaluation import tsne as T
from evaluation.cli import main
from evaluation.generate import load_generator
from shared.errors import MedAlignError
from shared.images import sha256_file
from shared.regions import PADDING, patch_labels, read_regions, write_regions

pytestmark = pytest.mark.usefixtures("single_thread")

SIZES = [(40, 24), (24, 40), (32, 32), (48, 30), (30, 44), (36, 36)]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("tsne") / "llama")


@pytest.fixture(scope="module")
def w_run(student, tmp_path_factory):
    return make_w_run(student, tmp_path_factory.mktemp("w_run"), 3.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six non-square "scans": dark noise with a bright lesion block; masks 1 = lesion; a seventh
    image without a mask (skipped)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    masks, recs = {}, []
    for i, (w, h) in enumerate(SIZES + [(20, 20)]):
        mask = np.zeros((h, w), dtype=np.int64)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[y0:y0 + h // 2, x0:x0 + w // 2] = 1
        img = np.where(mask[..., None] == 1, 220, rng.integers(0, 60, (h, w, 1))).astype(np.uint8).repeat(3, 2)
        Image.fromarray(img).save(root / f"img{i}.png")
        if i < len(SIZES):
            masks[f"img{i}.png"] = mask
        for j, q in enumerate(("Is there a lesion?", "Where is the lesion?")):
            recs.append({"id": f"{i}-{j}", "image": f"img{i}.png", "answer_type": "OPEN",
                         "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "x"}]})
    (root / "test.json").write_text(json.dumps(recs))
    write_regions(root / "regions", masks, {0: "background", 1: "lesion"})
    return root


def _prompt(gen, question):
    from student_train.inputs import encode_prompt

    ids, _ = encode_prompt(gen.tokenizer, gen.template, question, gen.image_token_id, gen.num_image_tokens,
                           add_bos=gen.add_bos)
    return torch.tensor([ids])


@torch.inference_mode()
def _hidden(model, input_ids, px):
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=px[None],
                output_hidden_states=True, use_cache=False)
    return out.hidden_states


def test_visual_states_equal_hidden_states_with_w(student, w_run):
    run, w = w_run
    gen = load_generator(student, run)
    base = load_generator(student)
    px = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = "Is there a lesion?"
    layers = [0, 1, 2, 3]
    got = T.visual_states(gen, px, q, layers)
    ids = _prompt(gen, q)
    vis = ids[0] == gen.image_token_id
    own = _hidden(gen.model, ids, px)  # the model's own output_hidden_states, W installed
    with rotated(base.model, w, LAYER, vis[None]):  # W added by an independent hook on the base model
        manual = _hidden(base.model, ids, px)
    plain = _hidden(base.model, ids, px)
    for L in layers:
        assert got[L].shape == (16, 64)
        torch.testing.assert_close(got[L], own[L][0, vis].float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(got[L], manual[L][0, vis].float(), rtol=1e-5, atol=1e-5)
        differs = (got[L] - plain[L][0, vis]).abs().max().item()
        assert (differs > 1e-2) if L >= LAYER else (differs == 0.0), (L, differs)
    # the question after the image does not reach the image positions (causal attention)
    other = T.visual_states(gen, px, "Where is the lesion located in the left upper lobe?", [3])
    torch.testing.assert_close(other[3], got[3], rtol=0, atol=1e-6)
    with pytest.raises(MedAlignError, match="out of range"):
        T.visual_states(gen, px, q, [4])


def test_collect_tokens_labels(student, dataset):
    gen = load_generator(student)
    regions = read_regions(dataset / "regions")
    tokens = T.collect_tokens(gen, dataset / "test.json", dataset, regions, [1, 3], max_tokens=10000)
    assert tokens.images == [f"img{i}.png" for i in range(len(SIZES))]
    assert tokens.skipped == {"no mask": 1}
    for i, image in enumerate(tokens.images):
        lab = patch_labels(regions.mask(image), 4)
        sel = tokens.groups == i
        assert tokens.patches[sel].tolist() == np.flatnonzero(lab != PADDING).tolist()
        assert tokens.labels[sel].tolist() == lab[lab != PADDING].tolist()
    assert tokens.features[1].shape == (tokens.labels.size, 64)
    few = T.collect_tokens(gen, dataset / "test.json", dataset, regions, [1], max_tokens=12, max_images=3)
    assert len(few.images) == 3 and np.bincount(few.groups).tolist() == [4, 4, 4]


def _expert_cache(dataset, out, images):
    """S_e of features that are e0 on lesion cells and e1 on the others (plus noise): within each
    image the expert separates the lesion perfectly."""
    rng = np.random.default_rng(5)
    regions = read_regions(dataset / "regions")
    sims, keys = [], []
    for image in images:
        lab = patch_labels(regions.mask(image), 4)
        f = np.where((lab == 1)[:, None], np.eye(8)[0], np.eye(8)[1]) + 0.1 * rng.normal(size=(16, 8))
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        sims.append(f @ f.T)
        keys.append(sha256_file(dataset / image))
    write_cache(out, np.stack(sims), np.full((len(images), 16), 1 / 16), keys, {p: r for r, p in enumerate(images)})
    return out


def test_cli_end_to_end(student, w_run, dataset, tmp_path):
    cache = _expert_cache(dataset, tmp_path / "cache", [f"img{i}.png" for i in range(4)])
    fig = tmp_path / "out" / "fig.png"
    args = ["tsne", "--model", str(student), "--adapter", str(w_run[0]), "--data", str(dataset / "test.json"),
            "--image-root", str(dataset), "--regions", str(dataset / "regions" / "regions.json"),
            "--layers", "0,2,3", "--out", str(fig), "--expert-cache", str(cache), "--device", "cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = json.loads((tmp_path / "out" / "fig.json").read_text())
    regions = read_regions(dataset / "regions")
    labs = np.concatenate([patch_labels(regions.mask(f"img{i}.png"), 4) for i in range(len(SIZES))])
    assert out["tokens"] == int((labs != PADDING).sum()) and out["images"] == len(SIZES)
    assert out["token_counts"] == {"background": int((labs == 0).sum()), "lesion": int((labs == 1).sum())}
    assert out["align_layer"] == LAYER and out["labels"] == {"0": "background", "1": "lesion"}
    assert set(out["layers"]) == {"0", "2", "3"}
    for s in out["layers"].values():
        assert 0 <= s["probe_accuracy"] <= 1 and -1 <= s["silhouette"] <= 1 and s["split"] == "image"
        assert s["within_image_silhouette_cosine"] is not None
    e = out["expert"]
    assert e["source"] == "S_e" and e["images"] == 4 and e["images_not_in_cache"] == 2
    assert e["within_image_silhouette"] > 0.5 and e["panel_image"] in {f"img{i}.png" for i in range(4)}
    assert "layer 3: probe accuracy" in res.output


def test_cli_errors(student, dataset, tmp_path):
    base = ["tsne", "--model", str(student), "--data", str(dataset / "test.json"), "--image-root", str(dataset),
            "--out", str(tmp_path / "f.png"), "--device", "cpu"]
    res = CliRunner().invoke(main, base + ["--regions", str(tmp_path)])
    assert res.exit_code == 2 and "no regions.json" in res.output
    res = CliRunner().invoke(main, base + ["--regions", str(dataset / "regions")])  # default layers 1,10,20,30
    assert res.exit_code == 2 and "--layers 10,20,30 out of range" in res.output
    res = CliRunner().invoke(main, base + ["--regions", str(dataset / "regions"), "--layers", "1,x"])
    assert res.exit_code == 2 and "comma-separated integers" in res.output
