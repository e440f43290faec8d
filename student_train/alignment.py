"""The student-side MedAlign modules: the rotation ``W`` and the ``layers[l]`` attention capture.

Both live inside an unmodified transformers ``LlavaForConditionalGeneration``:

* :class:`Rotation` holds ``W`` (d x d, fp32, zeros). A forward hook on ``layers[l-1]`` replaces
  the hidden states of the visual positions by ``X~ = X + eps * X W^T`` (computed in fp32, cast
  back to the hidden dtype). The visual positions are taken per sample from ``input_ids ==
  image_token_id`` by a forward pre-hook on the ``LlavaModel`` (so any batch size and any image
  offset work). A forward whose ``input_ids`` hold no image token, or whose KV cache already holds
  positions (a decoding step, even one that generated the image token id), is left untouched, as is
  a forward without ``input_ids``, except inside
  :func:`visual_positions`, which names the image positions of a forward fed ``inputs_embeds``
  (a decoding method's branch that edits the embeddings: W applies exactly as at a plain prefill).
* The attention capture is an attention function registered with transformers'
  ``AttentionInterface`` *and* ``AttentionMaskInterface`` (without the mask registration the mask
  silently arrives as ``None``) under :data:`ATTN_IMPL`. It returns the normal SDPA output for
  every layer; for the one attention module marked by :func:`install` (``layers[l].self_attn``)
  and only while :attr:`AlignState.query_mask` is set, it also computes the attention
  probabilities of the requested query rows (per sample) to the sample's N visual key columns,
  averaged over heads, from those rows alone (never the T x T matrix). A module may also carry a
  per-head capture (:data:`HEAD_CAPTURE_ATTR`, A3Tune's, in every layer:
  :mod:`student_train.head_attention`), called with the same query / key / mask.

Gradient checkpointing recomputes the layer (and so both hooks and the attention function) during
backward: the state read by them (positions, query mask) must not change between the forward and
the backward of a step: :func:`student_train.model.compute_losses` sets it before the forward
and leaves it until its next call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from shared.errors import MedAlignError

#: Name of the attention implementation registered by this module.
ATTN_IMPL = "medalign_sdpa"

_CAPTURE_ATTR = "_medalign_capture_state"
#: Attribute of an attention module holding a per-layer head capture (student_train/head_attention.py):
#: any object with ``capture(query, key, attention_mask, scaling)``, called before the SDPA output.
HEAD_CAPTURE_ATTR = "_medalign_head_capture"


class Rotation(nn.Module):
    """The trainable rotation of Eq. 1: ``X~ = X + eps * X W^T`` (W: d x d, fp32, zeros at init)."""

    def __init__(self, hidden_size: int, eps: float = 1.0):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.zeros(hidden_size, hidden_size, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [P, d] any float dtype -> [P, d] fp32 rows ``x + eps * x W^T`` (maths in fp32)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            return xf + self.eps * (xf @ self.weight.float().t())


@dataclass
class AlignState:
    """Per-forward state shared by the hooks and the attention function.

    Attributes:
        image_token_id: the image placeholder id.
        visual_mask: [B, T] bool, positions holding the image token in the current forward
            (None when the forward has no ``input_ids`` or no image token).
        store_rotated: keep ``rotated`` (the visual rows of ``X~``) for ``L_vis``.
        rotated: [sum of visual positions, d] fp32 rows of X~ in batch-major order.
        query_mask: [B, T] bool query rows for the capture; None disables the capture.
        attn: [B, N] fp32 head-averaged attention of the query rows to the visual keys, averaged
            over each sample's query rows (0 for a sample with no query row).
        attn_rows: [B] long, the number of query rows per sample.
    """

    image_token_id: int
    visual_mask: torch.Tensor | None = None
    store_rotated: bool = False
    rotated: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    attn_rows: torch.Tensor | None = None
    embeds_mask: torch.Tensor | None = None
    """[B, T] bool image positions for forwards WITHOUT ``input_ids`` (set by :func:`visual_positions`)."""

    def clear_outputs(self) -> None:
        self.rotated = None
        self.attn = None
        self.attn_rows = None


@dataclass
class AlignHandles:
    """What :func:`install` attached to a model (kept on the model as ``_medalign``)."""

    state: AlignState
    layer: int
    rotation: Rotation | None
    capture: bool
    hooks: list = field(default_factory=list)


# --------------------------------------------------------------------------- attention function


def key_mask_rows(
    attention_mask: torch.Tensor | None, rows: torch.Tensor, q_len: int, kv_len: int
) -> torch.Tensor:
    """Allowed-key mask of the selected query rows.

    Args:
        attention_mask: None (pure causal), bool [B|1, 1|H, T, S] (True = attend) or additive
            float of that shape, as built by ``sdpa_mask``.
        rows: [B, R] long query positions.
    Returns:
        [B, 1, R, S] bool.
    """
    b, r = rows.shape
    if attention_mask is None:
        offset = kv_len - q_len
        keys = torch.arange(kv_len, device=rows.device)
        return (keys[None, None, :] <= rows[:, :, None] + offset)[:, None]
    m = attention_mask
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    m = m[:, :1].expand(b, 1, m.shape[2], m.shape[3])
    idx = rows[:, None, :, None].expand(b, 1, r, m.shape[3])
    return torch.gather(m, 2, idx)


def capture_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    query_mask: torch.Tensor,
    visual_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-averaged attention of each sample's query rows to its visual keys.

    Args:
        query: [B, H, T, D]; key: [B, Hkv, S, D] (H a multiple of Hkv, GQA handled without
            repeating the keys).
        attention_mask: as given to the attention function (see :func:`key_mask_rows`).
        scaling: the softmax scale.
        query_mask: [B, T] bool, the query rows per sample.
        visual_mask: [B, S] bool with the same number N of True entries in every row.
    Returns:
        (m_a [B, N] fp32, rows [B] long): the probabilities averaged over heads and over the
        sample's query rows (zeros for a sample without a query row), and the row counts.
    """
    b, h, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    counts = query_mask.sum(1)
    r = max(int(counts.max().item()), 1) if b else 1
    # Row positions per sample, padded with position 0 (masked out of the mean below).
    order = torch.sort((~query_mask).to(torch.int8), dim=1, stable=True).indices[:, :r]
    valid = torch.arange(r, device=query.device)[None, :] < counts[:, None]  # [B, R]
    rows = torch.where(valid, order, torch.zeros_like(order))
    n_vis = visual_mask.sum(1)
    n = int(n_vis[0].item())
    if not bool((n_vis == n).all()):
        raise ValueError(f"every sample needs the same number of image tokens, got {n_vis.tolist()}")
    vis_cols = torch.sort((~visual_mask).to(torch.int8), dim=1, stable=True).indices[:, :n]  # [B, N]

    q_sel = torch.gather(query, 2, rows[:, None, :, None].expand(b, h, r, d))  # [B, H, R, D]
    g = h // hkv
    q_sel = q_sel.reshape(b, hkv, g * r, d).float()
    scores = (q_sel @ key.float().transpose(-1, -2)) * scaling  # [B, Hkv, G*R, S]
    scores = scores.reshape(b, h, r, s)
    allowed = key_mask_rows(attention_mask, rows, t, s)  # [B, 1, R, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked padding rows
    vis = torch.gather(probs, 3, vis_cols[:, None, None, :].expand(b, h, r, n))  # [B, H, R, N]
    vis = vis.mean(1)  # [B, R, N]
    vis = vis * valid[:, :, None].to(vis.dtype)
    m_a = vis.sum(1) / counts.clamp(min=1)[:, None].to(vis.dtype)
    return m_a, counts


