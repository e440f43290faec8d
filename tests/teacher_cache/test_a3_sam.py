"""A3Tune's SAM side: the original-.pth loader, the authors' mask filter, the generator against
segment-anything's stock one, and the empty-image guard (tiny SAM made here)."""

from __future__ import annotations

import hashlib
import time

import cv2
import numpy as np
import pytest
import torch
from a3_cache_fakes import nested_shapes

from shared.errors import MedAlignError
from teacher_cache.a3tune.sam import (FAST_SAM_SETTINGS, SamSettings, WeakMask, filter_records,
                                      generate_masks, load_sam)
from teacher_cache.a3tune.sam_arch import infer_arch
from teacher_cache.a3tune.tiny_sam import TINY_ARCH, save_tiny_sam, tiny_sam_state

FULL = SamSettings()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "sam_tiny.pth", seed=0)


@pytest.fixture(scope="module")
def sam(tiny_path):
    return load_sam(tiny_path)


@pytest.fixture(scope="module")
def nested_runs(sam):
    """generate_masks on the nested shapes with the full and the fast settings, and the seconds."""
    out = {}
    for name, settings in (("full", FULL), ("fast", FAST_SAM_SETTINGS)):
        t = time.perf_counter()
        masks = generate_masks(sam, nested_shapes(), settings)
        out[name] = (masks, time.perf_counter() - t)
    return out


def authors_filter(records, max_area=40_000):
    """The notebooks' area filter then ``filter_sam_results``, written out as they are."""
    masks = [m for m in records if m["area"] < max_area]
    out = []
    for m in masks:
        if m["bbox"][0] == 0 or m["bbox"][1] == 0:
            continue
        if m["bbox"][2] <= 12 or m["bbox"][3] <= 12:
            continue
        y_max, x_max = m["bbox"][1] + m["bbox"][3], m["bbox"][0] + m["bbox"][2]
        if y_max > 253 or x_max > 253:
            continue
        out.append(m)
    return out


def stock(sam, view, s: SamSettings):
    """segment-anything's generator constructed as the authors' ``hyper_params_tuning`` does."""
    from segment_anything import SamAutomaticMaskGenerator
    gen = SamAutomaticMaskGenerator(
        model=sam.model, points_per_side=s.points_per_side, points_per_batch=s.points_per_batch,
        pred_iou_thresh=s.pred_iou_thresh, stability_score_thresh=s.stability_score_thresh,
        box_nms_thresh=s.box_nms_thresh, crop_n_layers=s.crop_n_layers,
        crop_n_points_downscale_factor=s.crop_n_points_downscale_factor,
        crop_nms_thresh=s.crop_nms_thresh, min_mask_region_area=s.min_mask_region_area)
    return gen.generate(view)


def assert_same(ours: list[WeakMask], ref: list[dict]):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.bbox == tuple(b["bbox"]) and a.area == b["area"]
        assert np.array_equal(a.segmentation, b["segmentation"])
        assert a.predicted_iou == b["predicted_iou"] and a.stability_score == b["stability_score"]


# -- settings -------------------------------------------------------------------------------------

def test_defaults_are_the_authors_settings():
    assert FULL.to_json() == {
        "points_per_side": 8, "points_per_batch": 128, "pred_iou_thresh": 0.5,
        "stability_score_thresh": 0.5, "box_nms_thresh": 0.8, "crop_n_layers": 1,
        "crop_n_points_downscale_factor": 2, "crop_nms_thresh": 0.8, "min_mask_region_area": 200,
        "max_area": 40_000}
    assert SamSettings.from_json(FAST_SAM_SETTINGS.to_json()) == FAST_SAM_SETTINGS
    assert FAST_SAM_SETTINGS.crop_n_layers == 0
    with pytest.raises(MedAlignError):
        SamSettings.from_json({"points": 3})


# -- loader ---------------------------------------------------------------------------------------

def test_load_tiny_pth(tiny_path, sam):
    raw = torch.load(tiny_path, weights_only=True)
    assert all(k.split(".")[0] in ("image_encoder", "prompt_encoder", "mask_decoder") for k in raw)
    assert sam.arch == "tiny" and sam.spec == TINY_ARCH
    assert sam.sha256 == hashlib.sha256(tiny_path.read_bytes()).hexdigest()
    assert sam.to_json()["sha256"] == sam.sha256 and sam.to_json()["arch"] == "tiny"
    for k, v in sam.model.state_dict().items():
        assert torch.equal(v, raw[k]), k
    assert tiny_path.stat().st_size < 1_000_000
    # random (undesigned) weights load the same way
    torch.save(tiny_sam_state(3, designed=False), tiny_path.parent / "random.pth")
    assert load_sam(tiny_path.parent / "random.pth").spec == TINY_ARCH


