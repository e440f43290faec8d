"""The image towers: building open_clip's image tower alone, and the one forward pass that reads
``E_v`` and ``E_a`` from its last block.

An *expert* is the image tower of a medical CLIP. From its **last** transformer block, in one
forward pass, :func:`last_block_signals` returns

- ``E_v`` (B, M, b): the M = g*g patch tokens (CLS and any other prefix tokens dropped) in the
  expert's token mode: ``raw`` = the block's output before the final norm (open_clip's
  ``forward_intermediates(..., output_fmt='NLC')``), ``norm`` = after the final norm, ``proj`` =
  normalised and projected (``ln_post``/``@ proj`` for open_clip's ViT, ``norm``/``head.proj``
  for a timm trunk);
- ``E_a`` (B, M): the CLS-query attention probabilities over the M patch keys in that block,
  averaged over heads (softmax over all keys, prefix included, then the patch columns taken; not
  renormalised).

``E_a`` is recomputed in a forward pre-hook on the last block's attention module from the
module's own (already normalised) input, with the module's own projection weights and scale and a
float32 softmax, so the block itself keeps its fused attention kernel.

Only the image tower is ever built (open_clip's private ``_build_vision_tower``); the text tower is
never built, so BiomedCLIP's BiomedBERT is never looked up on a hub. Two tower families are known,
one ``_Tower`` subclass each: open_clip's own ``VisionTransformer`` and a timm ViT trunk.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.errors import MedAlignError


def build_visual(model_cfg: dict, quick_gelu: bool, meta: bool = False) -> nn.Module:
    """The open_clip image tower alone, never touching a hub: randomly initialised, or with
    ``meta=True`` parameters on the meta device (no init cost; load with ``assign=True``)."""
    try:
        from open_clip.model import _build_vision_tower
    except ImportError as e:
        raise MedAlignError(
            f"this open_clip_torch version has no open_clip.model._build_vision_tower ({e}); "
            "install open_clip_torch 3.x") from None
    if "vision_cfg" not in model_cfg or "embed_dim" not in model_cfg:
        raise MedAlignError(f"model config needs 'embed_dim' and 'vision_cfg' (got keys {sorted(model_cfg)})")
    vision_cfg = dict(model_cfg["vision_cfg"])
    vision_cfg["timm_model_pretrained"] = False  # never download timm weights
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return _build_vision_tower(int(model_cfg["embed_dim"]), vision_cfg, quick_gelu=quick_gelu, cast_dtype=None)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise MedAlignError(f"cannot build the image tower from vision config {vision_cfg}: {e}") from None


class _Tower:
    """What :class:`Expert` needs from an image tower; one subclass per tower family."""

    num_prefix_tokens: int
    grid: int
    image_size: int
    num_blocks: int
    attention: nn.Module

    def last_block_tokens(self, x: Tensor) -> Tensor:
        """(B, M, width) patch tokens output by the last block (prefix tokens dropped)."""
        raise NotImplementedError

    def apply_mode(self, tokens: Tensor, mode: str) -> Tensor:
        raise NotImplementedError

    def cls_attention(self, args: tuple, kwargs: dict) -> Tensor:
        """(B, L) head-averaged fp32 softmax of the CLS query over all L keys, from the attention
        module's call arguments."""
        raise NotImplementedError