def medalign_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """SDPA attention for every layer, plus the query-row capture at the marked module (and the
    per-head capture of :mod:`student_train.head_attention` where one is attached)."""
    head_capture = getattr(module, HEAD_CAPTURE_ATTR, None)
    if head_capture is not None:
        head_capture.capture(query, key, attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5)
    state: AlignState | None = getattr(module, _CAPTURE_ATTR, None)
    if (
        state is not None
        and state.query_mask is not None
        and state.visual_mask is not None
        and state.query_mask.shape == (query.shape[0], query.shape[2])
        and state.visual_mask.shape[1] == key.shape[2]
    ):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        with torch.autocast(device_type=query.device.type, enabled=False):  # fp32 softmax
            state.attn, state.attn_rows = capture_query_attention(
                query, key, attention_mask, scale, state.query_mask, state.visual_mask
            )
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


_registered = False


def register_attention() -> None:
    """Register :data:`ATTN_IMPL` with both the attention and the attention-mask interfaces, once
    (called by :func:`install` when a capture is installed; importing this module registers nothing)."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_IMPL, medalign_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
        _registered = True


# --------------------------------------------------------------------------- install


def unwrap(model: nn.Module) -> nn.Module:
    """The ``LlavaForConditionalGeneration`` inside a DDP / PeftModel wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = unwrap(model)
    try:
        return base.model.language_model.layers
    except AttributeError as e:
        raise MedAlignError(
            f"{type(base).__name__} is not a transformers LLaVA model (no model.language_model.layers)"
        ) from e


