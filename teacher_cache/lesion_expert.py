"""A tiny UniMed-format expert whose CLS attention finds bright lesions, set by construction.

For the grounding benchmark (``bench/grounding.py``, ``medalign-eval demo``): the teacher must look
at the lesion, or MedAlign has nothing to distil. No training: the weights are written by hand into
an open_clip ``VisionTransformer`` (one block) and saved as a UniMed-CLIP training checkpoint
(``{"epoch", "name", "state_dict": {"module.visual.*", ...}}``), so the real loader and the real
``medalign-cache build`` read it like a downloaded expert:

* ``conv1``: channel 0 of every patch token is the patch's mean normalised intensity ``b``;
* ``positional_embedding``: channel 1 is a constant 1 on every patch (the class token has channel 2
  instead), so after ``ln_pre`` channel 0 is a monotone function of ``b`` (a lone constant would be
  normalised away);
* the block's query projection is a constant (bias only) and its key projection reads channel 0, so
  the CLS->patch logit is ``sharpness * ln(x_i)_0``: the softmax (``E_a``) puts its mass on the
  brightest, i.e. the lesion's, patches (the distractors are dark discs and one-pixel lines);
* the attention output and the MLP write nothing (zero weights): the last block's output, ``E_v``
  (token mode ``raw``), is ``ln_pre``'s, so ``S_e`` groups the lesion's patches against the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from teacher_cache.experts.towers import build_visual
from teacher_cache.tiny import _text_keys

#: Default sharpness of the CLS->patch logits (per unit of the normalised channel 0).
SHARPNESS = 1.5


def lesion_unimed_config(image_size: int = 48, patch_size: int = 8, width: int = 64) -> dict:
    """The open_clip model config of the lesion expert (pass it as ``--model-config``)."""
    return {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": 1,
                           "head_width": 32}}


def lesion_visual(model_cfg: dict, sharpness: float = SHARPNESS) -> torch.nn.Module:
    """The open_clip image tower with the hand-set weights described in the module docstring."""
    visual = build_visual(model_cfg, quick_gelu=True)
    vc = model_cfg["vision_cfg"]
    width, patch, head_width = vc["width"], vc["patch_size"], vc["head_width"]
    heads = width // head_width
    block = visual.transformer.resblocks[0]
    with torch.no_grad():
        for p in visual.parameters():
            p.zero_()
        for ln in (visual.ln_pre, block.ln_1, block.ln_2, visual.ln_post):
            ln.weight.fill_(1.0)
        visual.conv1.weight[0] = 1.0 / (3 * patch * patch)      # channel 0: mean normalised intensity
        visual.positional_embedding[1:, 1] = 1.0                # channel 1: constant on the patches
        visual.class_embedding[2] = 1.0                         # the class token: channel 2
        attn = block.attn
        for h in range(heads):
            c = h * head_width
            attn.in_proj_bias[c] = sharpness * head_width ** 0.5   # q: constant, per head
            attn.in_proj_weight[width + c, 0] = 1.0                # k: reads channel 0
        k = min(visual.proj.shape)
        visual.proj[:k, :k] = torch.eye(k)                      # (unused by token mode raw)
    return visual


def save_lesion_unimed(path: str | Path, image_size: int = 48, patch_size: int = 8,
                       sharpness: float = SHARPNESS) -> dict:
    """Write the lesion expert as a UniMed-CLIP checkpoint at ``path`` (expert ``unimed-b``) and its
    model config next to it (``path`` with suffix ``.json``); returns the model config."""
    cfg = lesion_unimed_config(image_size, patch_size)
    visual = lesion_visual(cfg, sharpness)
    state = {f"module.visual.{k}": v.clone() for k, v in visual.state_dict().items()}
    state.update({f"module.{k}": v for k, v in _text_keys(torch.Generator().manual_seed(0), 16).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "name": "lesion-unimed-b (hand-set weights)", "state_dict": state}, path)
    path.with_suffix(".json").write_text(json.dumps(cfg, indent=1) + "\n")
    return cfg


__all__ = ["SHARPNESS", "lesion_unimed_config", "lesion_visual", "save_lesion_unimed"]
