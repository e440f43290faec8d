"""Whether an A3Tune cache is what its manifest claims: structure, file checksums, every row read back.

The A3 counterpart of :mod:`shared.cache.check` (whose :class:`Report` and path checks it reuses):
:func:`check_a3_structure` is cheap (no chunk read): the manifest (its checksum on load), the shard
list against ``rows`` and ``shard_size``, each shard's files (expected names, inside the cache,
present), no unlisted chunk file, the stored arrays' shapes and dtypes, the selection's files,
``index.json`` against its digest; :func:`check_a3_files` hashes every listed file;
:func:`read_every_row` reads every image row (crop features included) and every question through
the checked reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from shared.cache.a3_manifest import A3Manifest
from shared.cache.a3_storage import make_a3_storage
from shared.cache.check import Report, check_listed_files, check_shard_layout, inside
from shared.cache.manifest import INDEX_NAME
from shared.errors import CacheDamagedError, MedAlignError
from shared.images import sha256_file


def _zarr_meta(root: Path, m: A3Manifest, r: Report) -> None:
    want = {"masks": ([m.rows, m.max_masks * m.mask_bytes], "uint8"), "emb": ([m.rows, m.max_masks * m.embed_dim],
                                                                              "float32"),
            "count": ([m.rows], "int16"), "key": ([m.rows], "string")}
    for name, (shape, dtype) in want.items():
        try:
            meta = json.loads((root / name / "zarr.json").read_text())
        except (OSError, ValueError) as e:
            r.problems.append(f"{name}/zarr.json: missing or unreadable ({type(e).__name__})")
            continue
        if meta.get("shape") != shape or meta.get("data_type") != dtype:
            r.problems.append(f"{name}/zarr.json: shape {meta.get('shape')} dtype {meta.get('data_type')}; the manifest "
                              f"implies {shape} {dtype}")


def check_a3_structure(cache: str | Path) -> Report:
    """The structural checks (module docstring). Never raises for a damaged cache: it reports."""
    root = Path(cache)
    r = Report()
    try:
        m = A3Manifest.load(root)
    except MedAlignError as e:
        r.error = e
        r.problems.append(str(e))
        return r
    r.manifest = m  # type: ignore[assignment]
    store = make_a3_storage(m.storage, root, m.rows, m.shard_size, m.max_masks, m.mask_bytes, m.embed_dim)
    check_shard_layout(root, m, r, store.shard_files,
                       ["shards"] if m.storage == "hdf5" else ["key/c", "count/c", "masks/c", "emb/c"])
    if m.storage == "zarr":
        _zarr_meta(root, m, r)
    sel = m.selection
    sel_files = sel.get("files") if isinstance(sel.get("files"), dict) else {}
    if not sel_files:
        r.problems.append("manifest: the selection lists no files")
    for f in sorted(sel_files):
        if not inside(root, f) or not str(f).startswith(str(sel.get("name"))):
            r.problems.append(f"selection: file {f!r} is not inside its selection {sel.get('name')!r} (refused)")
        elif not (root / f).is_file():
            r.problems.append(f"{f}: missing")
    from shared.cache.a3_writer import stale_selections

    for p in stale_selections(root, m):
        r.notes.append(f"{p.name} is a selection the manifest does not reference (left by an interrupted "
                       "re-selection; the next build removes it)")
    index = root / INDEX_NAME
    if not index.is_file():
        r.problems.append(f"{INDEX_NAME}: missing")
    elif m.index_sha256 and sha256_file(index) != m.index_sha256:
        r.problems.append(f"{INDEX_NAME}: its sha256 is not the one the manifest recorded (edited or damaged)")
    return r


def check_a3_files(cache: str | Path, m: A3Manifest,
                   progress: Callable[[int], None] | None = None) -> tuple[int, list[str]]:
    """Hash every file the manifest lists (shards and selection): ``(files, problems)``."""
    listed = [(rel, d) for s in m.shards for rel, d in (s.get("files") or {}).items()]
    return check_listed_files(cache, listed + list((m.selection.get("files") or {}).items()), progress)


def read_every_row(cache: str | Path, progress: Callable[[int], None] | None = None) -> tuple[int, int, list[str]]:
    """Read every image row (masks and crop features) and every question through the checked reader:
    ``(image rows read, questions read, problems)``."""
    from shared.cache.a3tune import open_a3_cache

    reader = open_a3_cache(cache)
    problems: list[str] = []
    try:
        keys = reader.keys()
        for row, key in enumerate(keys):
            if key:
                try:
                    reader.read_image(row, with_emb=True)
                except CacheDamagedError as e:
                    problems.append(str(e))
            if progress is not None:
                progress(1)
        qkeys = reader.question_keys()
        for q in qkeys:
            try:
                reader.entry(q)
            except CacheDamagedError as e:
                problems.append(str(e))
            if progress is not None:
                progress(1)
    except CacheDamagedError as e:
        problems.append(str(e))
        return 0, 0, problems
    finally:
        reader.close()
    return len(keys), len(qkeys), problems


__all__ = ["check_a3_files", "check_a3_structure", "read_every_row"]