def check_layer(layer: int, num_layers: int) -> None:
    """Raise a MedAlignError unless 1 <= layer <= num_layers - 1."""
    if not (1 <= layer <= num_layers - 1):
        raise MedAlignError(
            f"--align-layer {layer} is out of range: the student has {num_layers} decoder layers, "
            f"valid values are 1..{num_layers - 1}"
        )


def get_handles(model: nn.Module) -> AlignHandles | None:
    return getattr(unwrap(model), "_medalign", None)


def install(
    model: nn.Module,
    layer: int,
    eps: float = 1.0,
    *,
    rotation: bool = True,
    capture: bool = True,
    weight: torch.Tensor | None = None,
) -> AlignHandles:
    """Install the rotation on ``layers[layer-1]`` and the attention capture at ``layers[layer]``.

    Args:
        model: a ``LlavaForConditionalGeneration`` (possibly inside a PeftModel / DDP).
        layer: 0-based index ``l`` (1..num_layers-1).
        eps: the rotation scale.
        rotation: install ``W`` (kept as ``layers[l-1].medalign_rotation``, fp32 zeros, trainable).
        capture: switch the language model to :data:`ATTN_IMPL` and mark ``layers[l].self_attn``.
        weight: optional [d, d] initial W (e.g. loaded from ``rotation.safetensors``).
    Returns:
        the handles, also stored on the model as ``_medalign`` (installing twice is an error).
    """
    base = unwrap(model)
    if getattr(base, "_medalign", None) is not None:
        raise RuntimeError("MedAlign modules are already installed on this model")
    layers = decoder_layers(base)
    check_layer(layer, len(layers))
    state = AlignState(image_token_id=int(base.config.image_token_id))
    handles = AlignHandles(state=state, layer=layer, rotation=None, capture=capture)

    def pre_hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state.clear_outputs()
        if ids is None:
            em = state.embeds_mask
            state.visual_mask = em if em is not None and bool(em.any()) else None
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 calls it ``cache``
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            # a decoding step: its tokens were generated, and a generated image token id is a token,
            # not an image position (the prompt's image positions were rotated at the prefill)
            state.visual_mask = None
            return None
        vm = ids == state.image_token_id
        state.visual_mask = vm if bool(vm.any()) else None
        return None

    handles.hooks.append(base.model.register_forward_pre_hook(pre_hook, with_kwargs=True))

    if rotation:
        d = base.config.text_config.hidden_size
        first_param = next(layers[layer - 1].parameters())
        rot = Rotation(d, eps).to(first_param.device)
        if weight is not None:
            if tuple(weight.shape) != (d, d):
                raise MedAlignError(f"rotation W has shape {tuple(weight.shape)}, the student needs ({d}, {d})")
            with torch.no_grad():
                rot.weight.copy_(weight.float())
        layers[layer - 1].add_module("medalign_rotation", rot)
        handles.rotation = rot

        def rotate_hook(_module, _args, output):
            vm = state.visual_mask
            hidden = output[0] if isinstance(output, tuple) else output
            if vm is None or vm.shape != hidden.shape[:2]:
                return None
            rotated = rot(hidden[vm])  # [P, d] fp32 rotated visual rows, batch-major
            if state.store_rotated:
                state.rotated = rotated
            new = hidden.masked_scatter(vm[..., None], rotated.to(hidden.dtype))
            if isinstance(output, tuple):
                return (new,) + tuple(output[1:])
            return new

        handles.hooks.append(layers[layer - 1].register_forward_hook(rotate_hook))

    if capture:
        register_attention()
        base.set_attn_implementation({"text_config": ATTN_IMPL})
        if base.config.text_config._attn_implementation != ATTN_IMPL:
            raise RuntimeError("could not switch the language model to the MedAlign attention function")
        setattr(layers[layer].self_attn, _CAPTURE_ATTR, state)

    object.__setattr__(base, "_medalign", handles)
    return handles


