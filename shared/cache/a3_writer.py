"""Writing an A3Tune cache: a plan, image shards committed one at a time, the selection, the manifest last.

As :class:`shared.cache.writer.CacheWriter`: ``.progress/plan.json`` fixes the rows and the image
part's identity before any shard is written, each committed shard leaves
``.progress/shard-NNNNN.json``, and ``--resume`` computes only the shards without a marker. The
selection (per question top-k) is computed from the *stored* crop features once every shard is
in, so a build and a later re-selection read the same numbers.

Re-selection: ``--resume`` on a *finished* cache whose image part is the planned one (same rows,
SAM, BiomedCLIP, geometry, grid) but whose selection inputs differ (``--top-k``, the template, the
questions) recomputes only the selection: the new one is written to ``selection-<new id>`` beside
the old, then the manifest is replaced atomically (the switch), then the old selection is removed.
A kill before the switch leaves the old cache intact (plus an unreferenced selection that the next
build removes and ``verify`` notes); after it, the new one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from shared.cache.a3_manifest import IMAGE_IDENTITY_KEYS, A3Manifest, read_signals
from shared.cache.a3_storage import make_a3_storage
from shared.cache.lock import LOCK_NAME
from shared.cache.manifest import INDEX_NAME, MANIFEST_NAME, STORAGES
from shared.cache.storage import STAGING
from shared.cache.writer import PROGRESS, ShardMarkers, _version, join_plan, normalise_rel, unfinished_plan
from shared.errors import MedAlignError
from shared.fileio import atomic_write_json
from shared.images import sha256_file

DEFAULT_A3_SHARD_SIZE = 128


class A3Writer(ShardMarkers):
    """Creates, resumes or re-selects an A3 cache in ``out``.

    ``identity``: the :data:`IMAGE_IDENTITY_KEYS` of the planned build; ``keys`` the sha256 of each row's
    image; ``index`` every dataset-relative path -> row. After construction: :attr:`images_complete`
    (the image part is finished, only a selection may be missing) and :attr:`existing` (the finished
    cache's manifest, on ``--resume`` of one). ``attach=True``: join the build rank 0 of a torchrun job
    prepared (the plan on disk must be this one; nothing is set up), as :class:`~shared.cache.writer.CacheWriter`.
    """

    def __init__(self, out: str | Path, *, identity: dict[str, Any], keys: list[str], index: dict[str, int],
                 embed_dim: int, storage: str = "zarr", shard_size: int = DEFAULT_A3_SHARD_SIZE, resume: bool = False,
                 attach: bool = False):
        if storage not in STORAGES:
            raise MedAlignError(f"unknown storage format {storage!r}; choose one of {', '.join(STORAGES)}")
        if shard_size < 1:
            raise MedAlignError("shard size must be >= 1")
        missing = [k for k in IMAGE_IDENTITY_KEYS if k not in identity]
        if missing:
            raise ValueError(f"A3Writer identity lacks {missing}")
        self.out = Path(out)
        self.identity = json.loads(json.dumps(identity))
        self.keys, self.shard_size, self.embed_dim = list(keys), shard_size, embed_dim
        self.index = {normalise_rel(k): int(v) for k, v in index.items()}
        self.plan = {"identity": self.identity, "storage": storage, "shard_size": shard_size, "embed_dim": embed_dim,
                     "keys": self.keys, "index": self.index}
        grid, max_masks = int(identity["grid"]), int(identity["max_masks"])
        self.storage = make_a3_storage(storage, self.out, len(self.keys), shard_size, max_masks,
                                       -(-grid * grid // 8), embed_dim)
        self.existing: A3Manifest | None = None
        self.images_complete = False
        if attach:  # a rank > 0 of a torchrun build: rank 0 prepared --out (shared.cache.parallel)
            join_plan(self.out, self.plan)
        else:
            self._prepare(resume)

    # -- set-up -----------------------------------------------------------------------------------
    def _prepare(self, resume: bool) -> None:
        progress = self.out / PROGRESS
        if (self.out / MANIFEST_NAME).is_file():
            if read_signals(self.out) != "a3tune":
                raise MedAlignError(f"--out {self.out} already holds a MedAlign cache; choose another --out")
            existing = A3Manifest.load(self.out)
            theirs = existing.image_identity()
            diff = [f"{k}: existing {theirs.get(k)!r} vs requested {self.identity.get(k)!r}"
                    for k in IMAGE_IDENTITY_KEYS if theirs.get(k) != self.identity.get(k)]
            if diff:
                raise MedAlignError(f"--out {self.out} already holds a different A3 cache ({'; '.join(diff)}); "
                                    "refusing to overwrite it. Choose another --out.")
            if not resume:
                raise MedAlignError(f"--out {self.out} already holds a finished A3 cache; pass --resume to reuse it "
                                    "(a new --top-k or --query-template then recomputes only the selection)")
            other = [f"{flag} {want!r} (the cache holds {have!r})" for flag, have, want in (
                ("--format", existing.storage, self.plan["storage"]),
                ("--shard-size", existing.shard_size, self.shard_size))
                if have != want]
            if other:
                raise MedAlignError(f"--resume into the finished cache {self.out} with other settings: "
                                    f"{', '.join(other)}; use its settings, or build into another --out")
            self._check_same_images()
            self.existing, self.images_complete = existing, True
            return
        if progress.is_dir():
            old = unfinished_plan(self.out, resume)
            if old is not None and old != self.plan:
                changed = [k for k in self.plan if old.get(k) != self.plan[k]]
                raise MedAlignError(f"--resume: the unfinished build in {self.out} was started with different "
                                    f"settings or inputs (differs in: {', '.join(changed)}); use a new --out")
        elif self.out.exists() and any(p.name != LOCK_NAME for p in self.out.iterdir()):
            raise MedAlignError(f"--out {self.out} exists and is not empty (and is not a cache); refusing to write "
                                "into it")
        progress.mkdir(parents=True, exist_ok=True)
        atomic_write_json(progress / "plan.json", self.plan)
        self.storage.create()
        self.images_complete = not self.pending_shards()

    def _check_same_images(self) -> None:
        from shared.cache.a3tune import open_a3_cache

        reader = open_a3_cache(self.out)
        try:
            stored = reader.keys()
            index = reader.index
        finally:
            reader.close()
        if len(stored) != len(self.keys) or any(index.get(rel) != row for rel, row in self.index.items()):
            raise MedAlignError(f"--resume: {self.out} holds an A3 cache of other images; build into a new --out")
        changed = sorted(rel for rel, row in self.index.items() if stored[row] and stored[row] != self.keys[row])
        if changed:
            raise MedAlignError(f"--resume: {len(changed)} image(s) changed since {self.out} was built: "
                                f"{', '.join(changed[:5])}; build into a new --out")

    # -- image shards -----------------------------------------------------------------------------
    def _finished(self) -> bool:
        return self.existing is not None

    def write_shard(self, shard: int, counts: np.ndarray, masks: np.ndarray, emb: np.ndarray,
                    failures: list[dict[str, str]] | None = None, failed_rows: set[int] | None = None) -> None:
        """Commit one shard: ``counts`` (rows,), ``masks`` (rows, max_masks * mask_bytes) uint8 packed,
        ``emb`` (rows, max_masks * embed_dim) float32."""
        rows = self.shard_rows(shard)
        st = self.storage
        if masks.shape != (len(rows), st.mask_width) or emb.shape != (len(rows), st.emb_width) or \
                counts.shape != (len(rows),):
            raise ValueError(f"shard {shard}: got counts {counts.shape}, masks {masks.shape}, emb {emb.shape} "
                             f"for {len(rows)} rows")
        keys = [("" if failed_rows and r in failed_rows else self.keys[r]) for r in rows]
        files = st.write_shard(shard, rows.start, keys, np.asarray(counts), np.asarray(masks, np.uint8),
                               np.asarray(emb, np.float32))
        self._commit_marker(shard, files, failures)

    def _committed(self) -> tuple[list[dict], list[dict]]:
        if self.existing is not None:
            return self.existing.shards, self.existing.failures
        pending = self.pending_shards()
        if pending:
            raise RuntimeError(f"shards {pending[:5]} not written")
        shards, failures = [], []
        for s in range(self.num_shards):
            m = json.loads(self._marker(s).read_text())
            failures.extend(m.pop("failures", []))
            shards.append(m)
        return shards, failures

    def failed_keys(self) -> set[str]:
        return {f["key"] for f in self._committed()[1] if f.get("key")}

    def image_rows(self):
        """A reader of the committed rows (``read(row, with_emb)``), for the selection."""
        return self.storage.open_rows()

    # -- selection and finish ---------------------------------------------------------------------
    def finish(self, *, selection: dict[str, Any], arrays: dict[str, np.ndarray], sam: dict, biomedclip: dict,
               sources: list[dict] | None = None) -> A3Manifest:
        """Write the selection (``selection`` = its description, ``arrays`` = its columns), then index.json and
        the manifest (atomically, last), then drop the progress files and any other selection."""
        shards, failures = self._committed()
        old = self.existing
        if old is not None and old.selection.get("name") == selection["name"]:
            return old  # nothing changed
        files = self.storage.write_selection(selection["name"], arrays)
        selection = {**selection, "files": files}
        if old is not None:
            manifest = dataclasses.replace(old, selection=selection, checksum="",
                                           created=_now(), tool_version=_version()).sealed()
        else:
            failed = self.failed_keys()
            index = {p: r for p, r in self.index.items() if self.keys[r] not in failed}
            atomic_write_json(self.out / INDEX_NAME, index)
            ident = self.identity
            manifest = A3Manifest(
                sam=sam, biomedclip=biomedclip, geometry=ident["geometry"], background=list(ident["background"]),
                view_size=int(ident["view_size"]), grid=int(ident["grid"]), max_masks=int(ident["max_masks"]),
                embed_dim=self.embed_dim, storage=self.storage.name, rows=len(self.keys), shard_size=self.shard_size,
                shards=shards, selection=selection, compression=self.storage.compression, failures=failures,
                sources=sources or [], created=_now(), tool_version=_version(),
                index_sha256=sha256_file(self.out / INDEX_NAME)).sealed()
        atomic_write_json(self.out / MANIFEST_NAME, manifest.to_json())  # the switch
        self.existing = manifest
        remove_stale_selections(self.out, manifest)
        shutil.rmtree(self.out / PROGRESS, ignore_errors=True)
        shutil.rmtree(self.out / STAGING, ignore_errors=True)
        return manifest


def stale_selections(out: Path, manifest: A3Manifest | None) -> list[Path]:
    """``selection-*`` directories / files the manifest does not reference (left by an interrupted re-selection)."""
    keep = (manifest.selection.get("name") if manifest else None)
    return [p for p in sorted(Path(out).glob("selection-*")) if p.name.removesuffix(".h5") != keep]


def remove_stale_selections(out: Path, manifest: A3Manifest | None) -> None:
    for p in stale_selections(out, manifest):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


__all__ = ["A3Writer", "DEFAULT_A3_SHARD_SIZE", "remove_stale_selections", "stale_selections"]
