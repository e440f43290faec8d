"""``torchrun --nproc-per-node 2 ... build --signals a3tune`` on CPU (gloo): the same A3 cache as one process.

As the MedAlign build (test_build_distributed.py): each image shard has one writer, batches never cross
shards, rank 0 makes the selection and the manifest, so every array of a 2-process build (image part and
selection) equals a 1-process build's exactly, with the ``--skip-bad`` failures of both ranks; a rank
killed with ``kill -9`` fails the job without a hang, and a 1-process ``--resume`` finishes it into the
same cache. The ranks run a3_fake_cli.py (the CLI with a3_cache_fakes' SAM) and the tiny BiomedCLIP.
Two fresh interpreters cost ~10 s on 2 cores: the zarr comparison is in the fast suite, the rest is slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import a3_cache_fakes as a3_fakes
from shared.cache.a3_manifest import A3Manifest
from shared.cache.a3_storage import IMAGE_ARRAYS, SELECTION_ARRAYS, make_a3_storage
from shared.distributed import KILL_ENV, TIMEOUT_ENV
from teacher_cache.a3tune.tiny_clip import save_tiny_biomedclip_clip
from teacher_cache.cli import main

LAUNCHER = Path(__file__).resolve().parent / "a3_fake_cli.py"


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    a3_fakes.install(monkeypatch)
    a3_fakes.memo_clip(monkeypatch)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("a3models")
    (root / "fast.json").write_text(json.dumps(a3_fakes.FAST))
    return {"clip": save_tiny_biomedclip_clip(root / "clip"), "sam": a3_fakes.fake_sam_file(root / "sam.pth"),
            "settings": root / "fast.json"}


def _args(models: dict, data: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--signals", "a3tune", "--sam", str(models["sam"]), "--biomedclip", str(models["clip"]),
            "--sam-settings", str(models["settings"]), "--data", str(data), "--image-root", str(data.parent),
            "--grid", "6", "--out", str(out), "--num-workers", "0", "--batch-size", "2", "--shard-size", "2", *extra]


def _torchrun(args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", TIMEOUT_ENV: "60", **(env or {})}
    # "--": torchrun's parser takes --signals for an abbreviation of its --signals-to-handle (README)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(LAUNCHER), "--", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _one_process(args: list[str]) -> None:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    """Every stored array of an A3 cache: the image part row by row, the selection's columns."""
    m = A3Manifest.load(cache)
    store = make_a3_storage(m.storage, cache, m.rows, m.shard_size, m.max_masks, m.mask_bytes, m.embed_dim)
    rows, sel = store.open_rows(), store.open_selection(m.selection["name"])
    try:
        out = {"key": np.asarray(rows.keys())}
        read = [rows.read(r, with_emb=True) for r in range(m.rows)]
        for name, column in zip(IMAGE_ARRAYS[1:], zip(*read)):
            out[name] = np.stack([np.asarray(c) for c in column])
        for name in SELECTION_ARRAYS:
            col = np.asarray(sel[name][:])
            out["selection/" + name] = col.astype(str) if col.dtype.kind in "SOU" else col
    finally:
        rows.close()
        if "_file" in sel:
            sel["_file"].close()
    return out


def assert_same_a3_cache(a: Path, b: Path) -> None:
    """0 difference, array for array, and the same bytes in every file the manifests list."""
    xa, xb = _arrays(a), _arrays(b)
    assert sorted(xa) == sorted(xb)
    for name in xa:
        assert xa[name].dtype == xb[name].dtype, name
        np.testing.assert_array_equal(xa[name], xb[name], err_msg=name)
    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    for key in ("failures", "selection", "sam", "biomedclip", "rows", "index_sha256"):
        assert ma[key] == mb[key], key
    assert [s["files"] for s in ma["shards"]] == [s["files"] for s in mb["shards"]]
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())
    assert not (b / ".progress").exists() and not (b / ".build.lock").exists()


@pytest.mark.parametrize("storage", ["zarr", pytest.param("hdf5", marks=pytest.mark.slow)])
def test_two_process_a3_build_equals_one_process(models, tmp_path, storage):
    data = a3_fakes.make_dataset(tmp_path / "ds", n_images=6)
    # rows (shard size 2): img1 in shard 0 (rank 0), img3 in shard 1 (rank 1); both fail to decode
    for bad in ("img1", "img3"):
        (tmp_path / "ds" / "images" / f"{bad}.png").write_bytes(b"\x89PNG not really " + bad.encode())
    extra = ("--format", storage, "--skip-bad")
    _one_process(_args(models, data, tmp_path / "one", *extra))
    proc = _torchrun(_args(models, data, tmp_path / "two", *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("A3 cache written") == 1  # rank 0 reports, the other rank is quiet
    assert_same_a3_cache(tmp_path / "one", tmp_path / "two")
    m = A3Manifest.load(tmp_path / "two")
    assert sorted(f["path"] for f in m.failures) == ["images/img1.png", "images/img3.png"]  # from both ranks
    assert m.selection["questions"] == 8


@pytest.mark.slow
def test_rank_killed_fails_without_hang_and_resume_finishes(models, tmp_path):
    data = a3_fakes.make_dataset(tmp_path / "ds", n_images=8)
    _one_process(_args(models, data, tmp_path / "ref"))
    out = tmp_path / "killed"
    proc = _torchrun(_args(models, data, out), env={KILL_ENV: "1:shard"}, timeout=180)
    assert proc.returncode != 0
    assert not (out / "manifest.json").exists()
    markers = sorted(p.name for p in (out / ".progress").glob("shard-*.json"))
    assert "shard-00001.json" in markers and "shard-00003.json" not in markers  # rank 1 wrote one shard, then died
    res = CliRunner().invoke(main, _args(models, data, out))  # refused without --resume
    assert res.exit_code == 2 and "--resume" in res.output
    a3_fakes.FakeSam.calls = 0
    _one_process(_args(models, data, out, "--resume"))
    assert 0 < a3_fakes.FakeSam.calls < 8  # only the shards without a marker
    assert_same_a3_cache(tmp_path / "ref", out)
