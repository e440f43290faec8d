"""The student's visual tokens by region, layer by layer (paper Figures 1 and 5): t-SNE and a number.

* :func:`visual_states`: one prefill forward of the generation prompt (the model as
  :func:`evaluation.generate.load_generator` loads it: with a run, LoRA merged and ``W`` rotating
  the visual positions of the prefill), the hidden states at the image positions entering the
  chosen decoder layers (``L``: the input of ``layers[L]``, which is ``output_hidden_states[L]``;
  0 the projected image tokens). Only the tokens before the image and the image itself reach them
  (causal attention), so the question asked does not change them.
* :func:`collect_tokens`: those states for the images of a data file, each token labelled by the
  region its patch covers (:func:`shared.regions.patch_labels` in the student's ``pad`` geometry).
* :func:`separability` (from :mod:`evaluation.separability`): probe accuracy (split by image) and
  silhouette, the number written beside the figure.
* :func:`run_tsne`: the ``tsne`` command (figure: :mod:`evaluation.tsne_plot`; expert panel:
  :mod:`evaluation.tsne_expert`).

The JSON beside the figure (``fig.json`` for ``fig.png``)::

    {"model", "adapter", "align_layer", "regions", "images", "tokens",
     "labels": {"0": "background", ...}, "token_counts": {"background": n, ...},
     "layers": {"L": separability(...) + {"within_image_silhouette_cosine"}, ...},
     "expert": null | {"source": "S_e", "expert", "within_image_silhouette", "images",
                       "panel_image", "note"},
     "tsne": {"perplexity_requested", "perplexity", "seed", "points"}, "figure"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evaluation.separability import separability, within_image_silhouette
from evaluation.tsne_config import TsneConfig
from shared.errors import MedAlignError
from shared.grid import grid_side
from shared.images import load_image, resolve_image_path
from shared.records import load_records, question_text, record_image
from shared.regions import PADDING, Regions, patch_labels, read_regions

#: Used when a record has no question: the visual states do not depend on it.
DEFAULT_QUESTION = "What is shown in this image?"


def check_layers(layers, num_layers: int) -> list[int]:
    bad = [L for L in layers if not 0 <= int(L) < num_layers]
    if bad:
        raise MedAlignError(f"--layers {','.join(map(str, bad))} out of range: the student has {num_layers} "
                            f"decoder layers (valid 0..{num_layers - 1}; L is the input of layers[L])")
    return [int(L) for L in layers]


@torch.inference_mode()
def visual_states(gen, pixels: torch.Tensor, question: str, layers) -> dict[int, torch.Tensor]:
    """The hidden states of the N image positions entering ``layers[L]`` for each L.

    Args:
        gen: a :class:`evaluation.generate.Generator` (a run's W is installed and acts here).
        pixels: [3, S, S] the image as the student sees it (:func:`student_train.inputs.student_pixels`).
        question: the question of the prompt (built as for generation).
        layers: 0-based decoder layers.
    Returns:
        ``{L: [N, d] float32 (cpu)}``, rows in image-token (row-major patch) order.
    """
    from student_train.alignment import decoder_layers
    from student_train.inputs import encode_prompt

    dec = decoder_layers(gen.model)
    layers = check_layers(layers, len(dec))
    ids, _ = encode_prompt(gen.tokenizer, gen.template, question, gen.image_token_id, gen.num_image_tokens,
                           add_bos=gen.add_bos)
    input_ids = torch.tensor([ids], device=gen.device)
    vis = input_ids[0] == gen.image_token_id
    got: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            got[layer] = hidden[0, vis].detach().float().cpu()
        return hook

    handles = [dec[L].register_forward_pre_hook(grab(L), with_kwargs=True) for L in layers]
    try:
        gen.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  pixel_values=pixels[None].to(gen.device, gen.dtype), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {L: got[L] for L in layers}


@dataclass
class TokenSet:
    """Labelled visual tokens of several images."""

    layers: list[int]
    features: dict[int, np.ndarray]
    """L -> [M, d] float32."""
    labels: np.ndarray
    """[M] int64 region labels."""
    groups: np.ndarray
    """[M] int64 index of the token's image in :attr:`images`."""
    patches: np.ndarray
    """[M] int64 patch (image-token) index."""
    images: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    """Why images of the data file were not used: ``{"no mask": n, ...}``."""


def image_questions(data: str | Path) -> list[tuple[str, str]]:
    """``(image, its first question)`` for each distinct image of a LLaVA-style file, in order."""
    seen: dict[str, str] = {}
    for rec in load_records(data):
        image = record_image(rec)
        if image is not None and image not in seen:
            seen[image] = (question_text(rec) or DEFAULT_QUESTION).strip() or DEFAULT_QUESTION
    return list(seen.items())


def choose_patches(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``k`` patch indices (sorted) among those not in the padding, drawn without replacement."""
    idx = np.flatnonzero(labels != PADDING)
    if idx.size > k:
        idx = np.sort(rng.choice(idx, size=k, replace=False))
    return idx


def collect_tokens(gen, data: str | Path, image_root: str | Path, regions: Regions, layers, *,
                   max_images: int = 100, max_tokens: int = 10000, seed: int = 0,
                   log: Callable[[str], None] = lambda m: None) -> TokenSet:
    """The labelled visual tokens of the first ``max_images`` images of ``data`` that have a mask.

    Each image contributes at most ceil(max_tokens / images) of its non-padding patches (drawn
    with ``seed``), so the tokens spread over the images; labels by :func:`patch_labels` of the
    image's mask on the student's G x G grid (``pad`` geometry).
    """
    from student_train.inputs import student_pixels

    grid = grid_side(gen.num_image_tokens)
    pairs = image_questions(data)
    chosen, skipped = [], {"no mask": 0, "mask size differs from the image": 0}
    for image, q in pairs:
        if len(chosen) == max_images:
            break
        if not regions.has(image):
            skipped["no mask"] += 1
            continue
        chosen.append((image, q))
    if not chosen:
        raise MedAlignError(f"--regions {regions.root}: none of the {len(pairs)} images of {data} has a mask")
    per_image = -(-int(max_tokens) // len(chosen))
    rng = np.random.default_rng(seed)
    feats: dict[int, list[np.ndarray]] = {int(L): [] for L in layers}
    labels, groups, patches, used = [], [], [], []
    for image, q in chosen:
        path = resolve_image_path(image_root, image)
        mask = regions.mask(image)
        img, _ = load_image(path)
        if mask.shape != (img.size[1], img.size[0]):
            skipped["mask size differs from the image"] += 1
            log(f"skipping {image}: mask {mask.shape[1]}x{mask.shape[0]} vs image {img.size[0]}x{img.size[1]}")
            continue
        lab = patch_labels(mask, grid, "pad")
        idx = choose_patches(lab, per_image, rng)
        if idx.size == 0:
            continue
        states = visual_states(gen, student_pixels(gen.image_processor, path, gen.background), q, layers)
        for L, s in states.items():
            feats[L].append(s.numpy()[idx])
        labels.append(lab[idx])
        groups.append(np.full(idx.size, len(used), dtype=np.int64))
        patches.append(idx)
        used.append(image)
    if not used:
        raise MedAlignError(f"--regions {regions.root}: no usable image (every mask's size differs from its image?)")
    return TokenSet(list(feats), {L: np.concatenate(v) for L, v in feats.items()}, np.concatenate(labels),
                    np.concatenate(groups), np.concatenate(patches), used, {k: v for k, v in skipped.items() if v})


def layer_scores(tokens: TokenSet, *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per layer: :func:`separability` (folds by image) and the within-image cosine silhouette."""
    out = {}
    for L in tokens.layers:
        x = tokens.features[L]
        s = separability(x, tokens.labels, tokens.groups, seed=seed)
        per_image = [(x[tokens.groups == i], tokens.labels[tokens.groups == i]) for i in range(len(tokens.images))]
        s["within_image_silhouette_cosine"] = within_image_silhouette(per_image, "cosine")["silhouette"]
        out[str(L)] = s
    return out


def sidecar_path(out: str | Path) -> Path:
    """``fig.png`` -> ``fig.json`` (the scores beside the picture)."""
    return Path(out).with_suffix(".json")


def _align_layer(run_dir: str | Path | None) -> int | None:
    from student_train.model import load_rotation

    if run_dir is None:
        return None
    rot = load_rotation(run_dir)
    return None if rot is None else int(rot[1]["layer"])


def run_tsne(cfg: TsneConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``tsne`` command: load, collect, score, embed, draw; returns what the JSON holds."""
    from evaluation.generate import load_generator
    from evaluation.tsne_plot import clipped_perplexity, embed, write_figure
    from shared.runtime import resolve_device, torch_dtype

    for flag, p in (("--data", cfg.data), ("--image-root", cfg.image_root)):
        if not Path(p).exists():
            raise MedAlignError(f"{flag} {p} not found")
    regions = read_regions(cfg.regions)
    expert = None
    if cfg.expert_cache is not None:
        from evaluation.tsne_expert import open_expert
        expert = open_expert(cfg.expert_cache)
    gen = load_generator(cfg.model, cfg.adapter, template=cfg.template, dtype=torch_dtype(cfg.dtype),
                         device=resolve_device(cfg.device), trust_remote_code=cfg.trust_remote_code)
    from student_train.model import num_layers
    layers = check_layers(cfg.layer_list, num_layers(gen.model))
    tokens = collect_tokens(gen, cfg.data, cfg.image_root, regions, layers, max_images=cfg.max_images,
                            max_tokens=cfg.max_tokens, seed=cfg.seed, log=log)
    if tokens.labels.size < 4:
        raise MedAlignError(f"only {tokens.labels.size} labelled tokens: too few to embed (more images?)")
    log(f"{tokens.labels.size} tokens of {len(tokens.images)} images, layers {layers}")
    scores = layer_scores(tokens, seed=cfg.seed)
    panels = []
    for L in layers:
        s = scores[str(L)]
        panels.append({"title": f"layer {L}", "xy": embed(tokens.features[L], cfg.perplexity, cfg.seed),
                       "labels": tokens.labels, "probe": s["probe_accuracy"], "silhouette": s["silhouette"]})
    expert_json = None
    if expert is not None:
        from evaluation.tsne_expert import expert_panel
        expert_json, panel = expert_panel(expert, tokens, cfg.image_root, gen.num_image_tokens, regions,
                                          perplexity=cfg.perplexity, seed=cfg.seed)
        if panel is not None:
            panels.append(panel)
    present = sorted(set(int(v) for v in tokens.labels))
    names = {v: regions.name(v) for v in present}
    write_figure(panels, names, cfg.out, suptitle=_title(cfg, tokens))
    counts = {names[v]: int((tokens.labels == v).sum()) for v in present}
    result = {"model": str(cfg.model), "adapter": cfg.adapter, "align_layer": _align_layer(cfg.adapter),
              "regions": str(cfg.regions), "images": len(tokens.images), "tokens": int(tokens.labels.size),
              "skipped_images": tokens.skipped, "labels": {str(v): names[v] for v in present},
              "token_counts": counts, "layers": scores, "expert": expert_json,
              "tsne": {"perplexity_requested": float(cfg.perplexity),
                       "perplexity": clipped_perplexity(cfg.perplexity, int(tokens.labels.size)),
                       "seed": int(cfg.seed), "points": int(tokens.labels.size)},
              "figure": str(cfg.out)}
    side = sidecar_path(cfg.out)
    side.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {cfg.out} and {side}")
    return result


def _title(cfg: TsneConfig, tokens: TokenSet) -> str:
    who = Path(cfg.adapter).name if cfg.adapter else Path(cfg.model).name
    return f"{who}: {tokens.labels.size} visual tokens of {len(tokens.images)} images"


__all__ = ["DEFAULT_QUESTION", "TokenSet", "check_layers", "visual_states", "image_questions", "choose_patches",
           "collect_tokens", "layer_scores", "separability", "within_image_silhouette", "sidecar_path", "run_tsne"]
