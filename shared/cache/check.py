"""Whether a cache is what its manifest claims: the structural checks and the file checksums.

:func:`check_structure` is cheap (no sim/attn chunk is read): the manifest's own checksum (on load),
the shard list against ``rows`` and ``shard_size``, every shard's files (the expected names, inside
the cache directory, present) and no unlisted chunk file, the stored arrays' shapes, dtypes and
chunking (zarr metadata / HDF5 datasets) against the manifest, and ``index.json`` against its
recorded digest and the ``key`` array. ``medalign-train`` runs it before loading the model
(:func:`require_structure`); ``medalign-cache verify`` runs it and then :func:`check_file_checksums`,
which hashes every listed file. docs/design.md 2, "Faults", says what is checked when.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np

from shared.cache.manifest import INDEX_NAME, Manifest
from shared.cache.writer import PROGRESS
from shared.cache.storage import STAGING, Hdf5Storage
from shared.errors import CacheDamagedError, MedAlignError
from shared.grid import triangle_size
from shared.images import sha256_file

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: How many problems a one-line error lists before "(+K more)".
SHOW = 3


@dataclass
class Report:
    """What a check found: ``problems`` make the cache unusable; ``notes`` are worth knowing (an older
    cache without chunk checksums or a manifest checksum)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    error: MedAlignError | None = None
    """Why the manifest could not be used (missing directory or manifest, bad checksum, bad keys)."""

    @property
    def ok(self) -> bool:
        return not self.problems


def inside(root: Path, rel: str) -> bool:
    """Whether a manifest path names a file inside ``root``: relative, normalised, no ``..``, no
    backslash, and (symlinks resolved) still under ``root``."""
    if not isinstance(rel, str) or not rel or "\\" in rel or rel != posixpath.normpath(rel):
        return False
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        return False
    try:
        return (root / rel).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def expected_files(m: Manifest, shard: int) -> set[str]:
    """The files one shard of a cache written by this tool consists of."""
    if m.storage == "hdf5":
        return {Hdf5Storage.shard_name(shard)}
    return {f"key/c/{shard}", f"sim/c/{shard}/0", f"attn/c/{shard}/0"}


