"""A3Tune's head selection and both losses against an independent eager-attention computation.

The reference here is written the authors' way (``calculate_top_attention_loss``): the tiny
student runs on eager attention with ``output_attentions=True`` (in this test only), one sample at
a time; the visual ratio of every (layer, head) over the rows after the image, the top heads by a
Python sort, their maps ``(A * onehot).mean(0).mean(0)`` over all layers and heads, then the
squared / KL loss per mask summed over the masks. The implementation (the query-row capture on
SDPA) must give the same ratios, the same heads, the same loss and the same gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from student_train.a3_losses import a3_att_loss, select_heads
from student_train.alignment import ATTN_IMPL, unwrap
from student_train.config import A3Args, LoraArgs, TrainConfig
from student_train.head_attention import get_head_capture
from student_train.methods import get_method
from student_train.methods.a3tune import compute_a3_losses
from student_train.model import load_student

TOP = 5


def _cfg(loss: str, top: int = TOP) -> TrainConfig:
    return TrainConfig.from_flat(dict(method="a3tune", cache="unused", model="m", data="d", image_root="i", out="o",
                                      a3_top_heads=top, a3_loss=loss, a3_lambda=0.5, lora_r=4, lora_dropout=0.0,
                                      a3_moe=False))  # the heads and losses of plain LoRA (MoE: test_a3moe*)


def _student(path, loss: str, top: int = TOP, seed: int = 0):
    model, _ = load_student(path)
    cfg = _cfg(loss, top)
    peft = get_method("a3tune").prepare(model, cfg, train_projector=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero LoRA weights, so the adapter changes the attention
        for _, p in peft.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    peft.eval()
    return peft, cfg


def _with_labels(batch: dict, ks: list[int], n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    kmax = max(ks)
    labels = torch.zeros(len(ks), kmax, n)
    mask = torch.zeros(len(ks), kmax, dtype=torch.bool)
    for b, k in enumerate(ks):
        m = (torch.rand(k, n, generator=g) < 0.3).float()
        m[:, 0] = 1.0
        labels[b, :k] = m
        mask[b, :k] = True
    return {**batch, "a3_labels": labels, "a3_label_mask": mask}


def reference_loss(model, batch: dict, b: int, loss: str, top: int):
    """The authors' computation on sample ``b`` alone: (loss, ratios [L, H], top (layer, head) list)."""
    base = unwrap(model)
    n_img = int((batch["input_ids"][b] == base.config.image_token_id).sum())
    length = int(batch["attention_mask"][b].sum())
    ids = batch["input_ids"][b : b + 1, :length]
    start = int((ids[0] == base.config.image_token_id).nonzero()[0])
    previous = base.config.text_config._attn_implementation
    base.set_attn_implementation({"text_config": "eager"})
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"][b : b + 1],
                    output_attentions=True, use_cache=False)
    finally:
        base.set_attn_implementation({"text_config": previous})
    att = torch.cat(out.attentions, dim=0).float()  # [L, H, T, T]
    after = start + n_img
    visual = att[:, :, after:, start:after].sum(dim=(-1, -2))
    total = att[:, :, after:, :].sum(dim=(-1, -2))
    ratios = (visual / total).detach()
    layers, heads = ratios.shape
    flat = [(float(ratios[i, j]), i, j) for i in range(layers) for j in range(heads)]
    chosen = [(i, j) for _, i, j in sorted(flat, key=lambda x: x[0], reverse=True)[:top]]
    onehot = torch.zeros(layers, heads)
    for i, j in chosen:
        onehot[i, j] = 1
    a = (att * onehot[:, :, None, None]).mean(0).mean(0)[after:, start:after]  # [R, N]
    r = a.shape[0]
    masks = batch["a3_labels"][b][batch["a3_label_mask"][b]]
    total_loss = torch.zeros(())
    for m in masks:
        if loss == "squared":
            act = (a * m).sum(-1) / a.sum(-1)
            total_loss = total_loss + torch.mean((1 - act) ** 2)
        else:
            a_norm = a / (a.sum(-1, keepdim=True) + 1e-8)
            m_norm = m / (m.sum() + 1e-8)
            total_loss = total_loss + F.kl_div(a_norm.log(), m_norm[None].repeat(r, 1), reduction="batchmean")
    return total_loss, ratios, sorted(chosen)


