"""Writing the checked plan as safetensors shards, streamed: each source file is read once, in order,
and each shard is written and dropped as soon as its last tensor arrives.

Shard boundaries, file names (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``) and the index's ``total_size`` come from
``huggingface_hub.split_torch_state_dict_into_shards``, run on meta tensors of the output shapes and
dtypes. ``huggingface_hub.save_torch_state_dict`` itself is not used: it needs the whole state dict
in memory at once (about 15 GB for a 7B model in bf16), where this writer holds one shard at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.errors import MedAlignError
from student_train.convert.plan import RESIZABLE, Planned
from student_train.convert.weights import WeightSource

INDEX_NAME = "model.safetensors.index.json"


def write_shards(planned: dict[str, Planned], expected: dict[str, tuple[int, ...]], target: torch.dtype,
                 vocab_after: int, max_shard_bytes: int, dst: Path) -> list[str]:
    """Stream tensors source file by source file into safetensors shards of at most ``max_shard_bytes``
    (a tensor larger than that gets a shard of its own); returns the file names written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    # Source order, so every source file is read once and the shards fill one after another.
    order: list[tuple[WeightSource, Path, list[Planned]]] = []
    groups: dict[tuple[int, Path], list[Planned]] = {}
    for p in planned.values():
        key = (id(p.source), p.source.key_file[p.src_key])
        if key not in groups:
            groups[key] = []
            order.append((p.source, key[1], groups[key]))
        groups[key].append(p)
    with torch.device("meta"):
        outline = {p.dst_key: torch.empty(expected[p.dst_key], dtype=_out_dtype(p, target))
                   for _, _, group in order for p in group}
    split = split_torch_state_dict_into_shards(outline, max_shard_size=max_shard_bytes)
    del outline

    buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in split.filename_to_tensors}
    remaining = {name: len(keys) for name, keys in split.filename_to_tensors.items()}
    for source, f, group in order:
        by_src = {p.src_key: p for p in group}
        for src_key, t in source.tensors(f, set(by_src)):
            p = by_src[src_key]
            t = t.to(target) if t.is_floating_point() else t
            if p.dst_key in RESIZABLE:
                t = _resize_rows(t, vocab_after)
            name = split.tensor_to_filename[p.dst_key]
            buffers[name][p.dst_key] = t.contiguous().clone()
            remaining[name] -= 1
            if remaining[name] == 0:
                save_file(buffers[name], str(dst / name), metadata={"format": "pt"})
                buffers[name] = {}
    if any(remaining.values()):
        raise MedAlignError("internal error: some planned tensors were not found while writing")
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return list(split.filename_to_tensors)


def _out_dtype(p: Planned, target: torch.dtype) -> torch.dtype:
    """What a planned tensor is written as: ``target`` for floating point, its own dtype otherwise."""
    dtype = p.source.dtypes[p.src_key]
    return target if dtype.is_floating_point else dtype


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean of the existing rows (computed in fp32)."""
    extra = rows - t.shape[0]
    if extra <= 0:
        return t
    mean = t.float().mean(dim=0, keepdim=True).to(t.dtype)
    return torch.cat([t, mean.expand(extra, -1)], dim=0)
