"""A3Tune's attention capture: every layer, every head, the query rows only.

The capture rides on MedAlign's attention function (:data:`student_train.alignment.ATTN_IMPL`:
SDPA for the output of every layer, registered with both ``AttentionInterface`` and
``AttentionMaskInterface``). :func:`install_head_capture` attaches a :class:`_LayerCapture` to every
decoder layer's ``self_attn`` (:data:`~student_train.alignment.HEAD_CAPTURE_ATTR`); while
:attr:`HeadCaptureState.rows` and :attr:`HeadCaptureState.visual_mask` are set, each layer computes,
from the query rows alone (never the T x T matrix, never ``output_attentions``):

* the per-head probabilities of the R rows to all S keys, ``softmax(q_r k^T * scale + mask)`` in fp32;
* ``ratio[b, h]`` = (mass of the rows on the image keys) / (total mass of the rows), detached
  (the authors' visual attention ratio, ``calculate_top_attention_loss`` in LLaVA-Med v1 utils.py);
* ``maps[b, h, r, n]`` = the probabilities restricted to the N image keys, graph kept (for the loss).

Memory (what the loss needs, per layer): the maps ``[B, H, R, N]`` fp32 and autograd's saved
softmax output ``[B, H, R, S]`` fp32 (plus the gathered fp32 query rows and keys). For the 7B student
(32 layers x 32 heads, N = 576, S ~ 700) and R ~ 60 rows after the image that is ~4.4 MB + ~5.4 MB
per layer and sample, ~320 MB per sample for all 32 layers; the eager whole-model path keeps the
full ``[B, H, T, T]`` probabilities of every layer instead (~63 MB per layer and sample at T = 700,
~2 GB for 32 layers, plus the eager kernels' own intermediates).

Gradient checkpointing recomputes the layer (and this capture) during backward; the state read here
(rows, visual mask) must not change between the forward and the backward of a step, as MedAlign's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from student_train import alignment
from student_train.alignment import HEAD_CAPTURE_ATTR, decoder_layers, key_mask_rows, unwrap


@dataclass
class HeadCaptureState:
    """The inputs and outputs of one forward's per-head capture.

    Attributes:
        rows: [B, T] bool, the query rows (A3Tune: every real token after the image); None: off.
        visual_mask: [B, T] bool, the image positions (the same number N in every sample).
        ratios: layer index -> [B, H] fp32 visual ratio (detached).
        maps: layer index -> [B, H, R, N] fp32 probabilities of the rows on the image keys (graph
            kept; rows past a sample's count are 0).
        row_valid: [B, R] bool, which of the R row slots are real rows of the sample.
    """

    rows: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None
    ratios: dict[int, torch.Tensor] = field(default_factory=dict)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    row_valid: torch.Tensor | None = None

    def clear_outputs(self) -> None:
        self.ratios = {}
        self.maps = {}
        self.row_valid = None

    def stacked_ratios(self, num_layers: int) -> torch.Tensor:
        """[B, L, H] fp32: every layer's ratios (an error when a layer did not capture)."""
        missing = [i for i in range(num_layers) if i not in self.ratios]
        if missing:
            raise RuntimeError(f"the head capture did not run in layer(s) {missing}")
        return torch.stack([self.ratios[i] for i in range(num_layers)], dim=1)


def gather_rows(row_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] bool -> (positions [B, R] long, padded with 0; valid [B, R] bool), R = max rows (>= 1)."""
    counts = row_mask.sum(1)
    r = max(int(counts.max().item()), 1) if row_mask.shape[0] else 1
    order = torch.sort((~row_mask).to(torch.int8), dim=1, stable=True).indices[:, :r]
    valid = torch.arange(r, device=row_mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def image_columns(visual_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] bool with N True per row -> [B, N] long key positions of the image tokens."""
    n_vis = visual_mask.sum(1)
    n = int(n_vis[0].item())
    if not bool((n_vis == n).all()):
        raise ValueError(f"every sample needs the same number of image tokens, got {n_vis.tolist()}")
    return torch.sort((~visual_mask).to(torch.int8), dim=1, stable=True).indices[:, :n]


def head_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    row_mask: torch.Tensor,
    visual_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head attention of each sample's rows, from those rows alone.

    Args:
        query: [B, H, T, D]; key: [B, Hkv, S, D] (GQA without repeating the keys).
        attention_mask: as given to the attention function (:func:`~student_train.alignment.key_mask_rows`).
        scaling: the softmax scale.
        row_mask: [B, T] bool query rows; visual_mask: [B, S] bool image keys (N per sample).
    Returns:
        (ratio [B, H] fp32 detached, maps [B, H, R, N] fp32 with graph, valid [B, R] bool).
    """
    b, h, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    rows, valid = gather_rows(row_mask)
    r = rows.shape[1]
    cols = image_columns(visual_mask)
    n = cols.shape[1]
    q_sel = torch.gather(query, 2, rows[:, None, :, None].expand(b, h, r, d))
    g = h // hkv
    scores = (q_sel.reshape(b, hkv, g * r, d).float() @ key.float().transpose(-1, -2)) * scaling
    scores = scores.reshape(b, h, r, s).masked_fill(~key_mask_rows(attention_mask, rows, t, s), float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # [B, H, R, S]
    maps = torch.gather(probs, 3, cols[:, None, None, :].expand(b, h, r, n))
    maps = maps * valid[:, None, :, None].to(maps.dtype)
    with torch.no_grad():
        w = valid[:, None, :].to(probs.dtype)
        visual = (maps.sum(-1) * w).sum(-1)
        total = (probs.sum(-1) * w).sum(-1)
        ratio = torch.where(total > 0, visual / total.clamp(min=torch.finfo(torch.float32).tiny),
                            torch.zeros_like(total))
    return ratio, maps, valid


class _LayerCapture:
    """The capture of one layer (attached to its ``self_attn``; called by the attention function)."""

    def __init__(self, state: HeadCaptureState, index: int):
        self.state = state
        self.index = index

    def capture(self, query, key, attention_mask, scaling) -> None:
        st = self.state
        if st.rows is None or st.visual_mask is None:
            return
        if st.rows.shape != (query.shape[0], query.shape[2]) or st.visual_mask.shape[1] != key.shape[2]:
            return  # not the forward the state was set for (e.g. a decoding step)
        with torch.autocast(device_type=query.device.type, enabled=False):  # fp32 softmax
            ratio, maps, valid = head_query_attention(query, key, attention_mask, scaling, st.rows, st.visual_mask)
        st.ratios[self.index] = ratio
        st.maps[self.index] = maps
        st.row_valid = valid


def install_head_capture(model: nn.Module) -> HeadCaptureState:
    """Switch the language model to :data:`~student_train.alignment.ATTN_IMPL` and attach the
    per-head capture to every decoder layer; returns the state (kept on the model as ``_a3_heads``)."""
    base = unwrap(model)
    if getattr(base, "_a3_heads", None) is not None:
        raise RuntimeError("the A3Tune head capture is already installed on this model")
    alignment.register_attention()
    base.set_attn_implementation({"text_config": alignment.ATTN_IMPL})
    if base.config.text_config._attn_implementation != alignment.ATTN_IMPL:
        raise RuntimeError("could not switch the language model to the MedAlign attention function")
    state = HeadCaptureState()
    for i, layer in enumerate(decoder_layers(base)):
        setattr(layer.self_attn, HEAD_CAPTURE_ATTR, _LayerCapture(state, i))
    object.__setattr__(base, "_a3_heads", state)
    return state


def get_head_capture(model: nn.Module) -> HeadCaptureState | None:
    return getattr(unwrap(model), "_a3_heads", None)


def rows_after_image(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, T] bool: the real (attention_mask 1) positions after each sample's last image token --
    the question and the teacher-forced answer, the rows of the authors' ratio and loss."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    is_img = input_ids == image_token_id
    last = torch.where(is_img, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
    return attention_mask.to(torch.bool) & (pos > last) & (last >= 0)
