"""``medalign-cache build``: run an expert CLIP once over the datasets and write the teacher cache.

Plan (cheap, single process): read the dataset files, collect the unique image paths, hash each
file's bytes, dedupe by content, fix the row order. Then compute shard by shard: DataLoader
workers decode and preprocess images while the main process runs the expert; each finished shard
is committed atomically; the manifest is written last. Batches never straddle shards, so a
resumed build computes exactly the batches an uninterrupted one would, and its arrays are
identical. Under ``torchrun`` every rank plans the same rows and writes its round-robin share of
the shards (:mod:`shared.cache.parallel`); the arrays are those of a one-process build.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from shared.cache import CacheWriter, Manifest, normalise_rel
from shared.cache.encoding import encode_sim
from shared.cache.writer import DEFAULT_SHARD_SIZE
from shared.errors import BadImageError, MedAlignError
from shared.grid import check_resample_order, triangle_size
from shared.images import Preprocess, decode_image, read_image_bytes, resolve_image_path, sha256_bytes
from shared.records import load_records, record_image
from shared.runtime import resolve_device
from teacher_cache.experts import get_expert, load_expert, weights_sha256
from teacher_cache.signals import teacher_signals


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one cache build (the flags of ``medalign-cache build``)."""

    expert: str                      # registry name: unimed-l | unimed-b | biomedclip
    weights: Path                    # UniMed .pt checkpoint or BiomedCLIP directory
    data: tuple[Path, ...]           # LLaVA-style JSON files sharing this cache
    image_root: Path                 # dataset-relative image paths are resolved under this
    grid: int                        # student grid side G (N = G * G)
    out: Path                        # cache directory
    geometry: str = "pad"            # pad (the student's view) | crop (the reference's)
    resample_order: str | None = None  # norm-resample-norm | resample-norm; None: the expert's (its notebook's)
    storage: str = "zarr"            # zarr | hdf5
    sim_dtype: str = "float16"       # float16 | int8
    batch_size: int = 32             # images per expert forward
    num_workers: int = 2             # image-decoding worker processes (0 = in the main process)
    device: str = "cpu"              # auto | cpu | cuda | cuda:K (resolved: auto becomes cuda or cpu)
    resume: bool = False             # finish an interrupted build in --out
    skip_bad: bool = False           # record unreadable images in the manifest instead of stopping
    shard_size: int = DEFAULT_SHARD_SIZE
    model_config: Path | None = None  # open_clip model config JSON overriding the registry's (custom towers)
    progress: bool = True

    def __post_init__(self):
        if self.grid < 1:
            raise MedAlignError(f"--grid must be >= 1, got {self.grid}")
        if self.batch_size < 1:
            raise MedAlignError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise MedAlignError(f"--num-workers must be >= 0, got {self.num_workers}")
        object.__setattr__(self, "device", str(resolve_device(self.device)))  # auto -> cuda or cpu
        if not self.data:
            raise MedAlignError("give at least one --data file")
        if self.resample_order is None:
            object.__setattr__(self, "resample_order", get_expert(self.expert).resample_order)
        check_resample_order(self.resample_order, "--resample-order")


@dataclass
class Plan:
    """The rows of the cache: unique images in order of first appearance."""

    keys: list[str] = field(default_factory=list)            # sha256 per row
    paths: list[Path] = field(default_factory=list)          # one readable file per row
    index: dict[str, int] = field(default_factory=dict)      # dataset-relative path -> row
    failures: list[dict[str, str]] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)


def plan_rows(cfg: BuildConfig) -> Plan:
    """Read the datasets, hash every referenced image, dedupe by content."""
    plan = Plan()
    rels: dict[str, None] = {}
    for data in cfg.data:
        records = load_records(data)
        images = dict.fromkeys(normalise_rel(img) for r in records if (img := record_image(r)) is not None)
        plan.sources.append({"data": str(data), "records": len(records), "images": len(images)})
        rels.update(images)  # insertion order: first appearance across the files
    if not rels:
        raise MedAlignError("the --data files reference no images")
    key_row: dict[str, int] = {}
    for rel in tqdm(rels, desc="hashing images", unit="img", disable=not cfg.progress, leave=False):
        path = resolve_image_path(cfg.image_root, rel)  # escaping paths are refused even with --skip-bad
        try:
            key = sha256_bytes(read_image_bytes(path))
        except BadImageError as e:
            if not cfg.skip_bad:
                raise MedAlignError(f"{e} (referenced as {rel!r}; pass --skip-bad to record and skip it)") from None
            plan.failures.append({"path": rel, "reason": e.reason})
            continue
        if key not in key_row:
            key_row[key] = len(plan.keys)
            plan.keys.append(key)
            plan.paths.append(path)
        plan.index[rel] = key_row[key]
    if not plan.keys:
        raise MedAlignError("no readable images: every referenced image failed")
    return plan


