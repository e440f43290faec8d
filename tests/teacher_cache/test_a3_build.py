"""``build --signals a3tune`` end to end with a fake SAM (tests/teacher_cache/a3_cache_fakes.py) and the tiny
BiomedCLIP: the round trip (zarr, hdf5) against a straightforward recomputation, resume after an
interruption equals an uninterrupted build, --skip-bad."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
from PIL import Image

import a3_cache_fakes as a3_fakes
from shared.a3_queries import query_sha256, query_text
from shared.cache.a3tune import is_a3_cache, open_a3_cache
from shared.errors import MedAlignError
from shared.images import load_image
from shared.records import load_records
from teacher_cache.a3tune.build import A3BuildConfig, build_a3_cache
from teacher_cache.a3tune.tiny_clip import save_tiny_biomedclip_clip

GRID = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("a3")
    data = a3_fakes.make_dataset(root / "ds", n_images=5)
    Image.fromarray(np.full((48, 48, 3), 90, np.uint8)).save(root / "ds" / "images" / "img4.png")  # square, flat
    return {"root": root, "data": data, "clip": save_tiny_biomedclip_clip(root / "clip"),
            "sam": a3_fakes.fake_sam_file(root / "sam.pth")}


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    a3_fakes.install(monkeypatch)
    a3_fakes.memo_clip(monkeypatch)


def config(world, out, **kw) -> A3BuildConfig:
    base = dict(sam=world["sam"], biomedclip=world["clip"], data=(world["data"],), image_root=world["data"].parent,
                grid=GRID, out=out, sam_settings=a3_fakes.FAST, num_workers=0, shard_size=2, progress=False,
                batch_size=2)
    return A3BuildConfig(**{**base, **kw})


def expected_entries(world, template="vqa-rad", k=8, geometry="pad", background=None):
    """The pipeline recomputed directly: view, masks, crops, features, python sorted, grid cells."""
    from teacher_cache.a3tune.biomedclip import load_biomedclip
    from teacher_cache.a3tune.geometry import crop_for_clip, masks_to_grid, sam_view
    from teacher_cache.a3tune.sam import SamSettings

    clip = load_biomedclip(world["clip"])
    bg = background or (122, 116, 104)
    settings = SamSettings(**a3_fakes.FAST)
    out = {}
    for rec in load_records(world["data"]):
        img, key = load_image(world["data"].parent / rec["image"])
        view = sam_view(img, geometry, bg)
        masks = a3_fakes.generate_masks(None, view, settings)
        text = query_text(rec, template)
        if masks:
            feats = clip.encode_crops([crop_for_clip(view, m) for m in masks])
            t = clip.encode_texts([text])[0]
            s = [float(f @ t) for f in feats]
            idx = sorted(range(len(masks)), key=lambda i: s[i], reverse=True)[:k]
            cells = masks_to_grid(np.stack([m.segmentation for m in masks]), geometry, GRID)
            labels, scores = cells[idx].astype(np.float32), np.asarray([s[i] for i in idx], np.float32)
        else:
            labels, scores = np.zeros((0, GRID * GRID), np.float32), np.zeros(0, np.float32)
        out[str(rec["id"])] = (key, query_sha256(text), labels, scores)
    return out


def assert_entries(cache, expected, score_atol=1e-5):
    reader = open_a3_cache(cache)
    assert sorted(reader.question_keys()) == sorted(expected)
    for q, (key, sha, labels, scores) in expected.items():
        e = reader.entry(q)
        assert e.image_key == key and e.query_sha256 == sha
        assert e.labels.dtype == np.float32 and set(np.unique(e.labels)) <= {0.0, 1.0}
        np.testing.assert_array_equal(e.labels, labels)
        np.testing.assert_allclose(e.scores, scores, atol=score_atol)
    return reader


@pytest.mark.parametrize("storage", ["zarr", "hdf5"])
def test_round_trip(world, tmp_path, storage):
    m = build_a3_cache(config(world, tmp_path / "c", storage=storage))
    assert is_a3_cache(tmp_path / "c") and m.storage == storage and m.grid == GRID and m.top_k == 8
    expected = expected_entries(world)
    no_labels = sum(len(labels) == 0 for _, _, labels, _ in expected.values())
    assert expected["40"][2].shape == (0, GRID * GRID) and no_labels >= 2  # the flat square image: no mask
    assert m.selection["questions"] == 10 and m.selection["no_labels"] == no_labels
    reader = assert_entries(tmp_path / "c", expected)
    assert reader.entry("no such question") is None
    clone = copy.deepcopy(reader)  # as a DataLoader worker gets it (__getstate__): a copy that reopens lazily
    np.testing.assert_array_equal(clone.entry("0").labels, reader.entry("0").labels)
    ident = reader.identity()
    assert ident["signals"] == "a3tune" and ident["selection"]["top_k"] == 8 and ident["grid"] == GRID
    with pytest.raises(MedAlignError, match="A3Tune cache"):
        from shared.cache import open_cache
        open_cache(tmp_path / "c")  # the MedAlign reader refuses it by name


def _dump(cache):
    r = open_a3_cache(cache)
    rows = [r.read_image(i, with_emb=True) for i in range(r.manifest.rows)]
    ents = {q: r.entry(q) for q in r.question_keys()}
    return r.keys(), rows, ents


def test_resume_after_interruption_equals_uninterrupted(world, tmp_path, monkeypatch):
    from shared.cache.a3_writer import A3Writer

    real = A3Writer.write_shard
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")  # after shard 0 was committed
        return real(self, *a, **k)

    monkeypatch.setattr(A3Writer, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build_a3_cache(config(world, tmp_path / "a"))
    monkeypatch.setattr(A3Writer, "write_shard", real)
    assert not (tmp_path / "a" / "manifest.json").exists()
    with pytest.raises(MedAlignError, match="--resume"):
        build_a3_cache(config(world, tmp_path / "a"))
    a3_fakes.FakeSam.calls = 0
    build_a3_cache(config(world, tmp_path / "a", resume=True))
    assert a3_fakes.FakeSam.calls == 3  # shards 1 and 2 (images 2, 3, 4) only
    build_a3_cache(config(world, tmp_path / "b"))
    ka, rows_a, ents_a = _dump(tmp_path / "a")
    kb, rows_b, ents_b = _dump(tmp_path / "b")
    assert ka == kb
    for (ma, ea), (mb, eb) in zip(rows_a, rows_b):
        np.testing.assert_array_equal(ma, mb)
        np.testing.assert_array_equal(ea, eb)
    for q in ents_a:
        np.testing.assert_array_equal(ents_a[q].labels, ents_b[q].labels)
        np.testing.assert_array_equal(ents_a[q].scores, ents_b[q].scores)
    assert not (tmp_path / "a" / ".progress").exists()


def test_skip_bad(world, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(world["data"].parent, ds)
    (ds / "images" / "img1.png").write_bytes(b"\x89PNG not really")  # corrupt: found when decoding
    (ds / "images" / "img3.png").unlink()  # missing: found when planning
    cfg = config(world, tmp_path / "c", data=(ds / "train.json",), image_root=ds)
    with pytest.raises(MedAlignError, match="--skip-bad"):
        build_a3_cache(cfg)
    shutil.rmtree(tmp_path / "c", ignore_errors=True)
    m = build_a3_cache(config(world, tmp_path / "c", data=(ds / "train.json",), image_root=ds, skip_bad=True))
    assert sorted(f["path"] for f in m.failures) == ["images/img1.png", "images/img3.png"]
    reader = open_a3_cache(tmp_path / "c")
    assert reader.entry("10") is None and reader.entry("30") is None  # questions of failed images: not cached
    assert reader.entry("0") is not None and m.selection["left_out"] == 4
    assert "" in reader.keys()  # the decode failure keeps its (empty) row
    from teacher_cache.verify import verify_a3
    assert verify_a3(tmp_path / "c", echo=lambda s: None)


def test_duplicate_ids_across_files_refused(world, tmp_path):
    with pytest.raises(MedAlignError, match="occurs twice"):
        build_a3_cache(config(world, tmp_path / "c", data=(world["data"], world["data"])))
