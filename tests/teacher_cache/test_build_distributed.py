"""``torchrun --nproc-per-node 2 -m teacher_cache.cli build`` on CPU (gloo): the same cache as one process.

Each shard has one writer (round-robin), batches never cross shards, so the arrays of a 2-process
build equal a 1-process build's exactly; the ``--skip-bad`` failures of both ranks reach the
manifest; a rank killed with ``kill -9`` fails the job without a hang, and a 1-process ``--resume``
finishes it into the same cache. Two fresh interpreters cost ~10 s on 2 cores: the zarr comparison on
the committed real VQA-RAD images is in the fast suite, the rest is marked slow.
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

from shared.cache import open_cache
from shared.demo_data import make_scans
from shared.distributed import KILL_ENV, TIMEOUT_ENV
from teacher_cache.cli import main
from teacher_cache.tiny import save_tiny_unimed


@pytest.fixture(scope="module")
def expert(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("expert")
    (root / "cfg.json").write_text(json.dumps(save_tiny_unimed(root / "tiny-b.pt", "b")))
    return root


def _dataset(path: Path, names: list[str]) -> Path:
    path.write_text(json.dumps([{"id": i, "image": n, "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]} for i, n in enumerate(names)]))
    return path


def _args(expert: Path, data: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--expert", "unimed-b", "--weights", str(expert / "tiny-b.pt"), "--model-config",
            str(expert / "cfg.json"), "--image-root", str(root), "--data", str(data), "--grid", "4",
            "--out", str(out), "--num-workers", "0", "--batch-size", "2", "--shard-size", "3", *extra]


def _torchrun(args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", TIMEOUT_ENV: "60", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "teacher_cache.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _one_process(args: list[str]) -> None:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output


def assert_same_cache(a: Path, b: Path) -> None:
    ra, rb = open_cache(a), open_cache(b)
    assert len(ra) == len(rb)
    assert ra.keys() == rb.keys()
    for row, key in enumerate(ra.keys()):
        if not key:  # a --skip-bad row: zeros, not readable as a row
            continue
        (sa, aa), (sb, ab) = ra.read(row), rb.read(row)
        assert sa.dtype == sb.dtype
        np.testing.assert_array_equal(sa, sb)  # 0 difference, bit for bit
        np.testing.assert_array_equal(aa, ab)
    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    assert ma["failures"] == mb["failures"]
    assert [s["files"] for s in ma["shards"]] == [s["files"] for s in mb["shards"]]  # same bytes per shard file
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())
    assert not (b / ".progress").exists() and not (b / ".build.lock").exists()


def _real_images(tmp_path: Path, src: Path) -> tuple[Path, list[str]]:
    """The committed real JPEGs plus two bad files (one per rank's shards) for --skip-bad."""
    root = tmp_path / "images"
    root.mkdir()
    names = sorted(p.name for p in src.iterdir())
    for n in names:
        (root / n).write_bytes((src / n).read_bytes())
    (root / "bad1.jpg").write_bytes(b"not a jpeg")
    (root / "bad2.jpg").write_bytes(b"neither")
    # rows (shard size 3): bad1 in shard 1 (rank 1), bad2 in shard 2 (rank 0)
    return root, names[:4] + ["bad1.jpg"] + names[4:7] + ["bad2.jpg"] + names[7:]


@pytest.mark.parametrize("storage", ["zarr", pytest.param("hdf5", marks=pytest.mark.slow)])
def test_two_process_build_equals_one_process(expert, vqa_rad_subset_dir, tmp_path, storage):
    root, names = _real_images(tmp_path, vqa_rad_subset_dir / "images")
    data = _dataset(tmp_path / "d.json", names)
    extra = ("--format", storage, "--skip-bad")
    _one_process(_args(expert, data, root, tmp_path / "one", *extra))
    proc = _torchrun(_args(expert, data, root, tmp_path / "two", *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("cache written") == 1  # rank 0 reports, the other rank is quiet
    assert_same_cache(tmp_path / "one", tmp_path / "two")
    failures = json.loads((tmp_path / "two" / "manifest.json").read_text())["failures"]
    assert sorted(f["path"] for f in failures) == ["bad1.jpg", "bad2.jpg"]  # gathered from both ranks


@pytest.mark.slow
def test_two_process_build_of_all_vqa_rad_images(expert, vqa_rad_dir, tmp_path):
    """The full VQA-RAD copy (../shared; skips without it), 2 processes vs 1."""
    names = sorted({r["image_name"] for r in json.loads((vqa_rad_dir / "qa.json").read_text())})[:40]
    data = _dataset(tmp_path / "d.json", names)
    _one_process(_args(expert, data, vqa_rad_dir / "images", tmp_path / "one", "--shard-size", "8"))
    proc = _torchrun(_args(expert, data, vqa_rad_dir / "images", tmp_path / "two", "--shard-size", "8"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_cache(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_rank_killed_fails_without_hang_and_resume_finishes(expert, tmp_path):
    names = [s["image"] for s in make_scans(tmp_path / "images", 14)]
    data = _dataset(tmp_path / "d.json", names)
    root = tmp_path / "images"
    _one_process(_args(expert, data, root, tmp_path / "ref"))
    out = tmp_path / "killed"
    proc = _torchrun(_args(expert, data, root, out), env={KILL_ENV: "1:shard"}, timeout=180)
    assert proc.returncode != 0
    assert not (out / "manifest.json").exists()
    markers = sorted(p.name for p in (out / ".progress").glob("shard-*.json"))
    assert "shard-00001.json" in markers and len(markers) < 5  # rank 1 wrote one shard, then died
    # another build is refused while the unfinished one is there without --resume
    res = CliRunner().invoke(main, _args(expert, data, root, out))
    assert res.exit_code == 2 and "--resume" in res.output
    _one_process(_args(expert, data, root, out, "--resume"))
    assert_same_cache(tmp_path / "ref", out)


@pytest.mark.slow
def test_one_process_start_resumed_by_two(expert, tmp_path):
    """An interrupted 1-process build is finished by a 2-process --resume (any K resumes any K)."""
    names = [s["image"] for s in make_scans(tmp_path / "images", 10)]
    data = _dataset(tmp_path / "d.json", names)
    root = tmp_path / "images"
    _one_process(_args(expert, data, root, tmp_path / "ref"))
    out = tmp_path / "part"
    proc = _torchrun(_args(expert, data, root, out), nproc=1, env={KILL_ENV: "0:shard"}, timeout=120)
    assert proc.returncode != 0 and len(list((out / ".progress").glob("shard-*.json"))) == 1
    proc = _torchrun(_args(expert, data, root, out, "--resume"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_cache(tmp_path / "ref", out)


@pytest.mark.slow
def test_a_second_builder_is_refused_by_every_rank(expert, tmp_path):
    """Another builder holds --out's lock: rank 0 is refused, and the other rank fails with its error."""
    from shared.cache.lock import build_lock

    names = [s["image"] for s in make_scans(tmp_path / "images", 4)]
    data = _dataset(tmp_path / "d.json", names)
    out = tmp_path / "c"
    with build_lock(out):
        proc = _torchrun(_args(expert, data, tmp_path / "images", out), timeout=180)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "being built by another process" in err and "rank 0 failed" in err
    assert not (out / "manifest.json").exists()