class _ImageRows(Dataset):
    """Decodes and preprocesses the image of a row in a DataLoader worker."""

    def __init__(self, paths: list[Path], keys: list[str], preprocess: Preprocess):
        self.paths, self.keys, self.preprocess = paths, keys, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row: int):
        path = self.paths[row]
        try:
            data = read_image_bytes(path)
            if sha256_bytes(data) != self.keys[row]:
                raise BadImageError(path, "file changed since the build was planned")
            return row, torch.from_numpy(self.preprocess(decode_image(data, path))), None
        except BadImageError as e:
            return row, None, e.reason


def _collate(items):
    rows = [r for r, _, _ in items]
    pixels = [p for _, p, _ in items if p is not None]
    errors = {r: err for r, _, err in items if err is not None}
    return rows, (torch.stack(pixels) if pixels else None), errors


def read_model_config(path: Path | None) -> dict | None:
    """An open_clip model config (``{"embed_dim", "vision_cfg", ...}``) from a JSON file, or None."""
    if path is None:
        return None
    from shared.records import read_json
    cfg = read_json(path)
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg:
        raise MedAlignError(f"{path}: an open_clip model config needs a 'vision_cfg' object")
    return cfg


def _arch_name(spec, cfg: BuildConfig) -> str:
    arch = spec.arch or f"open_clip dir {cfg.weights}"
    return f"{arch} with config {cfg.model_config}" if cfg.model_config else arch


def layer_name(expert) -> str:
    return f"block {expert.layer} (last of {expert.num_layers}): patch tokens + CLS->patch attention, head mean"


def build_cache(cfg: BuildConfig, stats: dict | None = None) -> Manifest:
    """Build (or resume) the cache, holding ``--out``'s build lock throughout (one builder per cache);
    ``stats``, when given, receives the seconds of each phase.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this with the same settings: each plans
    the same rows, encodes its round-robin share of the pending shards on ``cuda:LOCAL_RANK`` (or the
    CPU), and rank 0 writes the manifest once every rank has finished (:mod:`shared.cache.parallel`).
    """
    from shared.cache.parallel import on_ranks

    return on_ranks(cfg, lambda c, dist: _build(c, dist, stats))


def _build(cfg: BuildConfig, dist, stats: dict | None) -> Manifest:
    import time

    from shared.cache.parallel import ShardedBuild

    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    spec = get_expert(cfg.expert)  # unknown names fail before any work
    plan = plan_rows(cfg)
    wsha = weights_sha256(cfg.weights)
    identity = {"expert": spec.name, "weights_sha256": wsha, "grid": cfg.grid, "geometry": cfg.geometry,
                "token_mode": spec.token_mode, "resample_order": cfg.resample_order}
    n = cfg.grid * cfg.grid
    held: dict = {}

    def open_writer(attach: bool) -> CacheWriter:
        return CacheWriter(cfg.out, identity=identity, keys=plan.keys, index=plan.index, num_tokens=n,
                           storage=cfg.storage, sim_dtype=cfg.sim_dtype, shard_size=cfg.shard_size,
                           resume=cfg.resume, attach=attach)

    def load() -> None:
        if "expert" not in held:
            held["expert"] = load_expert(cfg.expert, cfg.weights, device=cfg.device, geometry=cfg.geometry,
                                         model_cfg=read_model_config(cfg.model_config))

    def compute(writer: CacheWriter, owned: list[int], pending: list[int]) -> None:
        t1 = time.perf_counter()
        if owned:  # a rank with no shard of its own needs no expert
            load()
        t2 = time.perf_counter()
        _compute_shards(cfg, writer, held.get("expert"), plan, owned, dist,
                        total=sum(len(writer.shard_rows(s)) for s in pending))
        stats.update(plan_s=t1 - t0, load_s=t2 - t1, compute_s=time.perf_counter() - t2,
                     computed=sum(len(writer.shard_rows(s)) for s in pending))

    def finalize(writer: CacheWriter) -> Manifest:
        load()  # the manifest records the expert's preprocessing
        expert = held["expert"]
        return writer.finalize(
            expert=spec.name, arch=_arch_name(spec, cfg), weights_sha256=wsha, token_mode=spec.token_mode,
            preprocessing=expert.preprocess.to_json(), layer=layer_name(expert), patch_grid=expert.grid,
            grid=cfg.grid, resample_order=cfg.resample_order, sources=plan.sources)

    return ShardedBuild(cfg.out, open_writer=open_writer, pending=lambda w: w.pending_shards(), compute=compute,
                        finalize=finalize, reopen=lambda: Manifest.load(cfg.out)).run(dist)


