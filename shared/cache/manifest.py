"""The cache's ``manifest.json``: provenance, encodings and shard checksums, as a frozen dataclass.

The manifest is the contract between ``medalign-cache build`` and every reader. It is written last
and atomically, so a directory without one is an unfinished build. Reading checks the format
version and rejects unknown keys (a newer writer's cache is refused, not misread).

``resample_order`` (docs/design.md 1, "Resampling") was added within format version 1: a manifest
without it was written before the setting existed, when features were always resampled raw, so
it reads as ``resample-norm`` (see :data:`shared.grid.LEGACY_RESAMPLE_ORDER`). Those caches stay
readable; a build or ``--resume`` with the other order refuses to mix into them.

``checksum`` and ``index_sha256`` were added the same way: ``checksum`` is the sha256 of the
manifest's own canonical JSON (every other key, sorted, compact), so an edited or damaged manifest
is refused on load; ``index_sha256`` is the sha256 of ``index.json``'s bytes. A manifest without them
was written before they existed and is read unchecked (``medalign-cache verify`` says so).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import CacheDamagedError, MedAlignError
from shared.records import read_json
from shared.cache.encoding import check_sim_dtype
from shared.grid import LEGACY_RESAMPLE_ORDER, check_resample_order, triangle_size

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.json"
STORAGES = ("zarr", "hdf5")
#: What makes two caches interchangeable for a student: :meth:`Manifest.identity` is these fields.
IDENTITY_KEYS = ("expert", "weights_sha256", "grid", "geometry", "token_mode", "patch_grid", "resample_order",
                 "sim_dtype")
#: The part of the identity a build fixes before its expert runs, which another build into the same
#: ``--out`` must share: all of it but ``patch_grid`` (known once the expert is loaded) and
#: ``sim_dtype`` (the writer's own setting, recorded in its plan).
BUILD_IDENTITY_KEYS = tuple(k for k in IDENTITY_KEYS if k not in ("patch_grid", "sim_dtype"))
_ORDER_WORDS = {"norm-resample-norm": "L2-normalise, resample, L2-normalise again",
                "resample-norm": "raw tokens resampled, then L2-normalised"}


def canonical_sha256(data: dict[str, Any]) -> str:
    """sha256 of a manifest dict's canonical JSON (keys sorted, compact, UTF-8), ``checksum`` left out."""
    body = {k: v for k, v in data.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to trust and decode a cache.

    Arrays (one row per unique image, rows grouped into shards of ``shard_size``):
    ``key`` sha256 hex of the image bytes ("" for a row whose image failed with --skip-bad);
    ``sim`` packed upper triangle of the N x N similarity matrix (``np.triu_indices(N)`` order),
    float16, or int8 holding round(127 * s) (:mod:`shared.cache.encoding`); ``attn`` the N-vector E_a, float32.
    """

    expert: str                      # registry name, e.g. "unimed-l"
    arch: str                        # open_clip architecture of the image tower
    weights_sha256: str              # sha256 of the expert weights file
    token_mode: str                  # raw | norm | proj: how E_v was taken from the last block
    preprocessing: dict[str, Any]    # image_size, mean, std, geometry, interpolation
    layer: str                       # which block the signals come from
    patch_grid: int                  # g: the expert's own patch grid side
    grid: int                        # G: the student's grid side the signals were resampled to
    resample_order: str              # norm-resample-norm | resample-norm: how E_v went from g to G
    storage: str                     # zarr | hdf5
    sim_dtype: str                   # float16 | int8
    rows: int                        # number of rows (unique images)
    shard_size: int                  # rows per shard (the last shard may be shorter)
    shards: list[dict[str, Any]]     # [{"index", "start", "stop", "files": {relpath: sha256}}]
    compression: str = ""            # codec of sim/attn chunks, e.g. "blosc zstd level 3, byte shuffle"
    failures: list[dict[str, str]] = field(default_factory=list)  # [{"path", "reason"}] (--skip-bad)
    sources: list[dict[str, Any]] = field(default_factory=list)   # [{"data", "records", "images"}]
    created: str = ""
    tool_version: str = ""
    index_sha256: str = ""           # sha256 of index.json ("" in manifests written before it was recorded)
    checksum: str = ""               # sha256 of this manifest's canonical JSON without this key (:meth:`sealed`)
    format_version: int = field(default=FORMAT_VERSION, init=False)

    def __post_init__(self):
        if self.storage not in STORAGES:
            raise MedAlignError(f"manifest: unknown storage {self.storage!r}; expected one of {STORAGES}")
        check_sim_dtype(self.sim_dtype, "manifest: sim dtype")
        if self.grid <= 0 or self.patch_grid <= 0:
            raise MedAlignError("manifest: grid sizes must be positive")
        check_resample_order(self.resample_order, "manifest resample_order")

    @property
    def num_tokens(self) -> int:
        """N = G * G, the number of student visual tokens (rows/columns of S_e)."""
        return self.grid * self.grid

    @property
    def geometry(self) -> str:
        return str(self.preprocessing.get("geometry", ""))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sealed(self) -> "Manifest":
        """A copy whose ``checksum`` covers every other key (what :meth:`CacheWriter.finalize` writes)."""
        return dataclasses.replace(self, checksum=canonical_sha256(self.to_json()))

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(data, dict):
            raise MedAlignError(f"{source}: expected a JSON object")
        version = data.get("format_version")
        if data.get("signals") == "a3tune":
            raise MedAlignError(f"{source}: an A3Tune cache (signals a3tune: SAM masks per question), not MedAlign "
                                "teacher signals; use it with --method a3tune")
        if data.get("checksum") and canonical_sha256(data) != data["checksum"]:
            raise CacheDamagedError(
                f"{source}: the manifest's checksum does not match its contents (edited or damaged since the "
                "build); run `medalign-cache verify` on the cache, rebuild it if it fails")
        if version != FORMAT_VERSION:
            raise MedAlignError(
                f"{source}: cache format version {version!r} is not supported (this tool reads version "
                f"{FORMAT_VERSION}); rebuild the cache or use a matching medalign version")
        if "resample_order" not in data:  # written before the setting existed: raw tokens resampled
            data = {**data, "resample_order": LEGACY_RESAMPLE_ORDER}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MedAlignError(f"{source}: unknown manifest keys {unknown}; written by a newer tool?")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.init and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING and f.name not in data)
        if missing:
            raise MedAlignError(f"{source}: manifest lacks required keys {missing}")
        kwargs = {k: v for k, v in data.items() if k != "format_version"}
        return cls(**kwargs)

    @classmethod
    def load(cls, cache_dir: str | Path) -> "Manifest":
        path = Path(cache_dir) / MANIFEST_NAME
        if not path.is_file():
            hint = " (an unfinished build: rerun `medalign-cache build ... --resume`)" if (
                Path(cache_dir) / ".progress").is_dir() else ""
            raise MedAlignError(f"{cache_dir}: not a MedAlign cache, no {MANIFEST_NAME}{hint}")
        return cls.from_json(read_json(path), str(path))

    def identity(self) -> dict[str, Any]:
        """What makes two caches interchangeable for a student (:data:`IDENTITY_KEYS`): expert, weights,
        geometry, grid, tokens, patch grid, resample order, encoding. A copy of the cache elsewhere has
        the same identity; :meth:`CacheReader.identity` adds where this copy is."""
        return {key: getattr(self, key) for key in IDENTITY_KEYS}

    @property
    def resampled(self) -> bool:
        """Whether the features were resampled at all (g != G); the resample order matters only then."""
        return self.patch_grid != self.grid

    def describe(self) -> str:
        pp = self.preprocessing
        lines = [
            f"expert        {self.expert} ({self.arch}, token mode {self.token_mode}, {self.layer})",
            f"weights       sha256 {self.weights_sha256[:16]}...",
            f"preprocessing {pp.get('image_size')}px, geometry {self.geometry}, {pp.get('interpolation')}, "
            f"mean {pp.get('mean')}, std {pp.get('std')}",
            f"grid          expert {self.patch_grid}x{self.patch_grid} -> student {self.grid}x{self.grid} "
            f"(N = {self.num_tokens})",
            f"resampling    bilinear, features {self.resample_order} ({_ORDER_WORDS[self.resample_order]})"
            + ("" if self.resampled else " (no effect: the grids match, nothing was resampled)"),
            f"encoding      sim {self.sim_dtype} packed triangle ({triangle_size(self.num_tokens)} "
            f"values/row), attn float32, storage {self.storage}, {self.compression or 'compression not recorded'}",
            f"rows          {self.rows} in {len(self.shards)} shard(s) of up to {self.shard_size}",
            f"failures      {len(self.failures)}",
            f"integrity     manifest checksum {'recorded' if self.checksum else 'none (an older cache)'}, index.json "
            f"digest {'recorded' if self.index_sha256 else 'none'}; `medalign-cache verify` checks everything",
            f"created       {self.created} by medalign {self.tool_version} (format v{self.format_version})",
        ]
        for s in self.sources:
            lines.append(f"source        {s.get('data')}: {s.get('records')} records, {s.get('images')} images")
        return "\n".join(lines)
