"""SAM's architecture read from an original ``.pth`` state dict, and the model built from it.

The original checkpoints (``sam_vit_h_4b8939.pth`` and its ViT-L / ViT-B siblings) are flat state
dicts with the prefixes ``image_encoder.``, ``prompt_encoder.`` and ``mask_decoder.``. Every size
segment-anything's builder passes is recoverable from tensor shapes except the mask decoder's
attention heads (8 in every released model, hard-coded by the builder, kept here): the encoder's
width from the patch embedding, depth from the block count, heads from the relative-position
tables (``2 * size - 1`` rows of ``head_dim``), the global-attention blocks as those whose table
spans the whole token grid, the window size from the others.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import Tensor

from shared.errors import MedAlignError

PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
#: the mask decoder's attention heads: not stored in the weights; segment-anything's builder uses 8
DECODER_HEADS = 8
#: SAM's input normalisation (ImageNet mean/std on 0..255), non-persistent buffers of the model
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArch:
    """Every size segment-anything's ``_build_sam`` needs, as read from a state dict."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    window_size: int
    patch_size: int
    image_size: int
    mlp_ratio: float
    prompt_embed_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    num_multimask_outputs: int
    iou_head_depth: int
    iou_head_hidden_dim: int
    decoder_num_heads: int = DECODER_HEADS

    @property
    def name(self) -> str:
        """``vit_h`` / ``vit_l`` / ``vit_b`` when the sizes are a released model's, else ``tiny``
        (an encoder narrower than ViT-B, as the tests' models) or ``custom``."""
        for name, ref in STANDARD.items():
            if self == ref:
                return name
        return "tiny" if self.encoder_embed_dim < 768 else "custom"

    def to_json(self) -> dict:
        d = asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        d["name"] = self.name
        return d


def _standard(embed: int, depth: int, heads: int, globals_: tuple[int, ...]) -> SamArch:
    return SamArch(encoder_embed_dim=embed, encoder_depth=depth, encoder_num_heads=heads,
                   encoder_global_attn_indexes=globals_, window_size=14, patch_size=16,
                   image_size=1024, mlp_ratio=4.0, prompt_embed_dim=256, mask_in_chans=16,
                   decoder_depth=2, decoder_mlp_dim=2048, num_multimask_outputs=3,
                   iou_head_depth=3, iou_head_hidden_dim=256)


#: the released models' sizes (segment-anything ``build_sam.py``)
STANDARD = {
    "vit_h": _standard(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": _standard(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": _standard(768, 12, 12, (2, 5, 8, 11)),
}


def _count(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if found != set(range(len(found))):
        raise KeyError(f"{prefix}N blocks are not numbered 0..{len(found) - 1}")
    return len(found)


def infer_arch(state: dict[str, Tensor], source: str) -> SamArch:
    """The architecture of an original-layout SAM state dict; ``MedAlignError`` naming ``source``
    when the dict is not one (no SAM keys, a transformers ``SamModel`` layout, missing tensors)."""
    if not isinstance(state, dict) or not state:
        raise MedAlignError(f"{source}: not a SAM checkpoint (expected a flat state dict of tensors)")
    keys = list(state)
    if not any(k.startswith(PREFIXES) for k in keys):
        hint = ""
        if any(k.startswith(("vision_encoder.", "sam.vision_encoder.")) for k in keys):
            hint = " (this looks like a transformers SamModel checkpoint; pass the original .pth)"
        elif "model" in state or "state_dict" in state:
            hint = " (a nested checkpoint; pass the original flat .pth, e.g. sam_vit_h_4b8939.pth)"
        raise MedAlignError(f"{source}: not a SAM checkpoint: no image_encoder.* / prompt_encoder.* / "
                            f"mask_decoder.* tensors{hint}")
    stray = [k for k in keys if not k.startswith(PREFIXES)]
    if stray:
        raise MedAlignError(f"{source}: not an original SAM checkpoint: unexpected tensor {stray[0]!r}")
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]  # [embed, 3, p, p]
        embed, patch_size = int(patch.shape[0]), int(patch.shape[-1])
        pos = state["image_encoder.pos_embed"]  # [1, S/p, S/p, embed]
        tokens = int(pos.shape[1])
        depth = _count(state, "image_encoder.blocks.")
        spans = [int(state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) for i in range(depth)]
        head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
        global_idx = tuple(i for i, s in enumerate(spans) if s == 2 * tokens - 1)
        windows = {(s + 1) // 2 for i, s in enumerate(spans) if i not in global_idx}
        if len(windows) > 1:
            raise KeyError(f"blocks use different window sizes {sorted(windows)}")
        mlp = int(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0])
        prompt_dim = int(state["image_encoder.neck.0.weight"].shape[0])
        mask_in = int(state["prompt_encoder.mask_downscaling.3.weight"].shape[0])
        arch = SamArch(
            encoder_embed_dim=embed, encoder_depth=depth, encoder_num_heads=embed // head_dim,
            encoder_global_attn_indexes=global_idx, window_size=windows.pop() if windows else 0,
            patch_size=patch_size, image_size=tokens * patch_size, mlp_ratio=mlp / embed,
            prompt_embed_dim=prompt_dim, mask_in_chans=mask_in,
            decoder_depth=_count(state, "mask_decoder.transformer.layers."),
            decoder_mlp_dim=int(state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
            num_multimask_outputs=int(state["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
            iou_head_depth=_count(state, "mask_decoder.iou_prediction_head.layers."),
            iou_head_hidden_dim=int(state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
        )
    except KeyError as e:
        raise MedAlignError(f"{source}: not a complete SAM checkpoint: missing or malformed {e}") from None
    return arch


def build_sam(arch: SamArch):
    """segment-anything's ``Sam`` module with ``arch``'s sizes (what its ``_build_sam`` does, with
    the sizes as arguments), random-initialised, in eval mode."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = arch.image_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth, embed_dim=arch.encoder_embed_dim, img_size=arch.image_size,
            mlp_ratio=arch.mlp_ratio, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads, patch_size=arch.patch_size, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size, out_chans=arch.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size), mask_in_chans=arch.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=arch.decoder_depth, embedding_dim=arch.prompt_embed_dim,
                                          mlp_dim=arch.decoder_mlp_dim, num_heads=arch.decoder_num_heads),
            transformer_dim=arch.prompt_embed_dim, iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim),
        pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD),
    )
    return sam.eval()
