"""``medalign-cache build`` end to end on tiny experts: results, resume after kill -9, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache_helpers import make_legacy_manifest
from shared.cache import open_cache
from shared.images import load_image
from teacher_cache.cli import main
from shared.demo_data import make_scans
from teacher_cache.experts import load_expert
from teacher_cache.signals import teacher_signals
from teacher_cache.tiny import save_tiny_unimed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    weights = root / "tiny-b.pt"
    (root / "cfg.json").write_text(json.dumps(save_tiny_unimed(weights, "b")))
    names = [s["image"] for s in make_scans(root / "images", 12)]
    make_dataset(root / "a.json", names[:8])
    make_dataset(root / "b.json", names[4:])  # overlaps a.json on 4 images
    return root


def make_dataset(path: Path, images: list[str]) -> None:
    path.write_text(json.dumps([{"id": i, "image": name, "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]} for i, name in enumerate(images)]))


def _args(tiny: Path, out: Path, *extra: str, data=("a.json", "b.json")) -> list[str]:
    args = ["build", "--expert", "unimed-b", "--weights", str(tiny / "tiny-b.pt"), "--model-config",
            str(tiny / "cfg.json"), "--image-root", str(tiny / "images"), "--grid", "6", "--out", str(out),
            "--num-workers", "0", "--batch-size", "3", "--shard-size", "4"]
    for d in data:
        args += ["--data", str(tiny / d)]
    return args + list(extra)


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    r = open_cache(cache)
    sims, attns = zip(*(r.read(i) for i in range(len(r))))
    return {"sim": np.stack(sims), "attn": np.stack(attns), "keys": np.array(r.keys())}


def _run(args, expect=0):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == expect, res.output
    return res.output


def test_build_matches_direct_expert_run_and_dedupes(tiny, tmp_path):
    _run(_args(tiny, tmp_path / "c"))
    r = open_cache(tmp_path / "c")
    assert len(r) == 12 and len(r.index) == 12  # 16 references, 12 unique images
    assert [s["images"] for s in r.manifest.sources] == [8, 8]
    assert r.manifest.grid == 6 and r.manifest.patch_grid == 4 and len(r.manifest.shards) == 3
    expert = load_expert("unimed-b", tiny / "tiny-b.pt", model_cfg=json.loads((tiny / "cfg.json").read_text()))
    for name in ("scan000.png", "scan007.png", "scan011.png"):
        img, _ = load_image(tiny / "images" / name)
        e_v, e_a = expert.encode(torch.from_numpy(expert.preprocess(img))[None])
        sim, attn = teacher_signals(e_v, e_a, 6)
        c_sim, c_attn = r.get(name)
        assert np.abs(c_sim - sim[0].numpy()).max() < 5e-4
        np.testing.assert_allclose(c_attn, attn[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("sim_dtype", ["float16", "int8"])
def test_direct_shard_reader_equals_zarr_on_every_row_of_a_built_cache(tiny, tmp_path, sim_dtype):
    """The reader's pread fast path (shared.cache.storage._ShardFile) returns exactly zarr-python's
    own reads, on every row of a cache the build wrote, in both encodings, a partial shard included."""
    import zarr
    from shared.cache.encoding import decode_sim
    from shared.cache.storage import _ShardFile
    from shared.grid import unpack_triangle
    args = _args(tiny, tmp_path / "c", "--dtype", sim_dtype)
    args[args.index("--shard-size") + 1] = "5"  # 12 rows: shards of 5, 5 and 2
    _run(args)
    reader = open_cache(tmp_path / "c")
    store = reader._store()
    assert isinstance(store.sim, _ShardFile) and isinstance(store.attn, _ShardFile)
    group = zarr.open_group(str(tmp_path / "c"), mode="r")
    zarr_sim, zarr_attn = group["sim"][:], group["attn"][:]
    assert len(reader) == 12 and len(reader.manifest.shards) == 3 and zarr_sim.dtype == np.dtype(sim_dtype)
    for row in range(len(reader)):
        fast_sim, fast_attn = store.read(row)
        assert fast_sim.dtype == zarr_sim.dtype and fast_attn.dtype == zarr_attn.dtype
        np.testing.assert_array_equal(fast_sim, zarr_sim[row])
        np.testing.assert_array_equal(fast_attn, zarr_attn[row])
        sim, attn = reader.read(row)
        np.testing.assert_array_equal(sim, unpack_triangle(decode_sim(zarr_sim[row], sim_dtype)))
        np.testing.assert_array_equal(attn, zarr_attn[row])


def test_batch_size_does_not_change_results(tiny, tmp_path):
    _run(_args(tiny, tmp_path / "b1", "--batch-size", "1"))
    _run(_args(tiny, tmp_path / "b4", "--batch-size", "4"))
    a, b = _arrays(tmp_path / "b1"), _arrays(tmp_path / "b4")
    assert np.abs(a["sim"] - b["sim"]).max() <= 1e-3  # one float16 step at most
    np.testing.assert_allclose(a["attn"], b["attn"], atol=1e-6)


def test_hdf5_holds_the_same_cache(tiny, tmp_path):
    _run(_args(tiny, tmp_path / "z"))
    _run(_args(tiny, tmp_path / "h", "--format", "hdf5"))
    a, b = _arrays(tmp_path / "z"), _arrays(tmp_path / "h")
    np.testing.assert_array_equal(a["sim"], b["sim"])
    np.testing.assert_array_equal(a["attn"], b["attn"])
    assert list(a["keys"]) == list(b["keys"])


def test_resume_after_kill_minus_9_is_identical(tiny, tmp_path):
    """Kill a real build process mid-way, resume, and compare with an uninterrupted build."""
    _run(_args(tiny, tmp_path / "ref"))
    out = tmp_path / "killed"
    # A slow-motion build: a hook sleeps after each committed shard so the kill lands mid-build.
    code = (
        "import sys, time\n"
        "import shared.cache.writer as w\n"
        "orig = w.CacheWriter.write_shard\n"
        "def slow(self, *a, **k):\n"
        "    orig(self, *a, **k); print('shard', flush=True); time.sleep(30)\n"
        "w.CacheWriter.write_shard = slow\n"
        "from teacher_cache.cli import main\n"
        "main(sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, *_args(tiny, out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "shard"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert len(list((out / ".progress").glob("shard-*.json"))) == 1
    res = CliRunner().invoke(main, _args(tiny, out))
    assert res.exit_code == 2 and "--resume" in res.output
    _run(_args(tiny, out, "--resume"))
    a, b = _arrays(tmp_path / "ref"), _arrays(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert json.loads((out / "index.json").read_text()) == json.loads((tmp_path / "ref" / "index.json").read_text())
    assert not (out / ".progress").exists()


def test_bad_images_stop_or_are_recorded(tiny, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name in ("scan000.png", "scan001.png", "scan002.png"):
        (root / name).write_bytes((tiny / "images" / name).read_bytes())
    good = (root / "scan002.png").read_bytes()
    (root / "trunc.png").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    make_dataset(tmp_path / "d.json", ["scan000.png", "trunc.png", "scan001.png", "empty.png", "missing.png",
                                       "scan002.png"])
    args = ["build", "--expert", "unimed-b", "--weights", str(tiny / "tiny-b.pt"), "--model-config",
            str(tiny / "cfg.json"), "--image-root", str(root), "--grid", "4", "--num-workers", "0",
            "--data", str(tmp_path / "d.json")]
    out = _run(args + ["--out", str(tmp_path / "strict")], expect=2)
    assert "empty.png" in out and "--skip-bad" in out
    assert not (tmp_path / "strict" / "manifest.json").exists()
    (root / "empty.png").unlink()
    make_dataset(tmp_path / "d2.json", ["scan000.png", "trunc.png", "scan001.png"])
    args2 = [a if a != str(tmp_path / "d.json") else str(tmp_path / "d2.json") for a in args]
    out = _run(args2 + ["--out", str(tmp_path / "strict2")], expect=2)
    assert "trunc.png" in out and "truncated" in out
    assert not list((tmp_path / "strict2").glob("sim/c/*/*"))  # nothing committed for its shard
    _run(args + ["--out", str(tmp_path / "lenient"), "--skip-bad"])
    r = open_cache(tmp_path / "lenient")
    failed = {f["path"]: f["reason"] for f in r.manifest.failures}
    assert set(failed) == {"trunc.png", "empty.png", "missing.png"}
    assert "truncated" in failed["trunc.png"] and "not found" in failed["missing.png"]
    assert set(r.index) == {"scan000.png", "scan001.png", "scan002.png"}
    assert r.get("trunc.png") is None


def test_input_errors_are_clear(tiny, tmp_path):
    (tmp_path / "bad.json").write_text('[{"id": 1, "image": "a.png"},\n {"id": 2,, }]')
    out = _run(_args(tiny, tmp_path / "c", data=()) + ["--data", str(tmp_path / "bad.json")], expect=2)
    assert "bad.json:2:" in out and "malformed JSON" in out
    make_dataset(tmp_path / "esc.json", ["../../etc/passwd"])
    out = _run(_args(tiny, tmp_path / "c", data=()) + ["--data", str(tmp_path / "esc.json"), "--skip-bad"], expect=2)
    assert "escapes --image-root" in out
    args = _args(tiny, tmp_path / "c")
    args[args.index("unimed-b")] = "unimed-xl"
    out = _run(args, expect=2)
    assert "unimed-l" in out and "biomedclip" in out


def test_out_holding_another_cache_is_refused(tiny, tmp_path):
    _run(_args(tiny, tmp_path / "c"))
    before = (tmp_path / "c" / "manifest.json").read_text()
    args = _args(tiny, tmp_path / "c")
    args[args.index("6")] = "5"
    out = _run(args + ["--resume"], expect=2)
    assert "grid: existing 6 vs requested 5" in out
    out = _run(_args(tiny, tmp_path / "c", "--geometry", "crop", "--resume"), expect=2)
    assert "geometry: existing 'pad' vs requested 'crop'" in out
    assert (tmp_path / "c" / "manifest.json").read_text() == before
    _run(_args(tiny, tmp_path / "c", "--resume"))  # same build: nothing to do, accepted


@pytest.mark.parametrize("flag, value, stored", [("--dtype", "int8", "'float16'"), ("--format", "hdf5", "'zarr'"),
                                                 ("--shard-size", "8", "4")])
def test_resume_with_other_settings_is_refused(tiny, tmp_path, flag, value, stored):
    """Issue 15 item 4: --resume into a finished cache with another encoding, format or shard size
    said "cache written" and changed nothing; it is refused, naming the setting and the stored value."""
    _run(_args(tiny, tmp_path / "c"))
    before = (tmp_path / "c" / "manifest.json").read_bytes()
    out = _run(_args(tiny, tmp_path / "c", flag, value, "--resume"), expect=2)
    assert f"{flag} '{value}' (the cache holds {stored})" in out or f"{flag} {value} (the cache holds {stored})" in out
    assert (tmp_path / "c" / "manifest.json").read_bytes() == before


def test_resume_refuses_an_image_changed_since_the_build(tiny, tmp_path):
    """Issue 15 item 3: an image edited in place after the build was taken as already cached."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(tiny / "images", images)
    args = _args(tiny, tmp_path / "c")
    args[args.index("--image-root") + 1] = str(images)
    _run(args)
    _run(args + ["--resume"])  # unchanged: nothing to do
    name = json.loads((tiny / "a.json").read_text())[2]["image"]
    from PIL import Image
    img = Image.open(images / name)
    img.putpixel((0, 0), tuple(255 - v for v in img.convert("RGB").getpixel((0, 0))))
    img.convert("RGB").save(images / name)
    out = _run(args + ["--resume"], expect=2)
    assert "1 image(s) changed since" in out and name in out