@pytest.mark.parametrize("loss", ["squared", "kl"])
def test_ratios_heads_loss_and_gradients_match_eager(tiny_llama_dir, tiny_make_batch, loss):
    model, cfg = _student(tiny_llama_dir, loss)
    n = 16
    raw = tiny_make_batch(unwrap(model), [30], [3], n_query=4)
    batch = _with_labels(raw, [3], n)
    params = [p for _, p in model.named_parameters() if p.requires_grad]

    terms = compute_a3_losses(model, batch, cfg.a3)
    state = get_head_capture(model)
    ratios = state.stacked_ratios(4)[0]
    got_heads = sorted((int(i), int(j)) for i, j in select_heads(ratios[None], TOP)[0].nonzero())
    grads = torch.autograd.grad(terms["a3_att_loss"], params, allow_unused=True)

    ref, ref_ratios, ref_heads = reference_loss(model, batch, 0, loss, TOP)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)

    assert torch.allclose(ratios, ref_ratios, atol=1e-6)
    assert got_heads == ref_heads
    assert torch.allclose(terms["a3_att_loss"], ref, rtol=1e-5, atol=1e-7), (terms["a3_att_loss"], ref)
    assert float(ref.detach()) > 0
    nonzero = 0
    scale = max(float(rg.abs().max()) for rg in ref_grads if rg is not None)
    for g, rg in zip(grads, ref_grads):
        g = torch.zeros(()) if g is None else g
        rg = torch.zeros(()) if rg is None else rg
        # float32 on both sides; the KL's 1/q amplifies rounding (up to ~2e-5 of the largest gradient
        # seen, depending on the fixture's random weights); a wrong formula is off by O(scale)
        assert torch.allclose(g, rg, rtol=1e-3, atol=1e-4 * scale), float((g - rg).abs().max())
        nonzero += int(bool((rg != 0).any()))
    assert nonzero > 0
    assert unwrap(model).config.text_config._attn_implementation == ATTN_IMPL


@pytest.mark.parametrize("loss", ["squared", "kl"])
def test_batched_equals_per_sample(tiny_mistral_dir, tiny_make_batch, loss):
    model, cfg = _student(tiny_mistral_dir, loss, top=7)
    n = 16
    # different lengths (right padding), image offsets and mask counts; sample 2 has no masks
    raw = tiny_make_batch(unwrap(model), [34, 26, 30], [5, 2, 8], n_query=[3, 4, 2], seed=3)
    batch = _with_labels(raw, [2, 3, 0], n, seed=4)
    batched = compute_a3_losses(model, batch, cfg.a3)["a3_att_loss"]
    ratios_b = get_head_capture(model).stacked_ratios(4)
    per_sample = []
    for b in range(3):
        length = int(batch["attention_mask"][b].sum())
        one = {k: (v[b : b + 1, :length] if v.dim() == 2 and v.shape[1] == batch["input_ids"].shape[1]
                   else v[b : b + 1]) for k, v in batch.items()}
        if not bool(one["a3_label_mask"].any()):
            per_sample.append(torch.zeros(()))
            continue
        per_sample.append(compute_a3_losses(model, one, cfg.a3)["a3_att_loss"])
        assert torch.allclose(get_head_capture(model).stacked_ratios(4)[0], ratios_b[b], atol=1e-6)
        ref, _, _ = reference_loss(model, batch, b, loss, 7)
        assert torch.allclose(per_sample[-1], ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(batched, torch.stack(per_sample).mean(), rtol=1e-5, atol=1e-7)


def test_no_labels_is_a_connected_zero(tiny_llama_dir, tiny_make_batch):
    model, cfg = _student(tiny_llama_dir, "squared")
    batch = _with_labels(tiny_make_batch(unwrap(model), [30, 28], [3, 4]), [1, 1], 16)
    batch["a3_label_mask"][:] = False
    terms = compute_a3_losses(model, batch, cfg.a3)
    assert float(terms["a3_att_loss"]) == 0.0 and float(terms["balance_loss"]) == 0.0
    assert torch.allclose(terms["loss"], terms["lm_loss"])
    # the loss function itself: no sample with masks -> 0 that keeps the graph
    maps = torch.rand(2, 3, 16, requires_grad=True)
    z = a3_att_loss(maps, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 1, 16), torch.zeros(2, 1, dtype=torch.bool))
    assert float(z) == 0.0 and z.requires_grad
    z.backward()
    assert torch.equal(maps.grad, torch.zeros_like(maps))


def test_select_heads_ties_and_cap():
    r = torch.tensor([[[0.5, 0.9], [0.9, 0.1]]])
    assert select_heads(r, 2)[0].tolist() == [[False, True], [True, False]]
    assert select_heads(r, 1)[0].tolist() == [[False, True], [False, False]]  # tie: the lower index first
    assert bool(select_heads(r, 100).all())


def test_lora_leaves_q_k_to_the_moe(tiny_llama_dir):
    from student_train.model import language_linear_targets
    model, _ = load_student(tiny_llama_dir)
    pattern = language_linear_targets(model, ("q_proj", "k_proj"))
    assert "q_proj" not in pattern and "k_proj" not in pattern and "v_proj" in pattern
    assert LoraArgs().lora_r is None and A3Args().a3_top_heads == 128  # r: the method's (test_a3_train)
