"""The A3Tune cache's ``manifest.json``: provenance of SAM and BiomedCLIP, every setting, checksums.

Same discipline as the MedAlign manifest (:mod:`shared.cache.manifest`): a frozen dataclass, a
format version and ``signals: "a3tune"`` callers cannot set, unknown keys rejected, ``checksum``
(sha256 of the canonical JSON of every other key) checked on load, ``index_sha256`` of
``index.json``, per-shard file lists with sha256, written last and atomically.

Two parts with their own inputs (docs: README "A3Tune cache"):

- the **image part** (``rows`` unique images in ``shards``): masks and crop embeddings, fixed by
  SAM (``sam``), BiomedCLIP's image tower (``biomedclip``), ``geometry``, ``background``, ``grid``;
- the **selection** (``selection``): per question the top-k masks, fixed by the query template,
  ``top_k``, the questions and BiomedCLIP's text tower. It lives in its own directory / file
  (``selection["name"]``), so a new k or template rewrites only it (and the manifest).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.cache.manifest import INDEX_NAME, MANIFEST_NAME, STORAGES, canonical_sha256
from shared.errors import CacheDamagedError, MedAlignError

A3_FORMAT_VERSION = 1
SIGNALS = "a3tune"
GEOMETRIES = ("pad", "stretch")
#: what a run trained from the cache depends on (plus the selection's identity)
IMAGE_IDENTITY_KEYS = ("sam", "biomedclip", "geometry", "background", "grid", "view_size", "max_masks")


def read_signals(cache_dir: str | Path) -> str | None:
    """The manifest's ``signals`` (None for a MedAlign cache or an unreadable / missing manifest)."""
    try:
        data = json.loads((Path(cache_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("signals") if isinstance(data, dict) else None


@dataclass(frozen=True)
class A3Manifest:
    """Everything a reader needs to trust and decode an A3Tune cache.

    Image arrays (one row per unique image, content-hash keyed, rows grouped into shards):
    ``key`` sha256 hex of the image bytes ("" for a failed row), ``count`` int16 masks kept,
    ``masks`` uint8 (rows, max_masks * mask_bytes): mask j of a row is bytes
    [j * mask_bytes, (j + 1) * mask_bytes), ``np.packbits`` (big bit order) of its G x G cells,
    row-major; ``emb`` float32 (rows, max_masks * embed_dim): the L2-normalised crop features, mask
    order; slots from ``count`` on are zero. Selection arrays (one row per question):
    ``qkey`` (str), ``image_row`` int32, ``query_sha`` (sha256 of the query text), ``top_idx`` int16
    (Q, top_k), -1 padded, best first; ``top_score`` float32 (Q, top_k) cosines, 0 padded.
    """

    sam: dict[str, Any]              # {"sha256", "arch", "settings"}
    biomedclip: dict[str, Any]       # {"dir_sha256", "embed_dim", "context_length", "preprocessing"}
    geometry: str                    # pad | stretch
    background: list[int]            # pad colour of the student's view (unused by stretch)
    view_size: int                   # SAM's input side (256)
    grid: int                        # G: the student's grid side
    max_masks: int                   # mask slots per image (the generator's upper bound for the settings)
    embed_dim: int                   # D of the crop features
    storage: str                     # zarr | hdf5
    rows: int
    shard_size: int
    shards: list[dict[str, Any]]     # [{"index", "start", "stop", "files": {relpath: sha256}}]
    selection: dict[str, Any]        # {"name", "template", "top_k", "questions", "texts", "files"}
    compression: str = ""
    failures: list[dict[str, str]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""
    tool_version: str = ""
    index_sha256: str = ""
    checksum: str = ""
    signals: str = field(default=SIGNALS, init=False)
    format_version: int = field(default=A3_FORMAT_VERSION, init=False)

    def __post_init__(self):
        if self.storage not in STORAGES:
            raise MedAlignError(f"manifest: unknown storage {self.storage!r}; expected one of {STORAGES}")
        if self.geometry not in GEOMETRIES:
            raise MedAlignError(f"manifest: unknown geometry {self.geometry!r}; expected one of {GEOMETRIES}")
        if self.grid <= 0 or self.max_masks <= 0 or self.embed_dim <= 0:
            raise MedAlignError("manifest: grid, max_masks and embed_dim must be positive")

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def mask_bytes(self) -> int:
        """Bytes of one bit-packed G x G mask."""
        return -(-self.num_tokens // 8)

    @property
    def top_k(self) -> int:
        return int(self.selection["top_k"])

    @property
    def template(self) -> str:
        return str(self.selection["template"])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sealed(self) -> "A3Manifest":
        return dataclasses.replace(self, checksum=canonical_sha256(self.to_json()))

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = MANIFEST_NAME) -> "A3Manifest":
        if not isinstance(data, dict):
            raise MedAlignError(f"{source}: expected a JSON object")
        if data.get("signals") != SIGNALS:
            raise MedAlignError(f"{source}: not an A3Tune cache (signals {data.get('signals')!r}); a MedAlign cache is "
                                "used with --method medalign")
        if data.get("checksum") and canonical_sha256(data) != data["checksum"]:
            raise CacheDamagedError(f"{source}: the manifest's checksum does not match its contents (edited or damaged "
                                    "since the build); run `medalign-cache verify` on the cache, rebuild it if it fails")
        if data.get("format_version") != A3_FORMAT_VERSION:
            raise MedAlignError(f"{source}: A3Tune cache format version {data.get('format_version')!r} is not supported "
                                f"(this tool reads {A3_FORMAT_VERSION}); rebuild the cache")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MedAlignError(f"{source}: unknown manifest keys {unknown}; written by a newer tool?")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING and f.name not in data)
        if missing:
            raise MedAlignError(f"{source}: manifest lacks required keys {missing}")
        return cls(**{k: v for k, v in data.items() if k not in ("format_version", "signals")})

    @classmethod
    def load(cls, cache_dir: str | Path) -> "A3Manifest":
        from shared.records import read_json

        path = Path(cache_dir) / MANIFEST_NAME
        if not path.is_file():
            hint = " (an unfinished build: rerun `medalign-cache build ... --resume`)" if (
                Path(cache_dir) / ".progress").is_dir() else ""
            raise MedAlignError(f"{cache_dir}: not a cache, no {MANIFEST_NAME}{hint}")
        return cls.from_json(read_json(path), str(path))

    def image_identity(self) -> dict[str, Any]:
        """The image part's inputs (:data:`IMAGE_IDENTITY_KEYS`); of the models only what a build knows before
        loading them: SAM's file digest and settings, BiomedCLIP's directory digest."""
        out = {k: getattr(self, k) for k in IMAGE_IDENTITY_KEYS}
        out["sam"] = {k: self.sam.get(k) for k in ("sha256", "settings")}
        out["biomedclip"] = {"dir_sha256": self.biomedclip.get("dir_sha256")}
        return out

    def identity(self) -> dict[str, Any]:
        """What makes two A3 caches interchangeable for a student run: the image part's inputs and the
        selection's (template, k, its name = digest of its inputs)."""
        sel = {k: self.selection.get(k) for k in ("name", "template", "top_k", "questions")}
        return {"signals": SIGNALS, **self.image_identity(), "selection": sel}

    def describe(self) -> str:
        s, b, sel = self.sam, self.biomedclip, self.selection
        return "\n".join([
            f"signals       a3tune (SAM weak masks ranked by BiomedCLIP per question)",
            f"SAM           {s.get('arch')} sha256 {str(s.get('sha256'))[:16]}..., settings {s.get('settings')}",
            f"BiomedCLIP    dir sha256 {str(b.get('dir_sha256'))[:16]}..., {self.embed_dim}-d features",
            f"geometry      {self.geometry} (SAM view {self.view_size}x{self.view_size}"
            + (f", pad colour {tuple(self.background)})" if self.geometry == "pad" else ", BGR as the authors')"),
            f"grid          {self.grid}x{self.grid} (N = {self.num_tokens}); masks bit-packed, {self.mask_bytes} "
            f"bytes each, up to {self.max_masks} per image",
            f"selection     template {sel.get('template')!r}, top-{sel.get('top_k')}, {sel.get('questions')} questions, "
            f"{sel.get('texts')} distinct query texts ({sel.get('name')})",
            f"storage       {self.storage}, {self.compression}",
            f"rows          {self.rows} images in {len(self.shards)} shard(s) of up to {self.shard_size}",
            f"failures      {len(self.failures)}",
            f"integrity     manifest checksum {'recorded' if self.checksum else 'none'}, {INDEX_NAME} digest "
            f"{'recorded' if self.index_sha256 else 'none'}; `medalign-cache verify` checks everything",
            f"created       {self.created} by medalign {self.tool_version} (A3 format v{self.format_version})",
            *(f"source        {x.get('data')}: {x.get('records')} records, {x.get('images')} images"
              for x in self.sources),
        ])


__all__ = ["A3Manifest", "A3_FORMAT_VERSION", "GEOMETRIES", "IMAGE_IDENTITY_KEYS", "SIGNALS", "read_signals"]