def test_one_builder_per_cache(tiny, tmp_path):
    """Issue 15 item 5: two builders on one --out both ran and the loser died with a traceback. A
    second builder fails at once naming the holder; a lock left by a dead process is taken over;
    nothing but the cache is left after a build or a resume."""
    import os
    import socket
    import subprocess

    from shared.cache.lock import LOCK_NAME

    out = tmp_path / "c"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "t0"}))
    msg = _run(_args(tiny, out), expect=2)
    assert f"is being built by another process (host {socket.gethostname()}, pid {os.getpid()}, since t0)" in msg
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the other builder's files untouched
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "t0"}))
    _run(_args(tiny, out))  # the holder is gone: taken over
    _run(_args(tiny, out, "--resume"))
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_resample_order_is_recorded_shown_and_never_mixed(tiny, tmp_path):
    """A cache built with one resample order is another cache: --out / --resume refuse the other one,
    naming both sides; info shows it; verify --recompute recomputes with the recorded order."""
    _run(_args(tiny, tmp_path / "ref"))  # default: the reference's order
    _run(_args(tiny, tmp_path / "raw", "--resample-order", "resample-norm"))
    ref, raw = open_cache(tmp_path / "ref"), open_cache(tmp_path / "raw")
    assert ref.manifest.resample_order == "norm-resample-norm" and raw.manifest.resample_order == "resample-norm"
    assert ref.manifest.patch_grid == 4 and ref.manifest.grid == 6
    assert np.abs(_arrays(tmp_path / "ref")["sim"] - _arrays(tmp_path / "raw")["sim"]).max() > 1e-2
    before = (tmp_path / "ref" / "manifest.json").read_text()
    out = _run(_args(tiny, tmp_path / "ref", "--resample-order", "resample-norm", "--resume"), expect=2)
    assert "resample_order: existing 'norm-resample-norm' vs requested 'resample-norm'" in out
    out = _run(_args(tiny, tmp_path / "raw", "--resume"), expect=2)
    assert "resample_order: existing 'resample-norm' vs requested 'norm-resample-norm'" in out
    assert (tmp_path / "ref" / "manifest.json").read_text() == before
    _run(_args(tiny, tmp_path / "raw", "--resample-order", "resample-norm", "--resume"))  # same build: accepted
    out = _run(_args(tiny, tmp_path / "x", "--resample-order", "sideways"), expect=2)
    assert "norm-resample-norm" in out and "resample-norm" in out

    out = _run(["info", str(tmp_path / "raw")])
    assert "features resample-norm (raw tokens resampled, then L2-normalised)" in out
    assert "features norm-resample-norm (L2-normalise, resample, L2-normalise again)" in _run(
        ["info", str(tmp_path / "ref")])
    assert json.loads(_run(["info", "--json", str(tmp_path / "raw")]))["resample_order"] == "resample-norm"
    for cache in ("ref", "raw"):  # each verifies against its own order (the two differ by > 1e-2)
        out = _run(["verify", str(tmp_path / cache), "--recompute", "4", "--weights", str(tiny / "tiny-b.pt"),
                    "--model-config", str(tiny / "cfg.json"), "--image-root", str(tiny / "images"),
                    "--tolerance", "1e-3"])
        assert "recomputed 4 rows" in out


