"""Straightforward float64 numpy re-implementations used as ground truth by the teacher tests.

Written from the architecture definitions, not from the code under test: a ViT forward pass from
a state dict (open_clip's native ViT and timm's ViT), explicit softmax attention, and bilinear
resampling with ``align_corners=False`` semantics (PyTorch's: source coordinate
``(dst + 0.5) * in / out - 0.5`` clamped at 0, neighbours clamped to the edge).
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float64)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def quick_gelu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-1.702 * x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def patchify(pixels: np.ndarray, p: int) -> np.ndarray:
    """(B, 3, S, S) -> (B, g*g, 3*p*p), patches in row-major order, each flattened (c, y, x)."""
    bsz, c, s, _ = pixels.shape
    g = s // p
    return pixels.reshape(bsz, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(bsz, g * g, c * p * p)


def _attention(y: np.ndarray, w_qkv: np.ndarray, b_qkv: np.ndarray, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Self-attention with explicit softmax: returns (context (B, L, D), probs (B, H, L, L))."""
    bsz, length, d = y.shape
    hd = d // heads
    qkv = y @ w_qkv.T + b_qkv
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(bsz, length, heads, hd).transpose(0, 2, 1, 3) for i in range(3))
    probs = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd))
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, length, d)
    return ctx, probs


def open_clip_vit(state: dict, pixels, *, patch: int, heads: int, quick: bool, mode: str = "raw",
                  eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """open_clip's native ViT in float64 from its ``visual.*`` state dict (prefix removed).

    Returns (E_v (B, M, b) in token mode ``mode``, E_a (B, M) head-averaged CLS->patch attention of
    the last block).
    """
    sd = {k: _np(v) for k, v in state.items()}
    x = _np(pixels)
    bsz = x.shape[0]
    w = sd["conv1.weight"]
    d = w.shape[0]
    tok = patchify(x, patch) @ w.reshape(d, -1).T
    cls = np.broadcast_to(sd["class_embedding"], (bsz, 1, d))
    h = np.concatenate([cls, tok], axis=1) + sd["positional_embedding"]
    h = layer_norm(h, sd["ln_pre.weight"], sd["ln_pre.bias"], eps)
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    act = quick_gelu if quick else gelu
    probs = None
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        y = layer_norm(h, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
        ctx, probs = _attention(y, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], heads)
        h = h + ctx @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        y = layer_norm(h, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
        y = act(y @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        h = h + y @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    e_v = h[:, 1:]
    if mode in ("norm", "proj"):
        e_v = layer_norm(e_v, sd["ln_post.weight"], sd["ln_post.bias"], eps)
    if mode == "proj":
        e_v = e_v @ sd["proj"]
    return e_v, probs.mean(axis=1)[:, 0, 1:]


def timm_vit(state: dict, pixels, *, patch: int, heads: int, mode: str = "proj",
             eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """timm's ViT inside open_clip's TimmModel (keys ``trunk.*``, ``head.proj.weight``), float64."""
    sd = {k: _np(v) for k, v in state.items()}
    x = _np(pixels)
    bsz = x.shape[0]
    w = sd["trunk.patch_embed.proj.weight"]
    d = w.shape[0]
    tok = patchify(x, patch) @ w.reshape(d, -1).T + sd["trunk.patch_embed.proj.bias"]
    cls = np.broadcast_to(sd["trunk.cls_token"].reshape(1, 1, d), (bsz, 1, d))
    h = np.concatenate([cls, tok], axis=1) + sd["trunk.pos_embed"]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("trunk.blocks."))
    probs = None
    for i in range(layers):
        p = f"trunk.blocks.{i}."
        y = layer_norm(h, sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        ctx, probs = _attention(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"], heads)
        h = h + ctx @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        y = layer_norm(h, sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        y = gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        h = h + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    e_v = h[:, 1:]
    if mode in ("norm", "proj"):
        e_v = layer_norm(e_v, sd["trunk.norm.weight"], sd["trunk.norm.bias"], eps)
    if mode == "proj":
        e_v = e_v @ sd["head.proj.weight"].T
    return e_v, probs.mean(axis=1)[:, 0, 1:]


def bilinear_1d_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation matrix, align_corners=False, edge-clamped (PyTorch semantics)."""
    mat = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for o in range(n_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        mat[o, i0] += 1.0 - frac
        mat[o, i1] += frac
    return mat


def bilinear(maps: np.ndarray, size: int) -> np.ndarray:
    """(..., g, g) -> (..., size, size) separable bilinear resampling."""
    g = maps.shape[-1]
    r = bilinear_1d_matrix(g, size)
    return np.einsum("oi,...ij,pj->...op", r, maps, r)


def l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def signals(e_v: np.ndarray, e_a: np.ndarray, grid: int,
            order: str = "norm-resample-norm") -> tuple[np.ndarray, np.ndarray]:
    """S_e (B, N, N) and attention (B, N) on the G x G grid, float64.

    ``order='norm-resample-norm'`` L2-normalises the tokens before resampling them (the reference
    notebooks); ``'resample-norm'`` resamples the raw tokens. Both normalise the resampled rows.
    """
    e_v, e_a = _np(e_v), _np(e_a)
    bsz, m, dim = e_v.shape
    g = int(round(math.sqrt(m)))
    if order == "norm-resample-norm":
        e_v = l2_rows(e_v)
    else:
        assert order == "resample-norm", order
    maps = e_v.transpose(0, 2, 1).reshape(bsz, dim, g, g)
    feats = bilinear(maps, grid).reshape(bsz, dim, grid * grid).transpose(0, 2, 1)
    feats = l2_rows(feats)
    attn = bilinear(e_a.reshape(bsz, g, g), grid).reshape(bsz, grid * grid)
    return feats @ feats.transpose(0, 2, 1), attn
