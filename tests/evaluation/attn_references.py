"""Independent references for the PAI, DAMRO and AVISC tests: straightforward per-step loops.

One question at a time, no padding, no KV cache: every step is a FULL forward over the prompt and the
answer so far, on the student WITHOUT the run's modules; W is added to the image rows of every such
forward by the independent hook ``decoding_helpers.rotated``. The attention interventions are an eager attention function written here (the whole
T x T matrix, its own causal mask), the vision statistics are recomputed from the tower's hidden
states and the layer weights, and the image positions are looked up in the prompt's token list. None
of this uses the code under test (evaluation.decoding.pai / damro / avisc / _hooks).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from decoding_helpers import LAYER, rotated
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

REF_IMPL = "test_reference_eager"


class RefAttention:
    """An eager attention (full matrix) with PAI's boost on chosen rows and a probability capture.

    ``boost_from``: query rows at positions >= it get ``s + alpha |s|`` at ``image_cols`` in the
    layers ``layers``; ``capture``: keep every layer's probabilities [H, T, S] in ``probs``.
    """

    def __init__(self):
        self.image_cols: list[int] = []
        self.layers: range = range(0)
        self.alpha = 0.0
        self.boost_from: int | None = None
        self.capture = False
        self.probs: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        _b, h, t, d = query.shape
        s = key.shape[2]
        rep = h // key.shape[1]
        k = key.repeat_interleave(rep, dim=1).float()
        v = value.repeat_interleave(rep, dim=1).float()
        scale = scaling if scaling is not None else d ** -0.5
        scores = query.float() @ k.transpose(-1, -2) * scale  # [1, H, T, S]
        layer = module.layer_idx
        if self.boost_from is not None and layer in self.layers and self.alpha:
            for row in range(t):
                pos = s - t + row
                if pos >= self.boost_from:
                    for c in self.image_cols:
                        x = scores[:, :, row, c]
                        scores[:, :, row, c] = x + self.alpha * x.abs()
        qpos = torch.arange(s - t, s)[:, None]
        causal = torch.arange(s)[None, :] <= qpos
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        if self.capture:
            self.probs[layer] = probs[0].clone()
        out = probs @ v  # [1, H, T, D]
        return out.transpose(1, 2).to(query.dtype), None


REF = RefAttention()
AttentionInterface.register(REF_IMPL, REF)
AttentionMaskInterface.register(REF_IMPL, sdpa_mask)


class on_reference_attention:
    """Inside, the language model runs on :data:`REF_IMPL`."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.previous = self.model.config.text_config._attn_implementation
        self.model.set_attn_implementation({"text_config": REF_IMPL})
        return REF

    def __exit__(self, *exc):
        self.model.set_attn_implementation({"text_config": self.previous})
        REF.__init__()


# --------------------------------------------------------------------------- forwards


def _rows(n: int, positions: list[int]) -> torch.Tensor:
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, positions] = True
    return mask


@torch.no_grad()
def logits_ids(model, ids: list[int], pixels: torch.Tensor | None, w: torch.Tensor | None = None,
               image_id: int | None = None) -> torch.Tensor:
    """Last-position logits [V] fp32 of one full forward on token ids (+ one image [1, 3, S, S]);
    ``w``: W added to the rows holding ``image_id``."""
    if w is None:
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=False).logits[0, -1].float()
    with rotated(model, w, LAYER, _rows(len(ids), [i for i, t in enumerate(ids) if t == image_id])):
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=False).logits[0, -1].float()


@torch.no_grad()
def logits_embeds(model, embeds: torch.Tensor, image_positions: list[int], w: torch.Tensor) -> torch.Tensor:
    """Last-position logits [V] fp32 of one full forward on ``inputs_embeds`` [1, T, d], W added to
    the rows ``image_positions``."""
    with rotated(model, w, LAYER, _rows(embeds.shape[1], image_positions)):
        return model(inputs_embeds=embeds, use_cache=False).logits[0, -1].float()


def embed_with_features(model, ids: list[int], image_positions: list[int], features: torch.Tensor) -> torch.Tensor:
    """Token embeddings of ``ids`` [1, T, d] with ``features`` [n, d] written at ``image_positions``."""
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor([ids])).clone()
        for j, p in enumerate(image_positions):
            emb[0, p] = features[j].to(emb.dtype)
    return emb