def _fp32_apply(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` in float32 whatever the module's parameter dtype (for q/k norms)."""
    if isinstance(module, nn.Identity):
        return x
    params = {n: p.float() for n, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


class _OpenClipViT(_Tower):
    """open_clip's native ``VisionTransformer`` (ResidualAttentionBlock + nn.MultiheadAttention)."""

    def __init__(self, visual: nn.Module):
        from open_clip.transformer import ResidualAttentionBlock
        self.visual = visual
        if getattr(visual, "attn_pool", None) is not None:
            raise MedAlignError("attentional-pool vision towers are not supported as experts")
        blocks = visual.transformer.resblocks
        if not isinstance(blocks[-1], ResidualAttentionBlock) or not isinstance(blocks[-1].attn, nn.MultiheadAttention):
            raise MedAlignError(f"unsupported open_clip block type {type(blocks[-1]).__name__}: "
                                "need ResidualAttentionBlock with nn.MultiheadAttention")
        self.attention = blocks[-1].attn
        if self.attention.bias_k is not None or self.attention.add_zero_attn:
            raise MedAlignError("nn.MultiheadAttention with bias_k/add_zero_attn is not supported")
        gh, gw = visual.grid_size
        if gh != gw:
            raise MedAlignError(f"non-square patch grid {gh}x{gw}")
        self.grid = gh
        self.image_size = visual.image_size[0]
        self.num_blocks = len(blocks)
        self.num_prefix_tokens = 1

    def last_block_tokens(self, x: Tensor) -> Tensor:
        out = self.visual.forward_intermediates(
            x, indices=[self.num_blocks - 1], intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]

    def apply_mode(self, tokens: Tensor, mode: str) -> Tensor:
        if mode == "raw":
            return tokens
        tokens = self.visual.ln_post(tokens)
        if mode == "norm":
            return tokens
        return tokens @ self.visual.proj

    def cls_attention(self, args: tuple, kwargs: dict) -> Tensor:
        mha: nn.MultiheadAttention = self.attention
        query = args[0] if len(args) > 0 else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs.get("key", query)
        if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
            raise MedAlignError("attention masks in the expert's vision tower are not supported")
        if not mha.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        d, h = mha.embed_dim, mha.num_heads
        hd = d // h
        if mha.in_proj_weight is not None:
            w_q, w_k = mha.in_proj_weight[:d], mha.in_proj_weight[d:2 * d]
        else:
            w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
        b_q = b_k = None
        if mha.in_proj_bias is not None:
            b_q, b_k = mha.in_proj_bias[:d].float(), mha.in_proj_bias[d:2 * d].float()
        q = F.linear(query[:, 0].float(), w_q.float(), b_q)                  # (B, d)
        k = F.linear(key.float(), w_k.float(), b_k)                            # (B, L, d)
        bsz, length = k.shape[:2]
        logits = torch.einsum("bhc,blhc->bhl", q.view(bsz, h, hd), k.view(bsz, length, h, hd)) * hd ** -0.5
        return logits.softmax(dim=-1).mean(dim=1)


class _TimmViT(_Tower):
    """open_clip's ``TimmModel`` wrapping a timm ``VisionTransformer`` (timm ``Attention``)."""

    def __init__(self, visual: nn.Module):
        trunk = visual.trunk
        self.visual, self.trunk = visual, trunk
        if not hasattr(trunk, "blocks") or not hasattr(trunk, "forward_intermediates"):
            raise MedAlignError(f"unsupported timm trunk {type(trunk).__name__}: need a ViT with blocks")
        attn = trunk.blocks[-1].attn
        for attr in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm"):
            if not hasattr(attn, attr):
                raise MedAlignError(f"unsupported timm attention {type(attn).__name__} (no {attr!r})")
        self.attention = attn
        gh, gw = trunk.patch_embed.grid_size
        ih, iw = trunk.patch_embed.img_size
        if gh != gw or ih != iw:
            raise MedAlignError(f"non-square timm trunk: image {ih}x{iw}, grid {gh}x{gw}")
        self.grid, self.image_size = gh, ih
        self.num_blocks = len(trunk.blocks)
        self.num_prefix_tokens = int(trunk.num_prefix_tokens)
        if getattr(trunk, "cls_token", None) is None:
            raise MedAlignError("timm trunk without a class token: no CLS attention to read")

    def last_block_tokens(self, x: Tensor) -> Tensor:
        out = self.trunk.forward_intermediates(
            x, indices=[self.num_blocks - 1], intermediates_only=True, output_fmt="NLC", norm=False)
        return out[0]

    def apply_mode(self, tokens: Tensor, mode: str) -> Tensor:
        if mode == "raw":
            return tokens
        tokens = self.trunk.fc_norm(self.trunk.norm(tokens))
        if mode == "norm":
            return tokens
        return self.visual.head(self.trunk.head(tokens))

    def cls_attention(self, args: tuple, kwargs: dict) -> Tensor:
        attn = self.attention
        x = args[0] if args else kwargs["x"]
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise MedAlignError("attention masks in the expert's vision tower are not supported")
        bsz, length, _ = x.shape
        h, hd = attn.num_heads, attn.head_dim
        a = h * hd
        w = attn.qkv.weight.float()
        bias = attn.qkv.bias.float() if attn.qkv.bias is not None else None
        q = F.linear(x[:, :1].float(), w[:a], None if bias is None else bias[:a])          # (B, 1, a)
        k = F.linear(x.float(), w[a:2 * a], None if bias is None else bias[a:2 * a])     # (B, L, a)
        q = _fp32_apply(attn.q_norm, q.view(bsz, 1, h, hd).transpose(1, 2))              # (B, h, 1, hd)
        k = _fp32_apply(attn.k_norm, k.view(bsz, length, h, hd).transpose(1, 2))         # (B, h, L, hd)
        logits = (q * float(attn.scale)) @ k.transpose(-2, -1)                           # (B, h, 1, L)
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def make_tower(visual: nn.Module) -> _Tower:
    from open_clip.transformer import VisionTransformer
    if isinstance(visual, VisionTransformer):
        return _OpenClipViT(visual)
    if hasattr(visual, "trunk"):
        return _TimmViT(visual)
    raise MedAlignError(f"unsupported image tower {type(visual).__name__}; experts must be ViTs")


def last_block_signals(tower: _Tower, x: Tensor, token_mode: str) -> tuple[Tensor, Tensor]:
    """``E_v`` (B, M, b) and ``E_a`` (B, M), float32, from one forward pass of ``tower`` over ``x``
    (already on the tower's device and dtype); the attention is read by a pre-hook on the last block."""
    captured: list[Tensor] = []

    def hook(module, args, kwargs):
        captured.append(tower.cls_attention(args, kwargs))

    handle = tower.attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        tokens = tower.last_block_tokens(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"attention hook fired {len(captured)} times in one forward pass; expected once")
    e_v = tower.apply_mode(tokens, token_mode).float()
    e_a = captured[0][:, tower.num_prefix_tokens:].float()
    return e_v, e_a


__all__ = ["build_visual", "last_block_signals", "make_tower"]
