"""The two on-disk layouts of one logical cache: a Zarr v3 group, or one HDF5 file per shard.

Both store three row-aligned arrays, ``key`` (rows,), ``sim`` (rows, N(N+1)/2) and
``attn`` (rows, N), one chunk per row, rows grouped into shards. Every chunk carries its own
checksum, checked on every read (docs/design.md 2, "Faults"): zarr's standard ``crc32c`` codec after
blosc inside the sharding codec (and on the ``key`` chunks), HDF5's ``fletcher32`` filter. Both are
read by plain zarr / h5py. Caches written before the checksums existed stay readable (their chunks
are then unchecked; ``medalign-cache verify`` says so). Each shard is written whole by
one writer into a staging area and moved into place with ``os.replace``, so a killed build never
leaves a torn shard behind in the live arrays (and two writers never touch one shard: zarr-python
issue 3682).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from shared.grid import triangle_size
from shared.images import sha256_file

STAGING = ".staging"


def _blosc(dtype: str):
    from zarr.codecs import BloscCodec
    # byte-shuffle helps float16/float32; for int8 it is a no-op so plain zstd is used. Level 3:
    # 4% larger than level 5 on real S_e rows but ~2x faster, so compression keeps up with a GPU.
    return BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle" if dtype == "int8" else "shuffle")


def commit_staged_chunks(stage: Path, root: Path, arrays) -> dict[str, str]:
    """Move the chunk files a shard's write left under ``stage/<array>/c/`` into the cache at ``root``
    (each by a rename, after hashing it), remove ``stage``; returns {relative file: sha256}."""
    files = {}
    for name in arrays:
        for path in sorted((stage / name / "c").rglob("*")):
            if path.is_file():
                rel = path.relative_to(stage).as_posix()
                files[rel] = sha256_file(path)
                dest = root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
    shutil.rmtree(stage, ignore_errors=True)
    return files

class _Layout:
    """What both layouts are given: the cache directory, its rows, N, rows per shard, the sim encoding.

    ``chunk_checksums=False`` writes the layout of caches built before per-chunk checksums existed;
    only tests and ``bench/cache.py`` (today's reader as the baseline) use it.
    """

    def __init__(self, root: str | Path, rows: int, num_tokens: int, shard_size: int, sim_dtype: str,
                 chunk_checksums: bool = True):
        self.root = Path(root)
        self.rows, self.n, self.shard_size, self.sim_dtype = rows, num_tokens, shard_size, sim_dtype
        self.tri = triangle_size(num_tokens)
        self.chunk_checksums = chunk_checksums


class ZarrStorage(_Layout):
    """``CACHE/{key,sim,attn}/`` arrays in a Zarr v3 group with the sharding codec."""

    name = "zarr"

    @property
    def compression(self) -> str:
        return ("blosc zstd level 3 (byte shuffle for float16/float32), one chunk per row"
                + (", crc32c per chunk" if self.chunk_checksums else ""))

    def _create_arrays(self, where: Path) -> dict:
        import zarr
        from zarr.codecs import Crc32cCodec
        group = zarr.open_group(str(where), mode="a", zarr_format=3)
        rows = max(self.rows, 1)
        shard = min(self.shard_size, rows)
        crc = [Crc32cCodec()] if self.chunk_checksums else []
        key_codecs = {"compressors": crc} if crc else {}
        specs = {
            "key": dict(shape=(rows,), dtype=str, chunks=(shard,), fill_value="", **key_codecs),
            "sim": dict(shape=(rows, self.tri), dtype=self.sim_dtype, chunks=(1, self.tri),
                        shards=(shard, self.tri), compressors=[_blosc(self.sim_dtype), *crc], fill_value=0),
            "attn": dict(shape=(rows, self.n), dtype="float32", chunks=(1, self.n),
                         shards=(shard, self.n), compressors=[_blosc("float32"), *crc], fill_value=0),
        }
        arrays = {}
        for name, spec in specs.items():
            if name in group:
                arrays[name] = group[name]
            else:
                arrays[name] = group.create_array(name, **spec, config={"write_empty_chunks": True})
        return arrays

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._create_arrays(self.root)

    def write_shard(self, index: int, start: int, keys: list[str], sim: np.ndarray, attn: np.ndarray) -> dict[str, str]:
        """Write rows [start, start + len(keys)) as one shard; returns {relative file: sha256}."""
        stage = self.root / STAGING / f"shard-{index:05d}"
        shutil.rmtree(stage, ignore_errors=True)
        arrays = self._create_arrays(stage)
        stop = start + len(keys)
        arrays["key"][start:stop] = np.asarray(keys, dtype=object)
        arrays["sim"][start:stop] = sim
        arrays["attn"][start:stop] = attn
        return commit_staged_chunks(stage, self.root, ("key", "sim", "attn"))

    def open_reader(self):
        import zarr
        group = zarr.open_group(str(self.root), mode="r", zarr_format=3)
        fast = {name: _ShardFile.layout(self.root / name) for name in ("sim", "attn")}
        if all(fast.values()):
            return _ZarrRows(group["key"], _ShardFile(self.root / "sim", **fast["sim"]),
                             _ShardFile(self.root / "attn", **fast["attn"]))
        return _ZarrRows(group["key"], group["sim"], group["attn"])


def _little_endian(bytes_codec: dict, dtype: str) -> bool:
    """Whether a zarr ``bytes`` codec stores little-endian values; zarr writes no endian at all for
    single-byte types (int8), where the byte order does not exist."""
    endian = bytes_codec.get("configuration", {}).get("endian")
    return endian == "little" or (endian is None and np.dtype(dtype).itemsize == 1)


class _ShardFile:
    """Direct reads of one row from a sharded zarr array written by :class:`ZarrStorage`.

    zarr-python spends ~0.5 ms of asyncio machinery per read; a row is one ``pread`` of the shard
    index (cached, its crc32c checked) and one of the chunk (its crc32c checked when the cache has
    chunk checksums), then blosc. Used only when the array's ``zarr.json`` has exactly a codec chain
    written here (sharding_indexed: bytes/little + blosc [+ crc32c], index bytes/little + crc32c at
    the end); anything else is read through zarr itself. Its imports
    (numcodecs' blosc, google_crc32c) are declared dependencies; tests/teacher_cache/test_build.py
    pins it to zarr's own reads on every row of a built cache, float16 and int8.
    """

    def __init__(self, root: Path, shard_rows: int, width: int, dtype: str, checksummed: bool):
        self.root, self.shard_rows, self.width, self.dtype = root, shard_rows, width, np.dtype(dtype)
        self.checksummed = checksummed
        self._fds: dict[int, int] = {}
        self._indexes: dict[int, np.ndarray] = {}

    @staticmethod
    def layout(root: Path) -> dict | None:
        import json
        try:
            meta = json.loads((root / "zarr.json").read_text())
            (codec,) = meta["codecs"]
            cfg = codec["configuration"]
            inner = [c["name"] for c in cfg["codecs"]]
            ok = (codec["name"] == "sharding_indexed" and cfg["index_location"] == "end"
                  and inner in (["bytes", "blosc"], ["bytes", "blosc", "crc32c"])
                  and _little_endian(cfg["codecs"][0], meta["data_type"])
                  and [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]
                  and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                  and len(meta["shape"]) == 2 and cfg["chunk_shape"] == [1, meta["shape"][1]]
                  and meta["fill_value"] == 0)
        except (OSError, KeyError, ValueError, TypeError):
            return None
        if not ok:
            return None
        return {"shard_rows": meta["chunk_grid"]["configuration"]["chunk_shape"][0], "width": meta["shape"][1],
                "dtype": meta["data_type"], "checksummed": inner[-1] == "crc32c"}

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= 256:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[shard] = os.open(self.root / "c" / str(shard) / "0", os.O_RDONLY)
        return fd

    def _index(self, shard: int) -> np.ndarray:
        index = self._indexes.get(shard)
        if index is None:
            import google_crc32c
            fd = self._fd(shard)
            size = 16 * self.shard_rows + 4
            end = os.fstat(fd).st_size
            if end < size:
                raise OSError(f"{self.root}/c/{shard}/0: truncated shard ({end} bytes, its index alone is {size})")
            raw = os.pread(fd, size, end - size)
            if int.from_bytes(raw[-4:], "little") != google_crc32c.value(raw[:-4]):
                raise OSError(f"{self.root}/c/{shard}/0: shard index checksum mismatch (corrupt file)")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.shard_rows, 2)
            if len(self._indexes) >= 256:
                self._indexes.pop(next(iter(self._indexes)))
            self._indexes[shard] = index
        return index

    def __getitem__(self, row: int) -> np.ndarray:
        from numcodecs import blosc
        shard, offset = divmod(int(row), self.shard_rows)
        start, nbytes = self._index(shard)[offset]
        if start == 2**64 - 1:  # chunk never written: the fill value
            return np.zeros(self.width, self.dtype)
        raw = os.pread(self._fd(shard), int(nbytes), int(start))
        if len(raw) != nbytes:
            raise OSError(f"{self.root}/c/{shard}/0: truncated shard (chunk {offset} ends past the file)")
        if self.checksummed:
            import google_crc32c
            if int.from_bytes(raw[-4:], "little") != google_crc32c.value(raw[:-4]):
                raise OSError(f"{self.root}/c/{shard}/0: chunk {offset} checksum mismatch (corrupt file)")
            raw = raw[:-4]
        out = np.empty(self.width, dtype=self.dtype.newbyteorder("<"))  # writable, so decoding needs no copy
        # the Blosc1 header (16 bytes): decompressed size at 4..8, compressed size at 12..16 (little-endian)
        size = int.from_bytes(raw[4:8], "little") if len(raw) >= 16 else -1
        if size != out.nbytes or int.from_bytes(raw[12:16], "little") != len(raw):
            raise OSError(f"{self.root}/c/{shard}/0: chunk {offset} is not one blosc-compressed row "
                          f"({size} bytes decompressed, a row is {out.nbytes})")
        blosc.decompress(raw, out)
        return out

    def close(self):
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._indexes.clear()

    __del__ = close


class _ZarrRows:
    def __init__(self, key, sim, attn):
        self.key, self.sim, self.attn = key, sim, attn

    def read(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.sim[row]), np.asarray(self.attn[row])

    def keys(self) -> list[str]:
        return [str(k) for k in self.key[:]]

    def key_of(self, row: int) -> str:
        return str(self.key[row])

    def close(self):
        for arr in (self.sim, self.attn):
            if isinstance(arr, _ShardFile):
                arr.close()


class Hdf5Storage(_Layout):
    """``CACHE/shards/shard-NNNNN.h5``, each holding ``key``, ``sim``, ``attn`` for its rows."""

    name = "hdf5"

    @property
    def compression(self) -> str:
        return "gzip level 4 with shuffle, one chunk per row" + (", fletcher32 per chunk" if self.chunk_checksums else "")

    @staticmethod
    def shard_name(index: int) -> str:
        return f"shards/shard-{index:05d}.h5"

    def create(self) -> None:
        (self.root / "shards").mkdir(parents=True, exist_ok=True)

    def write_shard(self, index: int, start: int, keys: list[str], sim: np.ndarray, attn: np.ndarray) -> dict[str, str]:
        import h5py
        rel = self.shard_name(index)
        dest = self.root / rel
        tmp = dest.with_name(dest.name + ".tmp")
        check = self.chunk_checksums
        with h5py.File(tmp, "w") as f:
            f.attrs["start"] = start
            f.create_dataset("key", data=np.asarray(keys, dtype="S64"), chunks=(len(keys),), fletcher32=check)
            f.create_dataset("sim", data=sim, chunks=(1, self.tri), compression="gzip",
                             compression_opts=4, shuffle=True, fletcher32=check)
            f.create_dataset("attn", data=attn.astype(np.float32), chunks=(1, self.n),
                             compression="gzip", compression_opts=4, shuffle=True, fletcher32=check)
        os.replace(tmp, dest)
        return {rel: sha256_file(dest)}

    def open_reader(self):
        return _Hdf5Rows(self.root, self.rows, self.shard_size)


class _Hdf5Rows:
    """Opens shard files on first use and keeps a few handles open (files are small and many)."""

    max_open = 16

    def __init__(self, root: Path, rows: int, shard_size: int):
        self.root, self.rows, self.shard_size = root, rows, shard_size
        self._files: dict[int, object] = {}

    def _file(self, shard: int) -> dict:
        """The shard's open file and its datasets (looking a dataset up by name costs ~0.2 ms a read)."""
        import h5py
        entry = self._files.pop(shard, None)
        if entry is None:
            if len(self._files) >= self.max_open:
                oldest = next(iter(self._files))
                self._files.pop(oldest)["file"].close()
            f = h5py.File(self.root / Hdf5Storage.shard_name(shard), "r")
            entry = {"file": f, "sim": f["sim"], "attn": f["attn"], "key": f["key"]}
        self._files[shard] = entry  # re-insert: most recently used last
        return entry

    def read(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        shard, offset = divmod(row, self.shard_size)
        f = self._file(shard)
        return f["sim"][offset], f["attn"][offset]

    def keys(self) -> list[str]:
        out: list[str] = []
        for shard in range((self.rows + self.shard_size - 1) // self.shard_size):
            out.extend(k.decode() for k in self._file(shard)["key"][:])
        return out

    def key_of(self, row: int) -> str:
        shard, offset = divmod(row, self.shard_size)
        return self._file(shard)["key"][offset].decode()

    def close(self):
        for entry in self._files.values():
            entry["file"].close()
        self._files.clear()


def make_storage(storage: str, root, rows: int, num_tokens: int, shard_size: int, sim_dtype: str,
                 chunk_checksums: bool = True):
    cls = {"zarr": ZarrStorage, "hdf5": Hdf5Storage}[storage]
    return cls(root, rows, num_tokens, shard_size, sim_dtype, chunk_checksums)