def test_old_cache_without_resample_order_is_the_raw_order(tiny, tmp_path):
    """A manifest written before the setting reads as resample-norm: --resume with the new default is
    refused, with the old order it is the same cache. With g == G nothing was resampled and either
    order is accepted."""
    _run(_args(tiny, tmp_path / "old", "--resample-order", "resample-norm"))
    make_legacy_manifest(tmp_path / "old", "resample_order")
    out = _run(_args(tiny, tmp_path / "old", "--resume"), expect=2)
    assert "resample_order: existing 'resample-norm' vs requested 'norm-resample-norm'" in out
    _run(_args(tiny, tmp_path / "old", "--resample-order", "resample-norm", "--resume"))
    assert "features resample-norm" in _run(["info", str(tmp_path / "old")])

    same = _args(tiny, tmp_path / "same")
    same[same.index("6")] = "4"  # the tiny expert's own grid
    _run(same + ["--resample-order", "resample-norm"])
    make_legacy_manifest(tmp_path / "same", "resample_order")
    assert "no effect: the grids match" in _run(["info", str(tmp_path / "same")])
    _run(same + ["--resume"])  # identical arrays either way: not refused


def test_unfinished_build_refuses_the_other_resample_order(tiny, tmp_path, monkeypatch):
    import shared.cache.writer as w
    orig = w.CacheWriter.write_shard

    def one_shard_then_die(self, *a, **k):
        orig(self, *a, **k)
        raise RuntimeError("killed after one shard")

    monkeypatch.setattr(w.CacheWriter, "write_shard", one_shard_then_die)
    res = CliRunner().invoke(main, _args(tiny, tmp_path / "c"))
    assert res.exit_code != 0 and not (tmp_path / "c" / "manifest.json").exists()
    monkeypatch.setattr(w.CacheWriter, "write_shard", orig)
    out = _run(_args(tiny, tmp_path / "c", "--resample-order", "resample-norm", "--resume"), expect=2)
    assert "resample_order: unfinished 'norm-resample-norm' vs requested 'resample-norm'" in out
    # a plan written before the setting existed was the raw order
    plan_path = tmp_path / "c" / ".progress" / "plan.json"
    plan = json.loads(plan_path.read_text())
    del plan["identity"]["resample_order"]
    plan_path.write_text(json.dumps(plan))
    out = _run(_args(tiny, tmp_path / "c", "--resume"), expect=2)
    assert "resample_order: unfinished 'resample-norm' vs requested 'norm-resample-norm'" in out
    _run(_args(tiny, tmp_path / "c", "--resample-order", "resample-norm", "--resume"))
    assert open_cache(tmp_path / "c").manifest.resample_order == "resample-norm"


