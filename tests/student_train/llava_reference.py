"""Helpers for the checkpoint-converter tests: tiny random weights in the ORIGINAL LLaVA layout
(original key names) and an independent re-implementation of the original LLaVA forward pass
(CLIP hidden_states[-2] minus CLS -> Linear-GELU-Linear -> spliced at the <image> position ->
a Llama-style decoder with RoPE and GQA, q/k/v biases for Qwen2)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

IMAGE, PATCH = 28, 14   # 2 x 2 = 4 patches
N_IMAGE = (IMAGE // PATCH) ** 2
VLAYERS = 3
VP = "model.vision_tower.vision_tower.vision_model."


def _rand(gen: torch.Generator):
    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale
    return r


# --- tiny random weights in the original layout ------------------------------------------------

def vision_weights(hidden: int, inter: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random CLIP vision weights with original (``vision_model.``-relative) names."""
    r = _rand(gen)
    n_pos = N_IMAGE + 1
    sd = {"embeddings.class_embedding": r(hidden), "embeddings.patch_embedding.weight": r(hidden, 3, PATCH, PATCH, scale=0.05),
          "embeddings.position_embedding.weight": r(n_pos, hidden),
          "embeddings.position_ids": torch.arange(n_pos).unsqueeze(0),  # legacy buffer: must be dropped
          "pre_layrnorm.weight": 1 + r(hidden), "pre_layrnorm.bias": r(hidden),
          "post_layernorm.weight": 1 + r(hidden), "post_layernorm.bias": r(hidden)}
    for i in range(VLAYERS):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = r(hidden, hidden)
            sd[p + f"self_attn.{proj}.bias"] = r(hidden)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[p + f"{ln}.weight"] = 1 + r(hidden)
            sd[p + f"{ln}.bias"] = r(hidden)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(inter, hidden), r(inter)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(hidden, inter), r(hidden)
    return sd


