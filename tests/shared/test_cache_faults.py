"""Issue 15 items 1 and 2: a damaged or edited cache is refused, on every read and by ``verify``.

Each test damages a cache the way the fault probe did (bytes flipped inside a chunk, a shard
deleted or cut short, the manifest or the index edited, values no cosine can have) and checks the
reader, the structural check and ``medalign-cache verify`` say so with one clear message, for zarr and
for HDF5. The expected values are written in the test, never taken from the implementation.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cache_helpers import chunk_span, flip_bytes, make_legacy_manifest, write_cache
from shared.cache import open_cache
from shared.cache.check import check_structure, require_structure
from shared.errors import CacheDamagedError, MedAlignError
from teacher_cache.cli import main as cache_cli

FORMATS = ["zarr", "hdf5"]
ROWS, GRID, SHARD = 6, 3, 2


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(ROWS, GRID * GRID, 5))
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    sims = (f @ f.transpose(0, 2, 1)).astype(np.float32)
    attns = (rng.random((ROWS, GRID * GRID)) + 0.01).astype(np.float32)
    return sims, attns


def _cache(path, fmt, sims=None, attns=None, **kw):
    s, a = _arrays()
    sims = s if sims is None else sims
    attns = a if attns is None else attns
    keys = [f"{i + 1:064x}" for i in range(ROWS)]
    return write_cache(path, sims, attns, keys, {f"dir/img{i}.png": i for i in range(ROWS)}, format=fmt,
                       shard_size=SHARD, **kw)


def _chunk_span(cache, fmt, array, row):
    return chunk_span(cache, fmt, array, row, SHARD)


def _flip(path, at):
    flip_bytes(path, at)


def _verify(cache, *args):
    return CliRunner().invoke(cache_cli, ["verify", str(cache), *args])


# -- item 1: every read is checked ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("array", ["sim", "attn"])
def test_flipped_bytes_inside_a_chunk_stop_the_read(tmp_path, fmt, array):
    cache = _cache(tmp_path / "c", fmt)
    sims, attns = _arrays()
    path, start, size = _chunk_span(cache, fmt, array, 3)
    _flip(path, start + size // 2)
    reader = open_cache(cache)
    with pytest.raises(CacheDamagedError) as e:
        reader.read(3)
    msg = str(e.value)
    assert str(cache) in msg and "row 3" in msg and "shard 1" in msg and "dir/img3.png" in msg
    assert "medalign-cache verify" in msg and "\n" not in msg
    np.testing.assert_allclose(reader.read(2)[0], sims[2], atol=1e-3)  # the other row of the shard is intact
    np.testing.assert_array_equal(reader.read(2)[1], attns[2])
    # plain zarr / h5py check the same checksums
    if fmt == "zarr":
        import zarr
        with pytest.raises(Exception, match="(?i)checksum"):
            zarr.open_array(str(cache / array), mode="r")[3]
    else:
        import h5py
        with h5py.File(path, "r") as f, pytest.raises(OSError):
            f[array][1]
    # and verify fails (the file checksum, and the row read)
    res = _verify(cache)
    assert res.exit_code == 1 and "checksum mismatch" in res.output


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_damaged_key_chunk_is_caught(tmp_path, fmt):
    cache = _cache(tmp_path / "c", fmt)
    if fmt == "zarr":
        path = cache / "key" / "c" / "1"
        _flip(path, len(path.read_bytes()) // 2)
    else:
        path, start, size = _chunk_span(cache, fmt, "key", 2)  # shard 1: one chunk of keys
        _flip(path, start + size // 2)
    with pytest.raises(CacheDamagedError, match="row 2 .*medalign-cache verify"):
        open_cache(cache).key_of(2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_shard(tmp_path, fmt, damage):
    cache = _cache(tmp_path / "c", fmt)
    path = cache / ("sim/c/2/0" if fmt == "zarr" else "shards/shard-00002.h5")
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CacheDamagedError, match=r"row 4 \(shard 2, image dir/img4.png\)"):
        open_cache(cache).read(4)
    if damage == "missing":  # the structural check (training runs it first) already sees it
        with pytest.raises(CacheDamagedError, match="missing.*medalign-cache verify"):
            require_structure(cache)


@pytest.mark.parametrize("fmt", FORMATS)
def test_values_are_checked_on_read(tmp_path, fmt):
    sims, attns = _arrays()
    sims[1] *= 3.0                       # |S| up to 3: not a cosine
    attns[2, 4] = np.nan                 # E_a not finite
    attns[3, 0] = -0.5                   # E_a negative
    sims[4] = 0.0                        # a zero-filled row: diagonal 0, not 1
    sims[5, 0, 0] = np.inf
    cache = _cache(tmp_path / "c", fmt, sims=sims, attns=attns)
    reader = open_cache(cache)
    np.testing.assert_allclose(reader.read(0)[0], sims[0], atol=1e-3)
    for row, what in [(1, "no cosine has"), (2, "not finite"), (3, "negative"), (4, "diagonal"),
                      (5, "no cosine has")]:
        with pytest.raises(CacheDamagedError, match=f"row {row} .*{what}"):
            reader.read(row)
    unchecked = open_cache(cache, check_values=False)
    assert float(np.abs(unchecked.read(1)[0]).max()) > 2.9
    res = _verify(cache)
    assert res.exit_code == 1 and "rows: 1/6 read back" in res.output


@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_and_float16_edges_pass(tmp_path, fmt):
    """A cosine of exactly +-1 (and float16 rounding just past it) is not flagged."""
    sims, attns = _arrays()
    sims[0] = 1.0
    sims[1] = np.eye(GRID * GRID) * 2 - 1  # -1 off the diagonal
    attns[0] = 0.0
    for dtype in ("float16", "int8"):
        cache = _cache(tmp_path / f"{fmt}-{dtype}", fmt, sims=sims, attns=attns, dtype=dtype)
        reader = open_cache(cache)
        for row in range(ROWS):
            reader.read(row)
        assert _verify(cache).exit_code == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_cache_without_chunk_checksums_stays_readable(tmp_path, fmt):
    sims, attns = _arrays()
    cache = _cache(tmp_path / "c", fmt, chunk_checksums=False)
    reader = open_cache(cache)
    for row in range(ROWS):
        got_s, got_a = reader.read(row)
        np.testing.assert_allclose(got_s, sims[row], atol=1e-3)
        np.testing.assert_array_equal(got_a, attns[row])
    report = check_structure(cache)
    assert report.ok and any("no" in n and "checksum" in n for n in report.notes)
    res = _verify(cache)
    assert res.exit_code == 0 and "note:" in res.output


def test_worker_errors_reach_the_user_as_one_line():
    """A CacheDamagedError raised in a DataLoader worker comes back wrapped in the worker's traceback;
    the CLIs show the original message alone."""
    import torch

    from shared.cli import user_errors
    from shared.errors import user_message

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise CacheDamagedError("teacher cache C: row 1 is damaged; run `medalign-cache verify C`")

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    with pytest.raises(CacheDamagedError) as e:
        next(iter(loader))
    assert "Traceback" in str(e.value)  # what torch does
    assert user_message(e.value) == "teacher cache C: row 1 is damaged; run `medalign-cache verify C`"
    import click

    @click.command()
    def cmd():
        with user_errors():
            raise e.value

    res = CliRunner().invoke(cmd, [])
    assert res.exit_code == 2
    assert res.output.strip() == "Error: teacher cache C: row 1 is damaged; run `medalign-cache verify C`"


# -- item 2: the structure and the manifest --------------------------------------------------------

def _edit_manifest(cache, edit):
    path = cache / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))


EDITS = {
    "sim_dtype int8": lambda d: d.update(sim_dtype="int8"),
    "rows": lambda d: d.update(rows=5),
    "expert": lambda d: d.update(expert="biomedclip"),
    "weights_sha256": lambda d: d.update(weights_sha256="1" * 64),
    "17 of 20 shards dropped": lambda d: d.update(shards=d["shards"][:1]),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_manifest_is_refused(tmp_path, fmt, edit):
    cache = _cache(tmp_path / "c", fmt)
    _edit_manifest(cache, EDITS[edit])
    with pytest.raises(CacheDamagedError, match="checksum does not match"):
        open_cache(cache)
    res = _verify(cache)
    assert res.exit_code == 1 and "FAIL" in res.output and "checksum does not match" in res.output


@pytest.mark.parametrize("fmt", FORMATS)
def test_structure_of_an_older_manifest_is_still_checked(tmp_path, fmt):
    """Without the manifest checksum (an older cache) the structural checks catch the same edits."""
    cases = {
        "sim_dtype int8": (lambda d: d.update(sim_dtype="int8"), "implies"),
        "rows": (lambda d: d.update(rows=5), "shard"),
        "shards dropped": (lambda d: d.update(shards=d["shards"][:1]), "lists 1 shard"),
        "path traversal": (lambda d: d["shards"][0]["files"].update({"../../etc/passwd": "0" * 64}),
                           "not a path inside the cache"),
    }
    for name, (edit, want) in cases.items():
        cache = _cache(tmp_path / name.replace(" ", "_"), fmt)
        make_legacy_manifest(cache)
        _edit_manifest(cache, edit)
        report = check_structure(cache)
        assert not report.ok and any(want in p for p in report.problems), (name, report.problems)
        with pytest.raises(CacheDamagedError, match="not what its manifest says"):
            require_structure(cache)
        res = _verify(cache)
        assert res.exit_code == 1, name
        assert "etc/passwd: checksum" not in res.output and "etc/passwd: missing" not in res.output


@pytest.mark.parametrize("fmt", FORMATS)
def test_index_edits_are_caught(tmp_path, fmt):
    cache = _cache(tmp_path / "c", fmt)
    path = cache / "index.json"
    index = json.loads(path.read_text())
    index["dir/img0.png"], index["dir/img1.png"] = index["dir/img1.png"], index["dir/img0.png"]
    path.write_text(json.dumps(index))
    report = check_structure(cache)
    assert any("index.json: its sha256" in p for p in report.problems)
    assert _verify(cache).exit_code == 1
    # an older cache (no index digest): a path to no row, or a row no path reaches, is still caught
    old = _cache(tmp_path / "old", fmt)
    make_legacy_manifest(old)
    (old / "index.json").write_text(json.dumps({f"dir/img{i}.png": i for i in range(ROWS - 1)}))
    assert any("row(s) [5] hold an image but no path" in p for p in check_structure(old).problems)
    (old / "index.json").write_text(json.dumps({"dir/img0.png": 17}))
    assert any("point past the 6 rows" in p for p in check_structure(old).problems)


def test_missing_zarr_metadata_and_unlisted_chunks(tmp_path):
    cache = _cache(tmp_path / "c", "zarr")
    (cache / "sim" / "zarr.json").unlink()
    report = check_structure(cache)
    assert any(p == "sim/zarr.json: missing" for p in report.problems)
    cache = _cache(tmp_path / "d", "zarr")
    shutil.copy(cache / "sim/c/0/0", cache / "sim/c/7")
    assert any("sim/c/7: a chunk file the manifest does not list" in p for p in check_structure(cache).problems)


def test_hdf5_dataset_shapes_are_checked(tmp_path):
    import h5py
    cache = _cache(tmp_path / "c", "hdf5")
    with h5py.File(cache / "shards" / "shard-00001.h5", "a") as f:
        del f["attn"]
        f.create_dataset("attn", data=np.zeros((2, 4), np.float32))
    assert any("attn is (2, 4)" in p for p in check_structure(cache).problems)


def test_a_clean_cache_passes_everything(tmp_path):
    for fmt in FORMATS:
        cache = _cache(tmp_path / fmt, fmt)
        report = check_structure(cache)
        assert report.ok and not report.notes, report
        res = _verify(cache)
        assert res.exit_code == 0, res.output
        assert "structure: OK" in res.output and "rows: 6/6" in res.output
    with pytest.raises(MedAlignError, match="cache not found"):
        require_structure(tmp_path / "nowhere")