def test_student_dir_gives_the_grid(tiny, tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {
        "image_size": 336, "patch_size": 14}}))
    args = _args(tiny, tmp_path / "c")
    i = args.index("--grid")
    args[i:i + 2] = ["--student", str(student)]
    _run(args)
    assert open_cache(tmp_path / "c").manifest.grid == 24
    (student / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = _run([a if a != str(tmp_path / "c") else str(tmp_path / "d") for a in args], expect=2)
    assert "not a LLaVA config" in out


def test_info_verify_show(tiny, tmp_path):
    _run(_args(tiny, tmp_path / "c"))
    out = _run(["info", str(tmp_path / "c")])
    assert "unimed-b" in out and "12 in 3 shard(s)" in out and "KB per image" in out
    out = _run(["verify", str(tmp_path / "c"), "--recompute", "3", "--weights", str(tiny / "tiny-b.pt"),
                "--model-config", str(tiny / "cfg.json"), "--image-root", str(tiny / "images")])
    assert "files OK" in out and "recomputed 3 rows" in out
    shard = next(p for p in (tmp_path / "c" / "sim" / "c").rglob("*") if p.is_file())
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    out = _run(["verify", str(tmp_path / "c")], expect=1)
    out = _run(["show", str(tmp_path / "c"), "--image", str(tiny / "images" / "scan003.png"), "--out",
                str(tmp_path / "fig.png")])
    assert (tmp_path / "fig.png").stat().st_size > 1000


def _build_real_images(image_root: Path, names: list[str], tmp_path: Path):
    root = tmp_path / "t"
    root.mkdir()
    weights = root / "tiny-b.pt"
    (root / "cfg.json").write_text(json.dumps(save_tiny_unimed(weights, "b")))
    make_dataset(root / "d.json", names)
    _run(["build", "--expert", "unimed-b", "--weights", str(weights), "--model-config", str(root / "cfg.json"),
          "--image-root", str(image_root), "--data", str(root / "d.json"), "--grid", "4",
          "--out", str(root / "c"), "--batch-size", "64", "--num-workers", "2"])
    r = open_cache(root / "c")
    sim, attn = r.get(names[0])
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-3)
    assert (attn >= 0).all() and 0 < attn.sum() <= 1.0 + 1e-5
    return r


def test_real_vqa_rad_images(vqa_rad_dir, tmp_path):
    """Every real VQA-RAD image goes through the build (JPEGs up to 2321x1500)."""
    qa = json.loads((vqa_rad_dir / "qa.json").read_text())
    names = sorted({r["image_name"] for r in qa})
    r = _build_real_images(vqa_rad_dir / "images", names, tmp_path)
    assert len(r) == len(names) == 314 and not r.manifest.failures


def test_committed_vqa_rad_images(vqa_rad_subset_dir, tmp_path):
    """The 12 committed real JPEGs (256x256 up to 2321x1384 and 1024x1500) go through the build."""
    names = sorted(p.name for p in (vqa_rad_subset_dir / "images").iterdir())
    r = _build_real_images(vqa_rad_subset_dir / "images", names, tmp_path)
    assert len(r) == len(names) == 12 and not r.manifest.failures