@contextlib.contextmanager
def visual_positions(model: nn.Module, mask: torch.Tensor | None) -> Iterator[None]:
    """Inside, a forward fed ``inputs_embeds`` (no ``input_ids``) treats ``mask`` ([B, T] bool) as its
    image positions: the rotation W acts on them exactly as on the ``input_ids == image_token_id``
    positions of a plain prefill. A no-op for a model without the MedAlign modules."""
    handles = get_handles(model)
    if handles is None or mask is None:
        yield
        return
    previous = handles.state.embeds_mask
    handles.state.embeds_mask = mask.to(torch.bool)
    try:
        yield
    finally:
        handles.state.embeds_mask = previous


def capture_attention(model: nn.Module, layer: int, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``M_a`` at ``layers[layer]`` for one forward, through the capture training uses.

    For analysis (the attention figure, any later study) at any layer: the layer is marked with a
    temporary capture state, the language model runs on :data:`ATTN_IMPL` (SDPA plus the query-row
    capture of :func:`capture_query_attention`) for this forward only, and both are restored after.
    A rotation W installed on the model applies as in every forward.

    Returns:
        (m_a [B, N] fp32, rows [B] long), as :func:`capture_query_attention`.
    """
    base = unwrap(model)
    layers = decoder_layers(base)
    if not 0 <= layer < len(layers):
        raise MedAlignError(f"--layer {layer} is out of range: the student has {len(layers)} decoder layers "
                            f"(valid 0..{len(layers) - 1})")
    register_attention()
    state = AlignState(image_token_id=int(base.config.image_token_id))
    state.visual_mask = input_ids == state.image_token_id
    state.query_mask = query_mask.to(torch.bool)
    module = layers[layer].self_attn
    previous_state = getattr(module, _CAPTURE_ATTR, None)
    previous_impl = base.config.text_config._attn_implementation
    setattr(module, _CAPTURE_ATTR, state)
    base.set_attn_implementation({"text_config": ATTN_IMPL})
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False)
    finally:
        if previous_state is None:
            delattr(module, _CAPTURE_ATTR)
        else:
            setattr(module, _CAPTURE_ATTR, previous_state)
        base.set_attn_implementation({"text_config": previous_impl})
    if state.attn is None:
        raise RuntimeError("the attention capture did not run (is the capture layer reached?)")
    return state.attn, state.attn_rows