def check_shard_layout(root: Path, m, r: Report, expected: Callable[[int], set[str]],
                       chunk_dirs: Sequence[str]) -> None:
    """The shard list of manifest ``m`` (either cache kind: ``rows``, ``shard_size``, ``shards``) against
    its row layout, each shard's files against ``expected(shard)`` (inside the cache, present), no chunk
    file under ``chunk_dirs`` that no shard lists; leftovers of an interrupted build as notes."""
    if m.shard_size < 1 or m.rows < 0:
        r.problems.append(f"manifest: rows {m.rows} / shard_size {m.shard_size} are not a shard layout")
        return
    count = -(-m.rows // m.shard_size)
    if len(m.shards) != count:
        r.problems.append(f"manifest lists {len(m.shards)} shard(s); {m.rows} rows in shards of {m.shard_size} "
                          f"need {count}")
    listed: set[str] = set()
    for pos, s in enumerate(m.shards):
        want = (pos, pos * m.shard_size, min((pos + 1) * m.shard_size, m.rows))
        got = (s.get("index"), s.get("start"), s.get("stop")) if isinstance(s, dict) else None
        if got != want:
            r.problems.append(f"shard entry {pos}: index/start/stop {got}, expected {want}")
            continue
        files = s.get("files")
        if not isinstance(files, dict):
            r.problems.append(f"shard {pos}: no file list")
            continue
        unsafe = [f for f in files if not inside(root, f)]
        for f in unsafe:
            r.problems.append(f"shard {pos}: file {f!r} is not a path inside the cache (refused, not read)")
        names = set(files) - set(unsafe)
        listed |= names
        want_files = expected(pos)
        if names - want_files or (want_files - names and not unsafe):
            r.problems.append(f"shard {pos}: lists {sorted(files)}, expected {sorted(want_files)}")
        for f in sorted(names & want_files):
            if not (root / f).is_file():
                r.problems.append(f"{f}: missing")
    on_disk = {p.relative_to(root).as_posix() for d in chunk_dirs if (root / d).is_dir()
               for p in (root / d).rglob("*") if p.is_file()}
    for f in sorted(on_disk - listed)[:SHOW]:
        r.problems.append(f"{f}: a chunk file the manifest does not list")
    if len(on_disk - listed) > SHOW:
        r.problems.append(f"... and {len(on_disk - listed) - SHOW} more unlisted chunk files")
    for leftover in (STAGING, PROGRESS):
        if (root / leftover).exists():
            r.notes.append(f"{leftover}/ is left over from an interrupted build (harmless; may be removed)")


def _zarr_meta(root: Path, m: Manifest, r: Report) -> None:
    shard = min(m.shard_size, max(m.rows, 1))
    tri = triangle_size(m.num_tokens)
    want = {"key": ([m.rows], "string", [shard], None),
            "sim": ([m.rows, tri], m.sim_dtype, [shard, tri], [1, tri]),
            "attn": ([m.rows, m.num_tokens], "float32", [shard, m.num_tokens], [1, m.num_tokens])}
    if not (root / "zarr.json").is_file():
        r.problems.append("zarr.json (the group's metadata): missing")
    unchecked = []
    for name, (shape, dtype, grid, inner) in want.items():
        path = root / name / "zarr.json"
        try:
            meta = json.loads(path.read_text())
            got_grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
            codecs = meta["codecs"]
            names = [c["name"] for c in codecs]
            if inner is not None:
                (sharding,) = codecs
                names = [c["name"] for c in sharding["configuration"]["codecs"]]
                got_inner = sharding["configuration"]["chunk_shape"]
        except FileNotFoundError:
            r.problems.append(f"{name}/zarr.json: missing")
            continue
        except (OSError, ValueError, KeyError, TypeError) as e:
            r.problems.append(f"{name}/zarr.json: unreadable or not this tool's layout ({type(e).__name__}: {e})")
            continue
        if meta.get("shape") != shape or meta.get("data_type") != dtype or got_grid != grid:
            r.problems.append(f"{name}/zarr.json: shape {meta.get('shape')}, dtype {meta.get('data_type')}, shards "
                              f"{got_grid}; the manifest implies shape {shape}, dtype {dtype}, shards {grid}")
        elif inner is not None and got_inner != inner:
            r.problems.append(f"{name}/zarr.json: chunks {got_inner}, expected one row per chunk {inner}")
        if "crc32c" not in names:
            unchecked.append(name)
    if unchecked:
        r.notes.append(f"the {', '.join(unchecked)} chunks carry no checksum (a cache built before per-chunk "
                       "checksums): a damaged chunk is caught only by `verify`'s file checksums; rebuild to add them")


def _hdf5_meta(root: Path, m: Manifest, r: Report) -> None:
    import h5py

    tri, unchecked = triangle_size(m.num_tokens), 0
    for pos, s in enumerate(m.shards):
        rel = Hdf5Storage.shard_name(pos)
        if not (root / rel).is_file() or not inside(root, rel):
            continue  # reported with the shard list
        n = int(s.get("stop", 0)) - int(s.get("start", 0))
        want = {"key": ((n,), "S64"), "sim": ((n, tri), m.sim_dtype), "attn": ((n, m.num_tokens), "float32")}
        try:
            with h5py.File(root / rel, "r") as f:
                if int(f.attrs.get("start", -1)) != s.get("start"):
                    r.problems.append(f"{rel}: starts at row {f.attrs.get('start')}, the manifest says {s.get('start')}")
                for name, (shape, dtype) in want.items():
                    if name not in f:
                        r.problems.append(f"{rel}: no {name} dataset")
                        continue
                    d = f[name]
                    if d.shape != shape or d.dtype != np.dtype(dtype):
                        r.problems.append(f"{rel}: {name} is {d.shape} {d.dtype}, the manifest implies {shape} {dtype}")
                    unchecked += not d.fletcher32
        except OSError as e:
            r.problems.append(f"{rel}: cannot be opened as HDF5 ({e})")
    if unchecked:
        r.notes.append(f"{unchecked} HDF5 dataset(s) carry no fletcher32 chunk checksums (a cache built before "
                       "them): a damaged chunk is caught only by `verify`'s file checksums; rebuild to add them")


def _check_index(root: Path, m: Manifest, r: Report) -> None:
    from shared.cache.reader import CacheReader

    path = root / INDEX_NAME
    if not path.is_file():
        r.problems.append(f"{INDEX_NAME}: missing")
        return
    if m.index_sha256 and sha256_file(path) != m.index_sha256:
        r.problems.append(f"{INDEX_NAME}: its sha256 is not the one the manifest recorded (edited or damaged)")
    elif not m.index_sha256:
        r.notes.append(f"the manifest records no digest of {INDEX_NAME} (built before it did): edits to it are "
                       "caught only where they contradict the key array")
    try:
        index = json.loads(path.read_text())
        if not isinstance(index, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                  for v in index.values()):
            raise ValueError("not an object of path -> row")
    except ValueError as e:
        r.problems.append(f"{INDEX_NAME}: unreadable ({e})")
        return
    bad = [p for p, row in index.items() if not 0 <= row < m.rows]
    if bad:
        r.problems.append(f"{INDEX_NAME}: {len(bad)} path(s) point past the {m.rows} rows, e.g. {bad[0]!r}")
        return
    if r.problems:
        return  # the key array is read only from a cache whose layout checked out
    try:
        keys = CacheReader(root).keys()
    except MedAlignError as e:
        r.problems.append(str(e))
        return
    empty = sorted({p for p, row in index.items() if not keys[row]})
    if empty:
        r.problems.append(f"{INDEX_NAME}: {len(empty)} path(s) point at rows without an image (failed rows), "
                          f"e.g. {empty[0]!r}")
    malformed = [row for row, k in enumerate(keys) if k and not _HEX64.fullmatch(k)]
    if malformed:
        r.problems.append(f"key array: row {malformed[0]} holds {keys[malformed[0]]!r}, not a sha256")
    seen: dict[str, int] = {}
    for row, k in enumerate(keys):
        if k and seen.setdefault(k, row) != row:
            r.problems.append(f"key array: rows {seen[k]} and {row} hold the same image (rows are unique images)")
            break
    unindexed = sorted(set(range(m.rows)) - set(index.values()) - {row for row, k in enumerate(keys) if not k})
    if unindexed:
        r.problems.append(f"{INDEX_NAME}: row(s) {unindexed[:SHOW]} hold an image but no path points at them")


def check_structure(cache: str | Path) -> Report:
    """The structural checks (module docstring). Never raises for a damaged cache: it reports."""
    root = Path(cache)
    r = Report()
    try:
        if not root.is_dir():
            raise MedAlignError(f"cache not found: {cache}")
        m = r.manifest = Manifest.load(root)
    except MedAlignError as e:
        r.error = e
        r.problems.append(str(e))
        return r
    if not m.checksum:
        r.notes.append("the manifest carries no checksum of its own (built before it did): edits to it are "
                       "caught only where they contradict the arrays")
    check_shard_layout(root, m, r, lambda pos: expected_files(m, pos),
                       ["shards"] if m.storage == "hdf5" else ["key/c", "sim/c", "attn/c"])
    (_hdf5_meta if m.storage == "hdf5" else _zarr_meta)(root, m, r)
    _check_index(root, m, r)
    return r


def require_structure(cache: str | Path) -> Report:
    """:func:`check_structure`, raising one :class:`CacheDamagedError` line when it finds problems (a
    missing directory or an unusable manifest raises its own error)."""
    r = check_structure(cache)
    if r.error is not None:
        raise r.error
    if r.problems:
        more = f" (+{len(r.problems) - SHOW} more)" if len(r.problems) > SHOW else ""
        raise CacheDamagedError(f"teacher cache {cache} is not what its manifest says: "
                                f"{'; '.join(r.problems[:SHOW])}{more}; run `medalign-cache verify {cache}`")
    return r


def check_file_checksums(cache: str | Path, m: Manifest,
                         progress: Callable[[int], None] | None = None) -> tuple[int, list[str]]:
    """Hash every file the manifest lists (inside the cache only): ``(files, problems)``."""
    return check_listed_files(cache, [(rel, d) for s in m.shards for rel, d in (s.get("files") or {}).items()],
                              progress)


def check_listed_files(cache: str | Path, listed: list[tuple[str, str]],
                       progress: Callable[[int], None] | None = None) -> tuple[int, list[str]]:
    """Hash each ``(relative path, sha256)`` (paths outside the cache are refused, not read):
    ``(files, problems)``."""
    root = Path(cache)
    problems = []
    for rel, digest in listed:
        if not inside(root, rel):
            problems.append(f"{rel}: not a path inside the cache (refused, not read)")
        elif not (root / rel).is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(root / rel) != digest:
            problems.append(f"{rel}: checksum mismatch")
        if progress is not None:
            progress(1)
    return len(listed), problems
