"""Planning a conversion: every source tensor's new name, and the check that the plan covers the
target model exactly, name by name and shape by shape, before anything is written.

Original LLaVA names -> transformers 5 names (the layout is described in
:mod:`student_train.convert.original_llava`); the vision tower comes from the checkpoint, the
config's ``mm_vision_tower`` folder or ``--vision-tower`` (:func:`find_vision_tower`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import MedAlignError
from student_train.convert.weights import WeightSource

if TYPE_CHECKING:
    from student_train.convert.original_llava import SourceLayout

#: Buffers some checkpoints carry that the target model does not keep.
DROPPABLE_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")
CLIP_VISION_PREFIXES = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
SRC_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
#: Target tensors whose vocabulary rows may grow when ``<image>`` needs a new row.
RESIZABLE = frozenset({"model.language_model.embed_tokens.weight", "lm_head.weight"})


def map_original_key(key: str) -> str | None:
    """Original LLaVA name -> transformers 5 name (None: not a weight of the layout)."""
    if key.startswith(SRC_VISION_PREFIX):
        return "model.vision_tower." + key[len(SRC_VISION_PREFIX):]
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        index, _, param = rest.partition(".")
        linear = {"0": "linear_1", "2": "linear_2"}.get(index)
        return None if linear is None else f"model.multi_modal_projector.{linear}.{param}"
    if key.startswith("model.vision_tower."):
        return None
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("lm_head."):
        return key
    return None


def map_clip_key(key: str) -> str | None:
    """A CLIP folder's vision weight -> transformers 5 name (None: text tower, projections...)."""
    if key.startswith("vision_model."):
        return "model.vision_tower." + key[len("vision_model."):]
    if key.startswith(CLIP_VISION_PREFIXES):
        return "model.vision_tower." + key
    return None


@dataclass
class Planned:
    """One tensor to write: ``src_key`` of ``source``, renamed ``dst_key``."""

    source: WeightSource
    src_key: str
    dst_key: str


@dataclass(frozen=True)
class VisionTower:
    """Where the CLIP tower comes from: ``folder`` (config, image processor and, when the
    checkpoint has none, the weights) and ``what`` names that folder in messages."""

    folder: Path | None
    what: str
    weights_from: str


def find_vision_tower(src: Path, cfg: dict, layout: SourceLayout, flag_dir: Path | None,
                      has_vision: bool) -> VisionTower:
    """The checkpoint's own tower weights when it carries them; the config's ``mm_vision_tower``
    folder (absolute, or relative to the model directory) for layouts whose loader reads it; else
    ``--vision-tower``. A folder in the config and another on the command line are refused."""
    name = cfg.get("mm_vision_tower")
    cfg_dir = looked = None
    if layout.tower_in_model_dir and isinstance(name, str) and name:
        looked = Path(name) if Path(name).is_absolute() else src / name
        cfg_dir = looked if looked.is_dir() else None
    if cfg_dir is not None and flag_dir is not None and cfg_dir.resolve() != flag_dir.resolve():
        raise MedAlignError(f"{src / 'config.json'}: mm_vision_tower {name!r} is the folder {cfg_dir}, the tower "
                            f"{layout.title} loads; --vision-tower {flag_dir} names another one (drop --vision-tower)")
    if cfg_dir is not None:
        folder, what = cfg_dir, "mm_vision_tower"
    else:
        folder, what = flag_dir, "--vision-tower"
    if not has_vision and folder is None:
        where = f" and mm_vision_tower {name!r} is not a folder (looked for {looked})" if looked else ""
        raise MedAlignError(
            f"{src} holds no vision tower weights ({SRC_VISION_PREFIX}*){where}; pass --vision-tower DIR, a local "
            f"copy of {name or 'the CLIP vision tower'!r} (config.json + weights)")
    return VisionTower(folder, what, "checkpoint" if has_vision else str(folder))


def plan_tensors(weights: WeightSource, tower: VisionTower, has_vision: bool,
                 layout: SourceLayout) -> tuple[list[Planned], Counter]:
    """Every source tensor -> its new name, from the checkpoint and (if needed) the CLIP folder."""
    plan: list[Planned] = []
    dropped: Counter = Counter()
    unknown: list[str] = []
    for k in weights.key_file:
        new = map_original_key(k)
        if new is None:
            if k.endswith(DROPPABLE_SUFFIXES):
                dropped[k.rsplit(".", 1)[-1]] += 1
            else:
                unknown.append(k)
            continue
        plan.append(Planned(weights, k, new))
    if unknown:
        raise MedAlignError(f"{weights.folder}: {len(unknown)} tensor(s) with names {layout.title} does not use, "
                            f"e.g. {', '.join(sorted(unknown)[:5])}")
    if not has_vision:
        clip = WeightSource(tower.folder)
        for k in clip.key_file:
            new = map_clip_key(k)
            if new is not None:
                plan.append(Planned(clip, k, new))
    return plan, dropped


def check_plan(plan: list[Planned], expected: dict[str, tuple[int, ...]], tied: bool, vocab_before: int,
               dropped: Counter) -> dict[str, Planned]:
    """The plan keyed by target name, after checking it covers the target model exactly, with the
    target's shapes (the vocabulary rows of the embedding and lm_head may grow)."""
    planned: dict[str, Planned] = {}
    for p in plan:
        if p.dst_key not in expected:
            if p.src_key.endswith(DROPPABLE_SUFFIXES):
                dropped[p.src_key.rsplit(".", 1)[-1]] += 1
                continue
            raise MedAlignError(f"{p.source.folder}: tensor {p.src_key} maps to {p.dst_key}, "
                                "which the target model does not have")
        planned[p.dst_key] = p
    if tied:  # the lm_head is the embedding: never written separately
        expected.pop("lm_head.weight", None)
        planned.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(planned))
    if missing:
        raise MedAlignError(f"{len(missing)} weight(s) of the target model have no source, e.g. "
                            f"{', '.join(missing[:5])}")
    for k, p in planned.items():
        shape = p.source.shapes[p.src_key]
        want = expected[k]
        ok = shape == want or (k in RESIZABLE and shape[1:] == want[1:] and shape[0] == vocab_before)
        if not ok:
            raise MedAlignError(f"{p.source.folder}: {p.src_key} has shape {list(shape)}, the target "
                                f"{k} needs {list(want)} (config and weights disagree)")
    return planned
