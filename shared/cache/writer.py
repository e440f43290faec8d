"""Writing a cache: plan, shards committed one at a time, manifest last.

A build is resumable: ``.progress/plan.json`` fixes the row order and the build's identity before
any shard is written, each committed shard leaves ``.progress/shard-NNNNN.json``, and the manifest
is written only when every shard is in (``attach=True``: a rank of a torchrun build joins the build
rank 0 prepared, :mod:`shared.cache.parallel`). ``--resume`` re-plans, checks the plan is the same, and
computes only the shards without a marker, so the finished cache is identical array for array
to an uninterrupted build.
"""

from __future__ import annotations

import datetime as _dt
import json
import posixpath
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from shared.cache.encoding import check_sim_dtype, encode_sim
from shared.cache.lock import LOCK_NAME
from shared.cache.manifest import BUILD_IDENTITY_KEYS, INDEX_NAME, MANIFEST_NAME, STORAGES, Manifest
from shared.cache.storage import STAGING, make_storage
from shared.errors import MedAlignError
from shared.fileio import atomic_write_json
from shared.grid import LEGACY_RESAMPLE_ORDER, pack_triangle, triangle_size
from shared.images import sha256_file

PROGRESS = ".progress"
DEFAULT_SHARD_SIZE = 256


def normalise_rel(path: str) -> str:
    """Dataset-relative image paths as index keys: posix separators, no ``./`` or ``a/../``."""
    return posixpath.normpath(str(path).replace("\\", "/"))


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("medalign")
    except Exception:
        return "dev"


