"""The cache contract: round trips, encodings, refusal to clobber, laziness and bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cache_helpers import write_cache
from shared.cache import Manifest, open_cache
from shared.cache.manifest import canonical_sha256
from shared.cache.writer import CacheWriter
from shared.errors import CacheDamagedError, MedAlignError
from shared.grid import pack_triangle, unpack_triangle


def _cosine_mats(rows: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(rows, n, 12))
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    return (f @ f.transpose(0, 2, 1)).astype(np.float32)


def _fixture(rows=7, n=9, seed=0):
    sims = _cosine_mats(rows, n, seed)
    attns = np.random.default_rng(seed + 1).random((rows, n)).astype(np.float32)
    keys = [f"{i:064x}" for i in range(rows)]
    index = {f"dir/img{i}.png": i for i in range(rows)}
    return sims, attns, keys, index


def test_triangle_pack_roundtrip():
    m = _cosine_mats(1, 6)[0]
    tri = pack_triangle(m)
    assert tri.shape == (21,)
    i, j = np.triu_indices(6)
    np.testing.assert_array_equal(tri, m[i, j])  # numpy's triu order, as the README states
    np.testing.assert_array_equal(unpack_triangle(tri), m)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("dtype,tol", [("float16", 5e-4), ("int8", 4e-3)])
def test_roundtrip_all_formats(tmp_path, fmt, dtype, tol):
    sims, attns, keys, index = _fixture()
    write_cache(tmp_path / "c", sims, attns, keys, index, format=fmt, dtype=dtype, shard_size=3)
    reader = open_cache(tmp_path / "c")
    assert len(reader) == 7 and reader.manifest.grid == 3 and reader.manifest.storage == fmt
    assert len(reader.manifest.shards) == 3  # 3 + 3 + 1 rows
    for rel, row in index.items():
        sim, attn = reader.get(rel)
        assert sim.dtype == np.float32 and sim.shape == (9, 9) and attn.shape == (9,)
        assert np.abs(sim - sims[row]).max() <= tol
        np.testing.assert_array_equal(sim, sim.T)
        np.testing.assert_array_equal(attn, attns[row])  # float32, exact
    assert reader.keys() == keys
    assert reader.get("not/there.png") is None


def test_sim_encoding_is_one_definition_for_numpy_and_torch():
    """The build encodes on its device (torch), write_cache in numpy: the same stored values."""
    import torch
    from shared.cache.encoding import decode_sim, encode_sim
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(-1.2, 1.2, 5000), (np.arange(-127, 128) + 0.5) / 127.0,
                             [-1.0, 0.0, 1.0, 0.5 / 127, -0.5 / 127]]).astype(np.float32)
    for dtype in ("float16", "int8"):
        from_numpy = encode_sim(values, dtype)
        from_torch = encode_sim(torch.from_numpy(values), dtype).numpy()
        assert from_numpy.dtype == from_torch.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(from_numpy, from_torch)
        assert encode_sim(from_numpy, dtype) is from_numpy  # already encoded: passes through
    stored = encode_sim(values, "int8")
    assert stored.min() == -127 and stored.max() == 127
    np.testing.assert_array_equal(decode_sim(stored, "int8"), stored.astype(np.float32) / np.float32(127.0))
    with pytest.raises(MedAlignError, match="sim dtype"):
        encode_sim(values, "bfloat16")


def test_lookup_by_content_after_rename(tmp_path):
    img = tmp_path / "images" / "renamed.png"
    img.parent.mkdir()
    img.write_bytes(b"fake image bytes")
    from shared.images import sha256_file
    sims, attns, keys, index = _fixture(rows=2)
    keys[1] = sha256_file(img)
    write_cache(tmp_path / "c", sims, attns, keys, {"old/name.png": 1, "a.png": 0})
    reader = open_cache(tmp_path / "c")
    assert reader.lookup("renamed.png") is None
    assert reader.lookup("renamed.png", image_root=tmp_path / "images") == 1
    assert reader.lookup("./old//name.png") == 1  # normalised paths


def test_zarr_layout_readable_with_zarr_alone(tmp_path):
    import zarr
    sims, attns, keys, index = _fixture(rows=4)
    write_cache(tmp_path / "c", sims, attns, keys, index, dtype="int8")
    g = zarr.open_group(str(tmp_path / "c"), mode="r")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    idx = json.loads((tmp_path / "c" / "index.json").read_text())
    row = idx["dir/img2.png"]
    tri = g["sim"][row].astype(np.float32) / 127
    i, j = np.triu_indices(9)
    assert np.abs(tri - sims[row][i, j]).max() <= 4e-3
    assert g["key"][row] == keys[row]
    assert manifest["sim_dtype"] == "int8" and manifest["format_version"] == 1


def test_manifest_rejects_unknown_keys_and_versions(tmp_path):
    sims, attns, keys, index = _fixture(rows=2)
    write_cache(tmp_path / "c", sims, attns, keys, index)
    path = tmp_path / "c" / "manifest.json"
    data = json.loads(path.read_text())

    def sealed(d):  # what a newer tool would write: its own checksum over its own keys
        return dict(d, checksum=canonical_sha256(d))

    with pytest.raises(MedAlignError, match="unknown manifest keys"):
        Manifest.from_json(sealed(dict(data, surprise=1)))
    with pytest.raises(MedAlignError, match="version"):
        Manifest.from_json(sealed(dict(data, format_version=99)))
    with pytest.raises(TypeError):
        Manifest(**{k: v for k, v in data.items() if k != "format_version"}, format_version=2)


def test_refuses_other_identity_and_nonempty_dirs(tmp_path):
    sims, attns, keys, index = _fixture(rows=2)
    write_cache(tmp_path / "c", sims, attns, keys, index, expert="unimed-b")
    with pytest.raises(MedAlignError, match="different cache.*expert"):
        write_cache(tmp_path / "c", sims, attns, keys, index, expert="biomedclip")
    with pytest.raises(MedAlignError, match="different cache.*geometry"):
        write_cache(tmp_path / "c", sims, attns, keys, index, expert="unimed-b", geometry="crop")
    with pytest.raises(MedAlignError, match="already holds a finished cache"):
        write_cache(tmp_path / "c", sims, attns, keys, index, expert="unimed-b")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(MedAlignError, match="not empty"):
        write_cache(tmp_path / "other", sims, attns, keys, index)
    assert (tmp_path / "other" / "precious.txt").read_text() == "x"


def test_unfinished_build_needs_resume_and_is_not_readable(tmp_path):
    sims, attns, keys, index = _fixture(rows=5)
    ident = {"expert": "x", "weights_sha256": "0", "grid": 3, "geometry": "pad", "token_mode": "raw",
             "resample_order": "norm-resample-norm"}
    w = CacheWriter(tmp_path / "c", identity=ident, keys=keys, index=index, num_tokens=9, shard_size=2)
    w.write_shard(0, sims[:2], attns[:2])
    with pytest.raises(MedAlignError, match="unfinished build"):
        open_cache(tmp_path / "c")
    with pytest.raises(MedAlignError, match="--resume"):
        CacheWriter(tmp_path / "c", identity=ident, keys=keys, index=index, num_tokens=9, shard_size=2)
    with pytest.raises(MedAlignError, match="different settings"):
        CacheWriter(tmp_path / "c", identity=ident, keys=keys[::-1], index=index, num_tokens=9, shard_size=2,
                    resume=True)
    w2 = CacheWriter(tmp_path / "c", identity=ident, keys=keys, index=index, num_tokens=9, shard_size=2, resume=True)
    assert w2.pending_shards() == [1, 2]


_RSS_SCRIPT = r"""
import sys, numpy as np, psutil, os
from shared.cache import open_cache
r = open_cache(sys.argv[1])
rng = np.random.default_rng(0)
paths = list(r.index)
for p in rng.choice(len(paths), 300):
    r.get(paths[p])
