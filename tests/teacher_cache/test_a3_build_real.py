"""Stage 1 of A3Tune on real VQA-RAD images (../shared/data) with the real SAM path (a tiny random SAM in
the original .pth layout) and the tiny BiomedCLIP: fast settings over 24 images, and the authors' full
settings on 3. Slow; skips without ../shared."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow



def _records(vqa_rad_dir, n_images: int) -> list[dict]:
    rows = json.loads((vqa_rad_dir / "qa.json").read_text())
    out, images = [], []
    for r in rows:
        if r["image_name"] not in images:
            if len(images) == n_images:
                continue
            images.append(r["image_name"])
        out.append({"id": int(r["qid"]), "image": r["image_name"], "image_organ": r["image_organ"],
                    "conversations": [{"from": "human", "value": "<image>\n" + r["question"]},
                                      {"from": "gpt", "value": str(r["answer"])}]})
    return out


def _sizes(cache) -> tuple[float, float]:
    from shared.cache.a3tune import open_a3_cache

    m = open_a3_cache(cache).manifest
    image = sum((cache / f).stat().st_size for s in m.shards for f in s["files"])
    sel = sum((cache / f).stat().st_size for f in m.selection["files"])
    return image / m.rows, sel / m.selection["questions"]


@pytest.mark.parametrize("geometry", ["pad", "stretch"])
def test_fast_settings_on_real_images(vqa_rad_dir, tmp_path, geometry):
    from teacher_cache.a3tune.build import A3BuildConfig, build_a3_cache
    from teacher_cache.a3tune.geometry import masks_to_grid, sam_view
    from teacher_cache.a3tune.sam import FAST_SAM_SETTINGS, generate_masks, load_sam
    from teacher_cache.a3tune.tiny_clip import save_tiny_biomedclip_clip
    from teacher_cache.a3tune.tiny_sam import save_tiny_sam
    from teacher_cache.verify import verify_a3
    from shared.cache.a3tune import open_a3_cache
    from shared.images import load_image

    data = tmp_path / "train.json"
    records = _records(vqa_rad_dir, 24)
    data.write_text(json.dumps(records))
    sam_path = save_tiny_sam(tmp_path / "sam_tiny.pth")
    clip = save_tiny_biomedclip_clip(tmp_path / "clip")
    out = tmp_path / "cache"
    cfg = A3BuildConfig(sam=sam_path, biomedclip=clip, data=(data,), image_root=vqa_rad_dir / "images", grid=24,
                        out=out, geometry=geometry, sam_settings=FAST_SAM_SETTINGS.to_json(), num_workers=1,
                        progress=False)
    m = build_a3_cache(cfg)
    assert m.rows == 24 and m.selection["questions"] == len(records)
    assert verify_a3(out, echo=lambda s: None)
    reader = open_a3_cache(out)
    sam = load_sam(sam_path)
    checked = 0
    for rec in records[:12]:  # the stored masks are SAM's on the view, on the grid
        e = reader.entry(str(rec["id"]))
        img, key = load_image(vqa_rad_dir / "images" / rec["image"])
        assert e.image_key == key
        view = sam_view(img, geometry, tuple(m.background))
        masks = generate_masks(sam, view, FAST_SAM_SETTINGS)
        row = reader.index[rec["image"]]
        stored, _ = reader.read_image(row)
        if masks:
            np.testing.assert_array_equal(stored, masks_to_grid(np.stack([w.segmentation for w in masks]),
                                                                geometry, 24))
            checked += 1
        assert len(e.labels) == min(8, len(masks))
    per_image, per_question = _sizes(out)
    print(f"\n[{geometry}] {m.rows} images, {m.selection['questions']} questions, max {m.max_masks} masks: "
          f"{per_image:.0f} bytes per image, {per_question:.1f} bytes per question")
    assert checked > 0, "the tiny SAM kept no mask on any real image"


def test_authors_settings_on_three_images(vqa_rad_dir, tmp_path):
    from teacher_cache.a3tune.build import A3BuildConfig, build_a3_cache
    from teacher_cache.a3tune.tiny_clip import save_tiny_biomedclip_clip
    from teacher_cache.a3tune.tiny_sam import save_tiny_sam

    data = tmp_path / "train.json"
    records = _records(vqa_rad_dir, 3)
    data.write_text(json.dumps(records))
    cfg = A3BuildConfig(sam=save_tiny_sam(tmp_path / "s.pth"), biomedclip=save_tiny_biomedclip_clip(tmp_path / "c"),
                        data=(data,), image_root=vqa_rad_dir / "images", grid=24, out=tmp_path / "cache",
                        num_workers=0, progress=False)
    m = build_a3_cache(cfg)
    assert m.sam["settings"]["points_per_side"] == 8 and m.sam["settings"]["crop_n_layers"] == 1
    assert m.max_masks == 3 * (64 + 4 * 16)
    per_image, per_question = _sizes(tmp_path / "cache")
    print(f"\n[authors' settings] {per_image:.0f} bytes per image, {per_question:.1f} bytes per question")