class _ShardBuffer:
    """Rows of one shard as they arrive, already in the stored encoding."""

    def __init__(self, rows: range, tri: int, n: int, sim_dtype: str):
        self.rows = rows
        self.sim = np.zeros((len(rows), tri), dtype=sim_dtype)
        self.attn = np.zeros((len(rows), n), dtype=np.float32)
        self.filled = 0
        self.failures: list[dict[str, str]] = []
        self.failed: set[int] = set()


def _compute_shards(cfg: BuildConfig, writer: CacheWriter, expert, plan: Plan, pending: list[int], dist,
                    total: int) -> None:
    """Expert forward per batch on the device; finished shards are compressed and committed by a
    background thread (one writer, at most two shards in flight) while the next ones compute.
    ``pending``: this rank's shards; ``total``: the rows of the whole job (rank 0's bar)."""
    from shared.cache.parallel import job_progress, shard_batches
    from shared.distributed import maybe_die

    def commit(shard, sim, attn, failures, failed_rows):
        writer.write_shard(shard, sim, attn, failures=failures, failed_rows=failed_rows)
        maybe_die("shard", dist)

    dataset = _ImageRows(plan.paths, plan.keys, expert.preprocess if expert is not None else None)  # None: no shard here
    batches = shard_batches(writer, pending, cfg.batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, collate_fn=_collate,
                        pin_memory=cfg.device.startswith("cuda"), persistent_workers=False)
    n = writer.num_tokens
    upper = torch.ones(n, n, dtype=torch.bool, device=cfg.device).triu()  # row-major = np.triu_indices order
    tri_size = triangle_size(n)
    rel_of_row = {}
    for rel, row in plan.index.items():
        rel_of_row.setdefault(row, rel)
    # Planning failures (missing / empty files) are recorded with shard 0.
    plan_failures = list(plan.failures) if 0 in pending else []
    buffers: dict[int, _ShardBuffer] = {}
    in_flight: list[Future] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool, \
            job_progress(dist, f"the build of {cfg.out}", total=total, desc=f"{cfg.expert} -> {cfg.out.name}",
                         enabled=cfg.progress) as beat:
        try:
            for rows, pixels, errors in loader:
                beat.check()
                if errors and not cfg.skip_bad:
                    row, reason = next(iter(errors.items()))
                    raise MedAlignError(f"bad image {plan.paths[row]}: {reason} (nothing was written for its "
                                        "shard; pass --skip-bad to record and skip it)")
                shard = rows[0] // writer.shard_size
                buf = buffers.get(shard) or buffers.setdefault(
                    shard, _ShardBuffer(writer.shard_rows(shard), tri_size, n, writer.sim_dtype))
                good = [r for r in rows if r not in errors]
                if pixels is not None:
                    with torch.inference_mode():
                        e_v, e_a = expert.encode(pixels.to(cfg.device, non_blocking=True))
                        sim, attn = teacher_signals(e_v, e_a, cfg.grid, cfg.resample_order)
                        # encoded on the device: half the bytes to move, no CPU pass
                        tri = encode_sim(sim[:, upper], writer.sim_dtype)
                    local = [r - buf.rows.start for r in good]
                    buf.sim[local] = tri.cpu().numpy()
                    buf.attn[local] = attn.float().cpu().numpy()
                for r, reason in errors.items():
                    buf.failed.add(r)
                    buf.failures.append({"path": rel_of_row.get(r, str(plan.paths[r])), "reason": reason,
                                         "key": plan.keys[r]})
                buf.filled += len(rows)
                beat.add(len(rows))
                if buf.filled == len(buf.rows):
                    del buffers[shard]
                    failures = buf.failures + (plan_failures if shard == 0 else [])
                    while len(in_flight) >= 2:
                        in_flight.pop(0).result()
                    in_flight.append(pool.submit(commit, shard, buf.sim, buf.attn, failures, buf.failed))
            for fut in in_flight:
                fut.result()
        except BaseException:
            for fut in in_flight:
                fut.cancel()
            raise