print(psutil.Process(os.getpid()).memory_info().rss)
"""


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_reader_memory_does_not_grow_with_rows(tmp_path, fmt):
    """Reading 300 random rows from a 100-row and a 1,500-row cache costs about the same memory."""
    pytest.importorskip("psutil")
    rss = {}
    for rows in (100, 1500):
        n = 144
        sims = np.broadcast_to(_cosine_mats(1, n)[0], (rows, n, n))
        attns = np.random.default_rng(0).random((rows, n)).astype(np.float32)
        keys = [f"{i:064x}" for i in range(rows)]
        write_cache(tmp_path / f"c{rows}", sims, attns, keys, {f"i{i}.png": i for i in range(rows)}, format=fmt)
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / f"c{rows}")],
                             capture_output=True, text=True, check=True)
        rss[rows] = int(out.stdout.strip())
    # Holding the rows would cost 1,400 x 21 KB (float16 triangles) = 29 MB more; the index adds ~0.1 MB.
    assert rss[1500] - rss[100] < 10e6, rss


def test_direct_shard_reads_equal_zarr_reads(tmp_path):
    """The reader's pread fast path returns exactly what zarr-python returns, row for row."""
    import zarr
    from shared.cache.storage import _ShardFile
    sims, attns, keys, index = _fixture(rows=11, n=16)
    write_cache(tmp_path / "c", sims, attns, keys, index, shard_size=4)
    reader = open_cache(tmp_path / "c")
    rows = reader._store()
    assert isinstance(rows.sim, _ShardFile) and isinstance(rows.attn, _ShardFile)
    g = zarr.open_group(str(tmp_path / "c"), mode="r")
    for r in range(11):
        np.testing.assert_array_equal(rows.sim[r], g["sim"][r])
        np.testing.assert_array_equal(rows.attn[r], g["attn"][r])
    shard = tmp_path / "c" / "sim" / "c" / "1" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # flip a bit inside the shard index
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheDamagedError, match="row 5 .*shard index checksum mismatch"):
        open_cache(tmp_path / "c").read(5)
