"""The two on-disk layouts of an A3Tune cache: a Zarr v3 group, or HDF5 files.

Image part, one row per unique image, rows grouped into shards, one chunk per row (docs: README
"A3Tune cache"): ``key`` (rows,) str and ``count`` (rows,) int16, one chunk per shard; ``masks``
(rows, max_masks * mask_bytes) uint8 and ``emb`` (rows, max_masks * embed_dim) float32, sharded,
blosc-zstd, crc32c per chunk (HDF5: ``shards/shard-NNNNN.h5`` with the same datasets, gzip, fletcher32).
Each shard is written whole in a staging area and moved into place (as :mod:`shared.cache.storage`,
whose codecs and direct shard reader are reused). The zero slots past ``count`` cost almost nothing
compressed.

Selection, one row per question, written whole: the Zarr group ``selection-<id>/`` (``qkey``,
``image_row``, ``query_sha``, ``top_idx``, ``top_score``, chunks of 65,536 questions, crc32c) or the
file ``selection-<id>.h5``; staged and renamed into place, so a reader sees a whole one or none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from shared.cache.storage import STAGING, _blosc, _ShardFile, commit_staged_chunks
from shared.images import sha256_file

IMAGE_ARRAYS = ("key", "count", "masks", "emb")
SELECTION_ARRAYS = ("qkey", "image_row", "query_sha", "top_idx", "top_score")
SELECTION_CHUNK = 65536


def _files_under(root: Path, where: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(where.rglob("*")) if p.is_file()}


class A3Layout:
    """What both layouts share: the directory, rows, rows per shard and the row widths."""

    def __init__(self, root: str | Path, rows: int, shard_size: int, max_masks: int, mask_bytes: int,
                 embed_dim: int):
        self.root = Path(root)
        self.rows, self.shard_size = rows, shard_size
        self.max_masks, self.mask_bytes, self.embed_dim = max_masks, mask_bytes, embed_dim
        self.mask_width, self.emb_width = max_masks * mask_bytes, max_masks * embed_dim

    def shard_files(self, shard: int) -> set[str]:
        raise NotImplementedError


class A3Zarr(A3Layout):
    name = "zarr"
    compression = "blosc zstd level 3 (byte shuffle), one chunk per row, crc32c per chunk"

    def shard_files(self, shard: int) -> set[str]:
        return {f"key/c/{shard}", f"count/c/{shard}", f"masks/c/{shard}/0", f"emb/c/{shard}/0"}

    def _arrays(self, where: Path) -> dict:
        import zarr
        from zarr.codecs import Crc32cCodec

        group = zarr.open_group(str(where), mode="a", zarr_format=3)
        rows = max(self.rows, 1)
        shard = min(self.shard_size, rows)
        crc = [Crc32cCodec()]
        specs = {
            "key": dict(shape=(rows,), dtype=str, chunks=(shard,), fill_value="", compressors=crc),
            "count": dict(shape=(rows,), dtype="int16", chunks=(shard,), fill_value=0, compressors=crc),
            "masks": dict(shape=(rows, self.mask_width), dtype="uint8", chunks=(1, self.mask_width),
                          shards=(shard, self.mask_width), compressors=[_blosc("uint8"), *crc], fill_value=0),
            "emb": dict(shape=(rows, self.emb_width), dtype="float32", chunks=(1, self.emb_width),
                        shards=(shard, self.emb_width), compressors=[_blosc("float32"), *crc], fill_value=0),
        }
        return {name: group[name] if name in group else
                group.create_array(name, **spec, config={"write_empty_chunks": True}) for name, spec in specs.items()}

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._arrays(self.root)

    def write_shard(self, index: int, start: int, keys: list[str], counts: np.ndarray, masks: np.ndarray,
                    emb: np.ndarray) -> dict[str, str]:
        stage = self.root / STAGING / f"shard-{index:05d}"
        shutil.rmtree(stage, ignore_errors=True)
        arrays = self._arrays(stage)
        stop = start + len(keys)
        arrays["key"][start:stop] = np.asarray(keys, dtype=object)
        arrays["count"][start:stop] = counts.astype(np.int16)
        arrays["masks"][start:stop] = masks
        arrays["emb"][start:stop] = emb
        return commit_staged_chunks(stage, self.root, IMAGE_ARRAYS)

    def open_rows(self) -> "_ZarrImageRows":
        import zarr

        group = zarr.open_group(str(self.root), mode="r", zarr_format=3)
        arrays = {}
        for name in ("masks", "emb"):
            fast = _ShardFile.layout(self.root / name)
            arrays[name] = _ShardFile(self.root / name, **fast) if fast else group[name]
        return _ZarrImageRows(group["key"], group["count"], arrays["masks"], arrays["emb"])

    @staticmethod
    def selection_rel(name: str) -> str:
        return name

    def write_selection(self, name: str, arrays: dict[str, np.ndarray]) -> dict[str, str]:
        import zarr
        from zarr.codecs import Crc32cCodec

        stage = self.root / STAGING / name
        shutil.rmtree(stage, ignore_errors=True)
        group = zarr.open_group(str(stage), mode="w", zarr_format=3)
        q = len(arrays["qkey"])
        chunk = min(SELECTION_CHUNK, max(q, 1))
        for key, values in arrays.items():
            values = np.asarray(values, dtype=object) if key in ("qkey", "query_sha") else np.asarray(values)
            arr = group.create_array(key, shape=values.shape, dtype=str if values.dtype == object else values.dtype,
                                     chunks=(chunk, *values.shape[1:]), compressors=[Crc32cCodec()],
                                     fill_value="" if values.dtype == object else 0)
            arr[...] = values
        dest = self.root / name
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(stage, dest)
        return _files_under(self.root, dest)

    def open_selection(self, name: str) -> dict:
        import zarr

        group = zarr.open_group(str(self.root / name), mode="r", zarr_format=3)
        return {k: group[k] for k in SELECTION_ARRAYS}


class _ZarrImageRows:
    def __init__(self, key, count, masks, emb):
        self.key, self.count, self.masks, self.emb = key, count, masks, emb

    def read(self, row: int, with_emb: bool = False):
        """(count, packed masks [mask_width] uint8, emb [emb_width] float32 or None)."""
        emb = np.asarray(self.emb[row]) if with_emb else None
        return int(self.count[row]), np.asarray(self.masks[row]), emb

    def keys(self) -> list[str]:
        return [str(k) for k in self.key[:]]

    def close(self):
        for arr in (self.masks, self.emb):
            if isinstance(arr, _ShardFile):
                arr.close()


class A3Hdf5(A3Layout):
    name = "hdf5"
    compression = "gzip level 4 with shuffle, one chunk per row, fletcher32 per chunk"

    @staticmethod
    def shard_name(index: int) -> str:
        return f"shards/shard-{index:05d}.h5"

    def shard_files(self, shard: int) -> set[str]:
        return {self.shard_name(shard)}

    def create(self) -> None:
        (self.root / "shards").mkdir(parents=True, exist_ok=True)

    def write_shard(self, index: int, start: int, keys: list[str], counts: np.ndarray, masks: np.ndarray,
                    emb: np.ndarray) -> dict[str, str]:
        import h5py

        rel = self.shard_name(index)
        dest = self.root / rel
        tmp = dest.with_name(dest.name + ".tmp")
        gz = dict(compression="gzip", compression_opts=4, shuffle=True, fletcher32=True)
        with h5py.File(tmp, "w") as f:
            f.attrs["start"] = start
            f.create_dataset("key", data=np.asarray(keys, dtype="S64"), chunks=(len(keys),), fletcher32=True)
            f.create_dataset("count", data=counts.astype(np.int16), chunks=(len(keys),), fletcher32=True)
            f.create_dataset("masks", data=masks.astype(np.uint8), chunks=(1, self.mask_width), **gz)
            f.create_dataset("emb", data=emb.astype(np.float32), chunks=(1, self.emb_width), **gz)
        os.replace(tmp, dest)
        return {rel: sha256_file(dest)}

    def open_rows(self) -> "_Hdf5ImageRows":
        return _Hdf5ImageRows(self.root, self.rows, self.shard_size)

    @staticmethod
    def selection_rel(name: str) -> str:
        return f"{name}.h5"

    def write_selection(self, name: str, arrays: dict[str, np.ndarray]) -> dict[str, str]:
        import h5py

        rel = self.selection_rel(name)
        (self.root / STAGING).mkdir(parents=True, exist_ok=True)
        tmp = self.root / STAGING / rel
        q = len(arrays["qkey"])
        chunk = min(SELECTION_CHUNK, max(q, 1))
        with h5py.File(tmp, "w") as f:
            for key, values in arrays.items():
                values = (np.asarray([str(v).encode() for v in values], dtype=f"S{max(1, max(map(len, map(str, values)), default=1))}")
                          if key in ("qkey", "query_sha") else np.asarray(values))
                f.create_dataset(key, data=values, chunks=(chunk, *values.shape[1:]), fletcher32=True)
        os.replace(tmp, self.root / rel)
        return {rel: sha256_file(self.root / rel)}

    def open_selection(self, name: str) -> dict:
        import h5py

        f = h5py.File(self.root / self.selection_rel(name), "r")
        return {"_file": f, **{k: f[k] for k in SELECTION_ARRAYS}}


class _Hdf5ImageRows:
    max_open = 16

    def __init__(self, root: Path, rows: int, shard_size: int):
        self.root, self.rows, self.shard_size = root, rows, shard_size
        self._files: dict[int, object] = {}

    def _file(self, shard: int):
        import h5py

        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= self.max_open:
                self._files.pop(next(iter(self._files))).close()
            f = h5py.File(self.root / A3Hdf5.shard_name(shard), "r")
        self._files[shard] = f
        return f

    def read(self, row: int, with_emb: bool = False):
        shard, offset = divmod(int(row), self.shard_size)
        f = self._file(shard)
        return int(f["count"][offset]), f["masks"][offset], (f["emb"][offset] if with_emb else None)

    def keys(self) -> list[str]:
        out: list[str] = []
        for shard in range(-(-self.rows // self.shard_size)):
            out.extend(k.decode() for k in self._file(shard)["key"][:])
        return out

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()


def make_a3_storage(storage: str, root, rows: int, shard_size: int, max_masks: int, mask_bytes: int,
                    embed_dim: int) -> A3Layout:
    return {"zarr": A3Zarr, "hdf5": A3Hdf5}[storage](root, rows, shard_size, max_masks, mask_bytes, embed_dim)


__all__ = ["A3Hdf5", "A3Layout", "A3Zarr", "IMAGE_ARRAYS", "SELECTION_ARRAYS", "make_a3_storage"]