@pytest.mark.parametrize("name, embed, depth, heads, globals_", [
    ("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    ("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    ("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
])
def test_sizes_read_from_released_shapes(name, embed, depth, heads, globals_):
    """segment-anything's own builders, on the meta device (shapes only), give the state dicts."""
    from segment_anything import sam_model_registry
    with torch.device("meta"):
        state = sam_model_registry[name]().state_dict()
    arch = infer_arch(state, "test")
    assert arch.name == name
    assert (arch.encoder_embed_dim, arch.encoder_depth, arch.encoder_num_heads) == (embed, depth, heads)
    assert arch.encoder_global_attn_indexes == globals_ and arch.window_size == 14
    assert (arch.image_size, arch.patch_size, arch.prompt_embed_dim) == (1024, 16, 256)
    assert (arch.decoder_depth, arch.decoder_mlp_dim, arch.iou_head_hidden_dim) == (2, 2048, 256)


def test_not_a_sam_checkpoint(tmp_path, tiny_path):
    cases = {}
    torch.save({"visual.proj": torch.zeros(2)}, cases.setdefault("clip", tmp_path / "clip.pth"))
    torch.save({"vision_encoder.patch_embed.projection.weight": torch.zeros(2)},
               cases.setdefault("hf", tmp_path / "hf.pth"))
    torch.save({"model": {"a": torch.zeros(1)}}, cases.setdefault("nested", tmp_path / "nested.pth"))
    state = torch.load(tiny_path, weights_only=True)
    del state["mask_decoder.mask_tokens.weight"]
    torch.save(state, cases.setdefault("missing", tmp_path / "missing.pth"))
    state = torch.load(tiny_path, weights_only=True)
    state["image_encoder.neck.0.weight"] = torch.zeros(32, 32, 3, 3)
    torch.save(state, cases.setdefault("shape", tmp_path / "shape.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    cases["text"] = tmp_path / "text.pth"
    torch.save({"x": np.float64}, cases.setdefault("pickle", tmp_path / "pickle.pth"))  # weights_only refuses
    cases["absent"] = tmp_path / "absent.pth"
    for name, path in cases.items():
        with pytest.raises(MedAlignError) as e:
            load_sam(path)
        msg = str(e.value)
        assert "--sam" in msg and str(path) in msg and "\n" not in msg, (name, msg)
    with pytest.raises(MedAlignError, match="transformers SamModel"):
        load_sam(cases["hf"])


# -- the filter -----------------------------------------------------------------------------------

def test_filter_matches_the_authors_rules():
    rng = np.random.default_rng(0)
    records = []
    for x, y, w, h, area in [(0, 5, 50, 50, 100), (5, 0, 50, 50, 100), (1, 1, 13, 13, 100),
                             (1, 1, 12, 40, 100), (1, 1, 40, 12, 100), (200, 10, 53, 20, 100),
                             (200, 10, 54, 20, 100), (10, 200, 20, 53, 100), (10, 200, 20, 54, 100),
                             (20, 20, 200, 200, 39_999), (20, 20, 200, 200, 40_000)]:
        records.append({"bbox": [x, y, w, h], "area": area})
    for _ in range(300):
        x, y = rng.integers(0, 60, 2)
        w, h = rng.integers(0, 256 - max(x, y), 2)
        records.append({"bbox": [int(x), int(y), int(w), int(h)], "area": int(rng.integers(0, 60_000))})
    for r in records:
        r.update(segmentation=np.zeros((4, 4), bool), predicted_iou=0.9, stability_score=0.9)
    kept = filter_records(records, FULL)
    ref = authors_filter(records)
    assert [m.bbox for m in kept] == [tuple(r["bbox"]) for r in ref]
    assert 0 < len(ref) < len(records)
    assert [tuple(r["bbox"]) for r in authors_filter(records[:11])] == [
        (1, 1, 13, 13), (200, 10, 53, 20), (10, 200, 20, 53), (20, 20, 200, 200)]
    assert len(filter_records(records, SamSettings(max_area=10))) == len(
        [r for r in authors_filter(records, 10)])


# -- the generator --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["full", "fast"])
def test_generator_equals_segment_anything(sam, nested_runs, name):
    settings = {"full": FULL, "fast": FAST_SAM_SETTINGS}[name]
    ours = nested_runs[name][0]
    assert_same(ours, authors_filter(stock(sam, nested_shapes(), settings)))
    assert ours, "the designed tiny SAM keeps masks on these shapes"


def test_generator_equals_segment_anything_real_image(sam, vqa_rad_subset_dir):
    """Fast settings on a committed VQA-RAD image (the full settings: the slow test below)."""
    view = cv2.resize(cv2.imread(str(vqa_rad_subset_dir / "images" / "synpic100176.jpg")), (256, 256))
    ours = generate_masks(sam, view, FAST_SAM_SETTINGS)
    assert_same(ours, authors_filter(stock(sam, view, FAST_SAM_SETTINGS)))
    assert ours


def test_designed_tiny_sam_masks(nested_runs):
    """The tiny model thresholds brightness: on the nested shapes the kept masks are the shapes'
    regions (documented counts: 3 with the full settings, 2 without the crop layer)."""
    full, fast = nested_runs["full"][0], nested_runs["fast"][0]
    assert len(full) == 3 and len(fast) == 2
    outer = np.zeros((256, 256), bool)
    outer[40:181, 40:201] = True
    for m in full + fast:
        assert m.segmentation.shape == (256, 256) and m.segmentation.dtype == bool
        assert m.segmentation.sum() == m.area
        inside = (m.segmentation & outer).sum() / m.area
        assert inside > 0.95  # a region of the bright shapes, not the background


#: a crop layer at the smallest grid: what the crash needs, at a quarter of the full cost
SMALL_CROPPED = SamSettings(points_per_side=4, crop_n_layers=1)


def test_empty_image_guard(sam):
    """No mask on a black image: the stock generator with a crop layer crashes; ours returns []."""
    black = np.zeros((256, 256, 3), np.uint8)
    with pytest.raises(IndexError):
        stock(sam, black, SMALL_CROPPED)
    assert generate_masks(sam, black, SMALL_CROPPED) == []
    assert generate_masks(sam, black, FAST_SAM_SETTINGS) == []
    # nothing passes an IoU threshold above every score (<= 0.95) either
    assert generate_masks(sam, nested_shapes(), SamSettings(points_per_side=4, pred_iou_thresh=0.99)) == []


def test_view_is_checked(sam):
    with pytest.raises(ValueError, match="256, 256, 3"):
        generate_masks(sam, np.zeros((128, 128, 3), np.uint8), FAST_SAM_SETTINGS)


def test_timing(nested_runs, capsys):
    with capsys.disabled():
        print(f"\ngenerate_masks on the tiny SAM, 1 thread: full {nested_runs['full'][1]:.2f} s, "
              f"fast {nested_runs['fast'][1]:.2f} s per image")


@pytest.mark.slow
def test_full_settings_on_a_real_image(sam, vqa_rad_dir):
    """The authors' full settings on one VQA-RAD image of ../shared, read as they read it."""
    from shared.images import load_image
    from teacher_cache.a3tune.geometry import sam_view
    path = sorted((vqa_rad_dir / "images").glob("*.jpg"))[0]
    view = cv2.resize(cv2.imread(str(path)), (256, 256))
    assert np.array_equal(sam_view(load_image(path)[0], "stretch", (0, 0, 0)), view)
    ours = generate_masks(sam, view, FULL)
    assert_same(ours, authors_filter(stock(sam, view, FULL)))
    padded = generate_masks(sam, sam_view(load_image(path)[0], "pad", (122, 116, 104)), FULL)
    assert all(keep for keep in (m.area < 40_000 for m in padded))


@pytest.mark.gpu
def test_cuda_equals_cpu(tiny_path, nested_runs):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    on_gpu = load_sam(tiny_path, device="cuda")
    for name, settings in (("full", FULL), ("fast", FAST_SAM_SETTINGS)):
        ours = generate_masks(on_gpu, nested_shapes(), settings)
        cpu = nested_runs[name][0]
        assert [m.bbox for m in ours] == [m.bbox for m in cpu]
        for a, b in zip(ours, cpu):
            assert (a.segmentation != b.segmentation).mean() < 1e-3
