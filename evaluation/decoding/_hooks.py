"""The hooks of PAI, DAMRO and AVISC: an attention function that looks again at the LAST query row of
each forward (PAI, AVISC), and forward hooks that keep module outputs (:func:`recorded_outputs`).

The attention function is registered with transformers' ``AttentionInterface`` (and
``AttentionMaskInterface``, with SDPA's boolean masks) as :data:`IMPL`. Every layer's attention is
first computed as usual by
:func:`student_train.alignment.medalign_attention_forward` (SDPA, plus MedAlign's query-row capture
where a layer is marked for it, so the two coexist); then, only while a :class:`LastRowState` is
attached to the model (:func:`last_row_attention`) and says so:

* ``boost`` (PAI): in the layers of ``layers``, the last query row is recomputed with the pre-softmax
  scores to the image keys raised by ``alpha |score|`` (:func:`boosted_last_row`) and replaces that
  row of the output;
* ``capture`` (AVISC): the last query row's attention probabilities, averaged over heads, to the
  image keys are kept per layer in ``captured`` ([B, N] each).

The last row is the only one touched, with the keys the row attends to (the cache included), never
the T x T matrix. The image keys are the prompt's image positions (``input_ids ==
image_token_id`` of the prompt, key columns ``0..T-1`` of the branch), so a generated image token
id is never taken for an image key.

A trained run's rotation W is a forward hook on a decoder layer and needs no attention function:
switching the language model to :data:`IMPL` for a method's forwards leaves it as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from student_train.alignment import (
    decoder_layers,
    medalign_attention_forward,
    unwrap,
)

#: Name of the attention implementation registered by this module.
IMPL = "medalign_decoding_sdpa"

_STATE_ATTR = "_medalign_last_row_state"


@dataclass
class LastRowState:
    """What the attention function does to the last query row of the current forward.

    Attributes:
        image_keys: [B, T] bool, the prompt's image positions (key columns beyond T are answer tokens).
        layers: the decoder layer indices PAI boosts (``range(start, L)``).
        alpha: PAI's boost.
        boost: PAI's boost is on for the current forward (off for a text-only branch).
        capture: keep the last row's head-averaged attention to the image keys per layer.
        captured: layer index -> [B, N] fp32 (filled while ``capture``).
    """

    image_keys: torch.Tensor
    layers: range = range(0)
    alpha: float = 0.0
    boost: bool = False
    capture: bool = False
    captured: dict[int, torch.Tensor] = field(default_factory=dict)

    def key_mask(self, kv_len: int) -> torch.Tensor:
        """[B, kv_len] bool image-key columns of a forward whose keys number ``kv_len``."""
        t = self.image_keys.shape[1]
        if kv_len < t:
            raise RuntimeError(f"a forward with {kv_len} keys cannot hold the {t}-position prompt")
        return F.pad(self.image_keys, (0, kv_len - t), value=False)


# --------------------------------------------------------------------------- the maths


def last_row_allowed(attention_mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor:
    """[B, S] bool: the keys the last query row may attend to.

    ``attention_mask`` as given to an attention function: None (causal only: the last row sees every
    key), bool [B|1, 1|H, T, S] (True = attend) or an additive float mask of that shape.
    """
    if attention_mask is None:
        return torch.ones(batch, kv_len, dtype=torch.bool)
    m = attention_mask[:, 0, -1, :]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m.expand(batch, kv_len)


def last_row_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Pre-softmax scores of the last query row: query [B, H, T, D], key [B, Hkv, S, D] (grouped
    heads: head h reads key head ``h // (H / Hkv)``, as ``repeat_kv``) -> [B, H, S] fp32."""
    b, h, _, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    q = query[:, :, -1].reshape(b, hkv, h // hkv, d).float()
    return (q @ key.float().transpose(-1, -2) * scaling).reshape(b, h, s)


def pai_boost(scores: torch.Tensor, image_keys: torch.Tensor, alpha: float) -> torch.Tensor:
    """PAI's intervention: ``score + alpha |score|`` at the image keys. scores [B, H, S], image_keys [B, S]."""
    return torch.where(image_keys[:, None, :], scores + alpha * scores.abs(), scores)


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed keys of [B, H, S] scores (allowed [B, S])."""
    return torch.softmax(scores.masked_fill(~allowed[:, None, :], float("-inf")), dim=-1)


def boosted_last_row(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                     image_keys: torch.Tensor, alpha: float, scaling: float) -> torch.Tensor:
    """The last query row's attention output with PAI's boost: [B, H, D] fp32.

    query [B, H, T, D]; key, value [B, Hkv, S, D]; allowed, image_keys [B, S] bool.
    """
    b, h, _, _ = query.shape
    hkv, s, dv = value.shape[1], value.shape[2], value.shape[3]
    probs = masked_softmax(pai_boost(last_row_scores(query, key, scaling), image_keys, alpha), allowed)
    out = probs.reshape(b, hkv, h // hkv, s) @ value.float()  # [B, Hkv, G, D]
    return out.reshape(b, h, dv)


def image_attention(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, image_keys: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """AVISC's per-layer statistic: the last row's attention probabilities averaged over heads, at the
    image keys -> [B, N] fp32 (every row holds the same number N of image keys)."""
    probs = masked_softmax(last_row_scores(query, key, scaling), allowed).mean(1)  # [B, S]
    n = int(image_keys[0].sum())
    return probs[image_keys].reshape(probs.shape[0], n)


# --------------------------------------------------------------------------- the attention function


def last_row_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs):
    """SDPA (with MedAlign's capture where marked), then the last-row work the state asks for."""
    out, weights = medalign_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
    state: LastRowState | None = getattr(module, _STATE_ATTR, None)
    layer = getattr(module, "layer_idx", None)
    boost = state is not None and state.boost and layer in state.layers and state.alpha != 0
    if state is None or not (boost or state.capture):
        return out, weights
    b, s = query.shape[0], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with torch.autocast(device_type=query.device.type, enabled=False):
        allowed = last_row_allowed(attention_mask, b, s).to(query.device)
        image_keys = state.key_mask(s).to(query.device)
        if state.capture:
            state.captured[int(layer)] = image_attention(query, key, allowed, image_keys, scale)
        if boost:
            row = boosted_last_row(query, key, value, allowed, image_keys, float(state.alpha), scale)
            out = out.clone()
            out[:, -1] = row.to(out.dtype)  # out: [B, T, H, D]
    return out, weights


_registered = False


def register() -> None:
    """Register :data:`IMPL` with the attention and the attention-mask interfaces (once)."""
    global _registered
    if not _registered:
        AttentionInterface.register(IMPL, last_row_attention_forward)
        AttentionMaskInterface.register(IMPL, sdpa_mask)
        _registered = True


@contextlib.contextmanager
def last_row_attention(model: nn.Module, state: LastRowState) -> Iterator[LastRowState]:
    """Inside, the language model runs on :data:`IMPL` with ``state`` attached to every layer; the
    previous attention implementation and the layers' previous state are restored on exit.

    :data:`IMPL` computes with SDPA whatever the student was loaded with (``sdpa``, MedAlign's
    capture ``medalign_sdpa``; an ``eager`` or flash student gives the same attention up to rounding).
    """
    base = unwrap(model)
    layers = decoder_layers(base)
    register()
    previous = base.config.text_config._attn_implementation
    mods = [layer.self_attn for layer in layers]
    before = [getattr(m, _STATE_ATTR, None) for m in mods]
    for m in mods:
        setattr(m, _STATE_ATTR, state)
    if previous != IMPL:
        base.set_attn_implementation({"text_config": IMPL})
    try:
        yield state
    finally:
        for m, prev in zip(mods, before):
            if prev is None:
                delattr(m, _STATE_ATTR)
            else:
                setattr(m, _STATE_ATTR, prev)
        if previous != IMPL:
            base.set_attn_implementation({"text_config": previous})


# --------------------------------------------------------------------------- module outputs


@contextlib.contextmanager
def recorded_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside, each module's latest forward output is kept under its name (forward hooks, removed on exit)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in modules.items():
        def hook(_m, _args, output, name=name):
            out[name] = output[0] if isinstance(output, tuple) else output
        handles.append(mod.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