def join_plan(out: Path, plan: dict[str, Any]) -> None:
    """Join a build another process prepared (a rank > 0 of a torchrun build, after rank 0's
    set-up): nothing is created; the plan on disk must be this very ``plan``."""
    try:
        old = json.loads((out / PROGRESS / "plan.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MedAlignError(f"--out {out}: no plan of an unfinished build to join ({e})") from None
    ours = json.loads(json.dumps(plan))
    if old != ours:
        changed = [k for k in ours if old.get(k) != ours[k]]
        raise MedAlignError(f"--out {out}: this rank planned another build than rank 0 (differs in: "
                            f"{', '.join(changed)}); every rank must see the same --data files and images")


def unfinished_plan(out: Path, resume: bool) -> dict | None:
    """The plan an unfinished build in ``out`` was started with (None when its ``plan.json`` is gone or
    unreadable), refusing to go on without ``--resume``."""
    if not resume:
        raise MedAlignError(f"--out {out} holds an unfinished build; pass --resume to finish it "
                            "or remove the directory")
    try:
        return json.loads((out / PROGRESS / "plan.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class ShardMarkers:
    """A build's row ranges and per-shard progress markers, shared by both cache kinds' writers.

    Needs ``out``, ``keys`` (one per row), ``shard_size`` and :meth:`_finished` (``--resume`` of a
    finished cache: nothing is pending). A shard is committed when its marker (its rows, files with
    their sha256, ``--skip-bad`` failures) is on disk."""

    out: Path
    keys: list[str]
    shard_size: int

    def _finished(self) -> bool:
        raise NotImplementedError

    @property
    def num_shards(self) -> int:
        return -(-len(self.keys) // self.shard_size)

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.keys)))

    def _marker(self, shard: int) -> Path:
        return self.out / PROGRESS / f"shard-{shard:05d}.json"

    def pending_shards(self) -> list[int]:
        if self._finished():
            return []
        return [s for s in range(self.num_shards) if not self._marker(s).is_file()]

    def _commit_marker(self, shard: int, files: dict[str, str], failures: list[dict[str, str]] | None) -> None:
        rows = self.shard_rows(shard)
        atomic_write_json(self._marker(shard), {"index": shard, "start": rows.start, "stop": rows.stop,
                                                "files": files, "failures": failures or []})


class CacheWriter(ShardMarkers):
    """Creates (or resumes) a cache in ``out``.

    ``identity`` is the dict of :data:`~shared.cache.manifest.BUILD_IDENTITY_KEYS` (plus anything else
    that must match on resume); ``keys`` is the sha256 of each row's image in row order; ``index`` maps every
    dataset-relative path to its row. ``chunk_checksums=False`` writes the layout of caches made before
    per-chunk checksums existed (for tests and the benchmark's baseline only).
    """

    def __init__(self, out: str | Path, *, identity: dict[str, Any], keys: list[str], index: dict[str, int],
                 num_tokens: int, storage: str = "zarr", sim_dtype: str = "float16",
                 shard_size: int = DEFAULT_SHARD_SIZE, resume: bool = False, chunk_checksums: bool = True,
                 attach: bool = False):
        if storage not in STORAGES:
            raise MedAlignError(f"unknown storage format {storage!r}; choose one of {', '.join(STORAGES)}")
        check_sim_dtype(sim_dtype, "--dtype")
        if shard_size < 1:
            raise MedAlignError("shard size must be >= 1")
        missing = [k for k in BUILD_IDENTITY_KEYS if k not in identity]
        if missing:
            raise ValueError(f"CacheWriter identity lacks {missing}")
        self.out = Path(out)
        self.keys, self.num_tokens, self.shard_size = list(keys), num_tokens, shard_size
        self.index = {normalise_rel(k): int(v) for k, v in index.items()}
        self.plan = {"identity": identity, "storage": storage, "sim_dtype": sim_dtype, "shard_size": shard_size,
                     "num_tokens": num_tokens, "keys": self.keys, "index": self.index}
        self.storage = make_storage(storage, self.out, len(self.keys), num_tokens, shard_size, sim_dtype,
                                    chunk_checksums)
        self.sim_dtype = sim_dtype
        self.complete = False
        if attach:
            self._attach()
        else:
            self._prepare(resume)

    def _attach(self) -> None:
        join_plan(self.out, self.plan)

    # -- set-up: refuse to clobber anything that is not this very build ---------------------------
    def _prepare(self, resume: bool) -> None:
        progress = self.out / PROGRESS
        manifest_path = self.out / MANIFEST_NAME
        if manifest_path.is_file():
            existing = Manifest.load(self.out)
            ours = self.plan["identity"]
            theirs = existing.identity()
            diff = {k: (theirs.get(k), ours.get(k)) for k in BUILD_IDENTITY_KEYS if theirs.get(k) != ours.get(k)}
            if not existing.resampled:  # g == G: nothing was resampled, both orders give the same arrays
                diff.pop("resample_order", None)
            if diff:
                parts = ", ".join(f"{k}: existing {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
                raise MedAlignError(f"--out {self.out} already holds a different cache ({parts}); "
                                    "refusing to overwrite it. Choose another --out.")
            settings = {"--format": (existing.storage, self.plan["storage"]),
                        "--dtype": (existing.sim_dtype, self.sim_dtype),
                        "--shard-size": (existing.shard_size, self.shard_size)}
            other = [f"{flag} {want!r} (the cache holds {have!r})" for flag, (have, want) in settings.items()
                     if have != want]
            if resume and other:
                raise MedAlignError(f"--resume into the finished cache {self.out} with other settings: "
                                    f"{', '.join(other)}; a finished cache is never rewritten: use its "
                                    "settings, or build into another --out")
            if resume and self._same_images(existing):
                self.complete = True
                return
            raise MedAlignError(f"--out {self.out} already holds a finished cache of this expert"
                                + ("" if resume else "; pass --resume to reuse it")
                                + (" but for other images; build into a new --out" if resume else ""))
        if progress.is_dir():
            old = unfinished_plan(self.out, resume)
            if old is not None and isinstance(old.get("identity"), dict):
                # a plan from before the setting existed resampled the raw tokens (see Manifest)
                old["identity"].setdefault("resample_order", LEGACY_RESAMPLE_ORDER)
            ours = json.loads(json.dumps(self.plan))
            if old is not None and old != ours:
                changed = [k for k in ours if old.get(k) != ours[k]]
                theirs_id, ours_id = old.get("identity") or {}, ours["identity"]
                sides = [f"{k}: unfinished {theirs_id.get(k)!r} vs requested {ours_id.get(k)!r}"
                         for k in sorted(set(theirs_id) | set(ours_id)) if theirs_id.get(k) != ours_id.get(k)]
                raise MedAlignError(f"--resume: the unfinished build in {self.out} was started with different "
                                    f"settings or inputs (differs in: {', '.join(changed)}"
                                    + (f"; {', '.join(sides)}" if sides else "") + "); use a new --out")
        elif self.out.exists() and any(p.name != LOCK_NAME for p in self.out.iterdir()):
            raise MedAlignError(f"--out {self.out} exists and is not empty (and is not a MedAlign cache); "
                                "refusing to write into it")
        progress.mkdir(parents=True, exist_ok=True)
        atomic_write_json(progress / "plan.json", self.plan)
        self.storage.create()

    def _same_images(self, existing: Manifest) -> bool:
        """Whether the finished cache holds exactly the planned images: the same rows, every planned
        path at its row, and each row's stored content key equal to the image's sha256 now (an image
        edited in place since the build is not "already cached")."""
        from shared.cache.reader import open_cache

        if existing.rows != len(self.keys) or not (self.out / INDEX_NAME).is_file():
            return False
        reader = open_cache(self.out)
        try:
            stored_index = reader.index
            if any(stored_index.get(rel) != row for rel, row in self.index.items()):
                return False
            stored = reader.keys()
        finally:
            reader.close()
        changed = [rel for rel, row in self.index.items() if stored[row] and stored[row] != self.keys[row]]
        if changed:
            raise MedAlignError(f"--resume: {len(changed)} image(s) changed since {self.out} was built (their bytes "
                                f"no longer match the cached rows): {', '.join(sorted(changed)[:5])}"
                                f"{' ...' if len(changed) > 5 else ''}; build into a new --out")
        return True

    # -- shards ----------------------------------------------------------------------------------
    def _finished(self) -> bool:
        return self.complete

    def write_shard(self, shard: int, sim: np.ndarray, attn: np.ndarray,
                    failures: list[dict[str, str]] | None = None, failed_rows: set[int] | None = None) -> None:
        """Commit one shard. ``sim`` is (rows, N, N) full matrices or (rows, T) packed triangles, as floats
        (encoded here) or already in the stored encoding (the build encodes on its device)."""
        rows = self.shard_rows(shard)
        if sim.ndim == 3:
            sim = pack_triangle(sim)
        if sim.shape != (len(rows), triangle_size(self.num_tokens)) or attn.shape != (len(rows), self.num_tokens):
            raise ValueError(f"shard {shard}: got sim {sim.shape}, attn {attn.shape} for {len(rows)} rows")
        keys = [("" if failed_rows and r in failed_rows else self.keys[r]) for r in rows]
        sim = np.asarray(sim)
        if sim.dtype not in (np.float16, np.int8):
            sim = sim.astype(np.float32, copy=False)
        files = self.storage.write_shard(shard, rows.start, keys, encode_sim(sim, self.sim_dtype),
                                         np.asarray(attn, np.float32))
        self._commit_marker(shard, files, failures)

    # -- finish ----------------------------------------------------------------------------------
    def finalize(self, *, expert: str, arch: str, weights_sha256: str, token_mode: str,
                 preprocessing: dict[str, Any], layer: str, patch_grid: int, grid: int, resample_order: str,
                 sources: list[dict[str, Any]] | None = None) -> Manifest:
        """Write index.json, then manifest.json (atomically, last), then drop the progress files."""
        if self.complete:
            return Manifest.load(self.out)
        pending = self.pending_shards()
        if pending:
            raise RuntimeError(f"cannot finalize: shards {pending[:5]} not written")
        shards, failures = [], []
        for s in range(self.num_shards):
            m = json.loads(self._marker(s).read_text())
            failures.extend(m.pop("failures", []))
            shards.append(m)
        failed_keys = {f.get("key") for f in failures if f.get("key")}
        index = {p: r for p, r in self.index.items() if self.keys[r] not in failed_keys}
        atomic_write_json(self.out / INDEX_NAME, index)
        index_digest = sha256_file(self.out / INDEX_NAME)
        manifest = Manifest(
            expert=expert, arch=arch, weights_sha256=weights_sha256, token_mode=token_mode,
            preprocessing=preprocessing, layer=layer, patch_grid=patch_grid, grid=grid,
            resample_order=resample_order,
            storage=self.storage.name, sim_dtype=self.sim_dtype, rows=len(self.keys), shard_size=self.shard_size,
            compression=self.storage.compression,
            shards=shards, failures=failures, sources=sources or [],
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), tool_version=_version(),
            index_sha256=index_digest).sealed()
        atomic_write_json(self.out / MANIFEST_NAME, manifest.to_json())
        shutil.rmtree(self.out / PROGRESS, ignore_errors=True)
        shutil.rmtree(self.out / STAGING, ignore_errors=True)
        self.complete = True
        return manifest