def language_weights(*, rows: int, d: int, layers: int, heads: int, kv_heads: int, inter: int, mm_hidden: int,
                     gen: torch.Generator, qkv_bias: bool = False) -> dict[str, torch.Tensor]:
    """Random decoder + projector weights with the original LLaVA names (``rows`` embedding rows)."""
    r = _rand(gen)
    hd = d // heads
    sd = {"model.embed_tokens.weight": r(rows, d, scale=1.0), "model.norm.weight": 1 + r(d), "lm_head.weight": r(rows, d),
          "model.mm_projector.0.weight": r(d, mm_hidden), "model.mm_projector.0.bias": r(d),
          "model.mm_projector.2.weight": r(d, d), "model.mm_projector.2.bias": r(d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, out in (("q_proj", heads * hd), ("k_proj", kv_heads * hd), ("v_proj", kv_heads * hd)):
            sd[p + f"self_attn.{name}.weight"] = r(out, d)
            if qkv_bias:
                sd[p + f"self_attn.{name}.bias"] = r(out)
        sd[p + "self_attn.o_proj.weight"] = r(d, heads * hd)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = r(inter, d), r(inter, d)
        sd[p + "mlp.down_proj.weight"] = r(d, inter)
        sd[p + "input_layernorm.weight"] = 1 + r(d)
        sd[p + "post_attention_layernorm.weight"] = 1 + r(d)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(hd // 2)  # legacy buffer: dropped
    return sd


def write_clip_folder(folder: Path, vis: dict[str, torch.Tensor], hidden: int, heads: int) -> Path:
    """A local HF ``CLIPModel`` folder (config.json + model.safetensors) holding the vision weights
    ``vis`` plus a few text-tower tensors the converter must ignore."""
    from transformers import CLIPConfig

    folder.mkdir(parents=True)
    CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "vocab_size": 50, "bos_token_id": 0,
                            "eos_token_id": 1, "pad_token_id": 1},
               vision_config={"hidden_size": hidden, "intermediate_size": vis["encoder.layers.0.mlp.fc1.weight"].shape[0],
                              "num_hidden_layers": VLAYERS, "num_attention_heads": heads, "image_size": IMAGE,
                              "patch_size": PATCH},
               projection_dim=8).save_pretrained(str(folder))
    clip_sd = {"vision_model." + k: v for k, v in vis.items()}
    clip_sd.update({"text_model.embeddings.token_embedding.weight": torch.zeros(50, 16),
                    "visual_projection.weight": torch.zeros(8, hidden), "logit_scale": torch.tensor(2.0)})
    save_file(clip_sd, str(folder / "model.safetensors"))
    return folder


# --- independent re-implementation of the original forward --------------------------------------

def ref_vision_features(sd: dict, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """CLIP ViT, hidden_states[-2] with the CLS row dropped: (B, P, H)."""
    def w(name):
        return sd[VP + name]

    x = F.conv2d(pixels, w("embeddings.patch_embedding.weight"), stride=PATCH).flatten(2).transpose(1, 2)
    cls = w("embeddings.class_embedding").expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + w("embeddings.position_embedding.weight")
    x = F.layer_norm(x, x.shape[-1:], w("pre_layrnorm.weight"), w("pre_layrnorm.bias"), 1e-5)
    states = [x]
    B, T, H = x.shape
    hd = H // heads
    for i in range(VLAYERS):
        p = f"encoder.layers.{i}."
        h = F.layer_norm(x, (H,), w(p + "layer_norm1.weight"), w(p + "layer_norm1.bias"), 1e-5)
        q, k, v = (F.linear(h, w(p + f"self_attn.{n}.weight"), w(p + f"self_attn.{n}.bias")).view(B, T, heads, hd).transpose(1, 2)
                   for n in ("q_proj", "k_proj", "v_proj"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(B, T, H), w(p + "self_attn.out_proj.weight"), w(p + "self_attn.out_proj.bias"))
        h = F.layer_norm(x, (H,), w(p + "layer_norm2.weight"), w(p + "layer_norm2.bias"), 1e-5)
        h = F.linear(h, w(p + "mlp.fc1.weight"), w(p + "mlp.fc1.bias"))
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, w(p + "mlp.fc2.weight"), w(p + "mlp.fc2.bias"))
        states.append(x)
    return states[-2][:, 1:]


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def ref_decoder(sd: dict, embeds: torch.Tensor, *, layers: int, heads: int, kv_heads: int, theta: float,
                eps: float) -> torch.Tensor:
    """Llama-style decoder (RMSNorm, RoPE, GQA, causal, SwiGLU; q/k/v biases where ``sd`` has them,
    as Qwen2's) + final norm + lm_head over input embeddings (B, T, D)."""
    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    B, T, D = embeds.shape
    hd = D // heads
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    causal = torch.full((T, T), float("-inf")).triu(1)
    x = embeds
    for i in range(layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q, k, v = (F.linear(h, sd[p + f"self_attn.{n}.weight"], sd.get(p + f"self_attn.{n}.bias")).view(B, T, nh, hd).transpose(1, 2)
                   for n, nh in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(B, T, D), sd[p + "self_attn.o_proj.weight"])
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + F.linear(F.silu(F.linear(h, sd[p + "mlp.gate_proj.weight"])) * F.linear(h, sd[p + "mlp.up_proj.weight"]),
                         sd[p + "mlp.down_proj.weight"])
    return F.linear(rms(x, sd["model.norm.weight"]), sd["lm_head.weight"])


def ref_llava(sd: dict, before: list[int], after: list[int], pixels: torch.Tensor, vheads: int,
              **decoder) -> torch.Tensor:
    """The original LLaVA forward: one image placeholder in the text is replaced by the projected
    features (``decoder``: the keywords of :func:`ref_decoder`)."""
    feats = ref_vision_features(sd, pixels, vheads)
    img = F.linear(F.gelu(F.linear(feats, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])),
                   sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"])
    emb = sd["model.embed_tokens.weight"]
    seq = torch.cat([emb[torch.tensor(before)][None], img, emb[torch.tensor(after)][None]], dim=1)
    return ref_decoder(sd, seq, **decoder)
