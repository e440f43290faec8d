"""The A3 cache's integrity and re-selection: verify catches a flipped byte, the reader's value checks,
a new --top-k / --query-template recomputes only the selection (SAM never runs), the CLI commands."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import a3_cache_fakes as a3_fakes
from shared.cache.a3tune import open_a3_cache
from shared.errors import CacheDamagedError, MedAlignError
from teacher_cache.a3tune.build import A3BuildConfig, build_a3_cache
from teacher_cache.a3tune.tiny_clip import save_tiny_biomedclip_clip
from teacher_cache.verify import verify_a3

GRID = 6


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    a3_fakes.install(monkeypatch)
    a3_fakes.memo_clip(monkeypatch)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("a3f")
    data = a3_fakes.make_dataset(root / "ds", n_images=4, seed=3)
    return {"root": root, "data": data, "clip": save_tiny_biomedclip_clip(root / "clip"),
            "sam": a3_fakes.fake_sam_file(root / "sam.pth")}


def config(world, out, **kw) -> A3BuildConfig:
    base = dict(sam=world["sam"], biomedclip=world["clip"], data=(world["data"],), image_root=world["data"].parent,
                grid=GRID, out=out, sam_settings=a3_fakes.FAST, num_workers=0, shard_size=2, progress=False)
    return A3BuildConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    a3_fakes.install(mp)
    a3_fakes.memo_clip(mp)
    out = tmp_path_factory.mktemp("built") / "c"
    build_a3_cache(config(world, out))
    mp.undo()
    return out


def lines():
    out: list[str] = []
    return out, out.append


@pytest.mark.parametrize("target", ["masks/c/0/0", "selection"])
def test_verify_catches_a_flipped_byte(built, tmp_path, target):
    cache = tmp_path / "c"
    shutil.copytree(built, cache)
    out, echo = lines()
    assert verify_a3(cache, echo=echo), out
    if target == "selection":
        m = open_a3_cache(cache).manifest
        target = next(f for f in m.selection["files"] if "/top_idx/c/" in f)
    path = cache / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    out, echo = lines()
    assert not verify_a3(cache, echo=echo)
    assert any("checksum mismatch" in line and target in line for line in out), out
    reader = open_a3_cache(cache)  # the per-chunk crc32c catches it on a plain read too
    with pytest.raises(CacheDamagedError):
        for q in reader.question_keys():
            reader.entry(q)


def test_value_checks(built, tmp_path):
    import zarr

    cache = tmp_path / "c"
    shutil.copytree(built, cache)
    reader = open_a3_cache(cache)
    m = reader.manifest
    q = next(k for k in reader.question_keys() if len(reader.entry(k).labels))
    zarr.open_array(str(cache / "count"), mode="r+")[0] = m.max_masks + 1  # a consistent chunk, a bad value
    with pytest.raises(CacheDamagedError, match="claims"):
        open_a3_cache(cache).read_image(0)
    shutil.rmtree(cache)
    shutil.copytree(built, cache)
    top = zarr.open_array(str(cache / m.selection["name"] / "top_idx"), mode="r+")
    row = open_a3_cache(cache).question_row(q)
    bad = np.asarray(top[row])
    bad[0] = 40  # past the image's masks
    top[row] = bad
    with pytest.raises(CacheDamagedError, match="selects mask|distinct"):
        open_a3_cache(cache).entry(q)
    with pytest.raises(CacheDamagedError, match="checksum"):  # an edited manifest is refused on open
        doc = json.loads((cache / "manifest.json").read_text())
        doc["selection"]["top_k"] = 3
        (cache / "manifest.json").write_text(json.dumps(doc))
        open_a3_cache(cache)


def test_new_top_k_and_template_without_sam(world, built, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    shutil.copytree(built, cache)
    old = open_a3_cache(cache).manifest.selection["name"]

    def no_sam(*a, **k):
        raise AssertionError("SAM must not run for a re-selection")

    import sys
    monkeypatch.setattr(sys.modules["teacher_cache.a3tune.sam"], "load_sam", no_sam)
    monkeypatch.setattr(sys.modules["teacher_cache.a3tune.sam"], "generate_masks", no_sam)
    with pytest.raises(MedAlignError, match="--resume"):
        build_a3_cache(config(world, cache, top_k=2))
    stats: dict = {}
    m = build_a3_cache(config(world, cache, top_k=2, resume=True), stats)
    assert m.top_k == 2 and stats["reselected"] and m.selection["name"] != old
    assert not (cache / old).exists() and (cache / m.selection["name"]).is_dir()
    assert verify_a3(cache, echo=lambda s: None)
    monkeypatch.undo()
    a3_fakes.install(monkeypatch)
    a3_fakes.memo_clip(monkeypatch)
    fresh = tmp_path / "fresh"
    build_a3_cache(config(world, fresh, top_k=2))
    a, b = open_a3_cache(cache), open_a3_cache(fresh)
    assert a.manifest.selection["name"] == b.manifest.selection["name"]
    for q in a.question_keys():
        ea, eb = a.entry(q), b.entry(q)
        np.testing.assert_array_equal(ea.labels, eb.labels)
        np.testing.assert_array_equal(ea.scores, eb.scores)
        assert len(ea.labels) <= 2
    # a literal template: another selection, the same image part
    m2 = build_a3_cache(config(world, cache, top_k=2, query_template="Chest X-ray. ", resume=True))
    assert m2.template == "Chest X-ray. " and m2.shards == m.shards
    with pytest.raises(MedAlignError, match="different A3 cache"):
        build_a3_cache(config(world, cache, grid=4, resume=True))


def test_cli_build_info_verify_show(world, tmp_path):
    from teacher_cache.cli import main

    settings = tmp_path / "fast.json"
    settings.write_text(json.dumps(a3_fakes.FAST))
    out = tmp_path / "c"
    args = ["build", "--signals", "a3tune", "--sam", str(world["sam"]), "--biomedclip", str(world["clip"]),
            "--data", str(world["data"]), "--image-root", str(world["data"].parent), "--grid", str(GRID),
            "--out", str(out), "--sam-settings", str(settings), "--num-workers", "0", "--top-k", "3",
            "--format", "hdf5"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "A3 cache written" in r.output and "top-3" in r.output
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0 and "KB per image" in r.output and "bytes per question" in r.output, r.output
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and "checksums:" in r.output, r.output
    png = tmp_path / "fig.png"
    r = CliRunner().invoke(main, ["show", str(out), "--data", str(world["data"]), "--image-root",
                                  str(world["data"].parent), "--out", str(png)])
    assert r.exit_code == 0 and png.stat().st_size > 1000, r.output
    r = CliRunner().invoke(main, ["build", "--signals", "a3tune", "--data", str(world["data"]), "--image-root",
                                  str(world["data"].parent), "--grid", "6", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--sam and --biomedclip" in r.output
    r = CliRunner().invoke(main, ["build", "--data", str(world["data"]), "--image-root", str(world["data"].parent),
                                  "--grid", "6", "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--expert and --weights" in r.output