def vision_features(model, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the tower's hidden states, the projected patch features [N, d]) of one image."""
    with torch.no_grad():
        hs = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        feats = model.model.multi_modal_projector(hs[-2][:, 1:])[0]
    return list(hs), feats


def cutoff(scores: torch.Tensor, main: torch.Tensor, beta: float) -> torch.Tensor:
    """-inf where the main branch's probability is below beta x its top probability."""
    p = torch.softmax(main, -1)
    return scores.masked_fill(p < beta * p.max(), float("-inf"))


def greedy_loop(next_scores: Callable[[list[int]], torch.Tensor], max_new: int, eos: list[int]) -> list[int]:
    """Argmax of ``next_scores(answer so far)`` until an EOS id (excluded) or ``max_new`` tokens."""
    answer: list[int] = []
    for _ in range(max_new):
        tok = int(torch.argmax(next_scores(answer)))
        if tok in eos:
            break
        answer.append(tok)
    return answer


# --------------------------------------------------------------------------- the three methods


def pai_reference(model, w, prompt: list[int], pixels: torch.Tensor, image_id: int, *, alpha: float, gamma: float,
                  beta: float, start_layer: int, max_new: int, eos: list[int]) -> list[int]:
    """PAI, no cache: the rows of the last prompt token and of every answer token are boosted (each
    of them was the last row of its own forward in a cached run), in layers [start_layer, L)."""
    image_cols = [i for i, t in enumerate(prompt) if t == image_id]
    text = [t for t in prompt if t != image_id]
    n_layers = model.config.text_config.num_hidden_layers

    def scores(answer: list[int]) -> torch.Tensor:
        with on_reference_attention(model) as ref:
            ref.image_cols, ref.layers, ref.alpha = image_cols, range(start_layer, n_layers), alpha
            ref.boost_from = len(prompt) - 1
            lc = torch.log_softmax(logits_ids(model, prompt + answer, pixels, w, image_id), -1)
        if gamma == 1:
            return lc
        lu = torch.log_softmax(logits_ids(model, text + answer, None), -1)
        return cutoff(gamma * (lc - lu) + lu, lc, beta)

    return greedy_loop(scores, max_new, eos)


def damro_reference(model, w, prompt: list[int], pixels: torch.Tensor, image_id: int, *, alpha: float, beta: float,
                    k: int, max_new: int, eos: list[int]) -> list[int]:
    """DAMRO: the CLS row of softmax(q k^T / sqrt(C)) of the vision layer -2 (its input is the hidden
    state before it, through its layer norm), the K best patches (best first) as the only image
    tokens of the negative prompt."""
    hs, feats = vision_features(model, pixels)
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    with torch.no_grad():
        x = layer.layer_norm1(hs[-3])[0]  # [1 + N, C]
        q, kk = layer.self_attn.q_proj(x).float(), layer.self_attn.k_proj(x).float()
        attn = torch.softmax(q @ kk.T / math.sqrt(q.shape[-1]), dim=-1)
    cls = attn[0, 1:]
    best = sorted(range(len(cls)), key=lambda j: -float(cls[j]))[:k]
    neg_prompt, seen = [], 0
    for t in prompt:
        if t == image_id:
            seen += 1
            if seen > k:
                continue
        neg_prompt.append(t)
    neg_cols = [i for i, t in enumerate(neg_prompt) if t == image_id]

    def scores(answer: list[int]) -> torch.Tensor:
        lm = logits_ids(model, prompt + answer, pixels, w, image_id)
        ln = logits_embeds(model, embed_with_features(model, neg_prompt + answer, neg_cols, feats[best]), neg_cols, w)
        return cutoff((1 + alpha) * lm - alpha * ln, lm, beta)

    return greedy_loop(scores, max_new, eos)


def avisc_reference(model, w, prompt: list[int], pixels: torch.Tensor, image_id: int, *, alpha: float, beta: float,
                    gamma: float, lamb: float, max_new: int, eos: list[int]) -> list[int]:
    """AVISC: per layer the head-mean attention of the last prompt token to the image tokens (full
    eager probabilities); the fewest layers whose share reaches gamma; blind = mean over them >=
    mean + lambda std; the negative prompt keeps only the blind image embeddings (others zero)."""
    image_cols = [i for i, t in enumerate(prompt) if t == image_id]
    with on_reference_attention(model) as ref:
        ref.capture = True
        logits_ids(model, prompt, pixels, w, image_id)
        probs = dict(ref.probs)
    att = [probs[l].mean(0)[-1, image_cols] for l in sorted(probs)]  # L x [N]
    total = sum(float(a.sum()) for a in att)
    shares = sorted(((float(a.sum()) / total, l) for l, a in enumerate(att)), reverse=True)
    chosen, cum = [], 0.0
    for share, l in shares:
        chosen.append(l)
        cum += share
        if cum >= gamma:
            break
    img = torch.stack([att[l] for l in chosen]).mean(0)
    blind = img >= img.mean() + lamb * img.std()
    _, feats = vision_features(model, pixels)
    kept = feats * blind[:, None].to(feats.dtype)

    def scores(answer: list[int]) -> torch.Tensor:
        lm = logits_ids(model, prompt + answer, pixels, w, image_id)
        ln = logits_embeds(model, embed_with_features(model, prompt + answer, image_cols, kept), image_cols, w)
        if not bool(torch.isfinite(ln).all()):
            ln = lm
        return cutoff((1 + alpha) * lm - alpha * ln, lm, beta)

    return greedy_loop(scores, max_new, eos)
