"""A3MoE's layer maths against straightforward per-token loops written here: the dense q mixture,
the top-1 / top-2 k experts (gated sum by default, the authors' ungated overwrite with
``reference_sparse``), the router's gradient in both, and the balance loss formula."""

from __future__ import annotations

import math
import unittest.mock as mock

import pytest
import torch
import torch.nn as nn

from student_train.a3moe_layers import MoeLinear, MoeState

D_IN, D_OUT, R, ALPHA = 12, 10, 4, 8.0


def make_layer(kind: str, experts: int, top_k: int | None = None, reference: bool = False, seed: int = 0):
    """A layer with non-zero B and sharp routers; top_k default: 0 (dense) for q, 1 for k."""
    top_k = (0 if kind == "q" else 1) if top_k is None else top_k
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT, bias=False)
    state = MoeState()
    m = MoeLinear(base, kind, 0, state, experts=experts, top_k=top_k, r=R, alpha=ALPHA, dropout=0.0,
                  reference_sparse=reference)
    with torch.no_grad():
        m.moe_b.normal_(0, 1.0)  # B = 0 at init would hide every expert
        if m.moe_router is not None:
            m.moe_router.weight.mul_(20.0)  # distinct routing per token
    return m, state


def lora(m: MoeLinear, x: torch.Tensor, e: int) -> torch.Tensor:
    """One expert's update of one row, written out: B_e A_e x alpha / r."""
    a, b = m.moe_a[e].detach(), m.moe_b[e].detach()
    return (b @ (a @ x)) * (ALPHA / R)


def router_probs(m: MoeLinear, v: torch.Tensor) -> torch.Tensor:
    w, c = m.moe_router.weight.detach(), m.moe_router.bias.detach()
    z = w @ v + c
    return torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()


def test_q_dense_mixture_matches_a_per_sample_loop():
    m, state = make_layer("q", experts=4)
    x = torch.randn(2, 7, D_IN)
    qmask = torch.zeros(2, 7, dtype=torch.bool)
    qmask[0, 2:5] = True
    qmask[1, 4:7] = True
    state.question_mask = qmask
    out = m(x).detach()
    w = m.base.weight.detach()
    for b in range(2):
        rows = [x[b, t] for t in range(7) if qmask[b, t]]
        g = router_probs(m, sum(rows) / len(rows))
        for t in range(7):
            want = w @ x[b, t] + sum(g[e] * lora(m, x[b, t], e) for e in range(4))
            torch.testing.assert_close(out[b, t], want, rtol=1e-4, atol=1e-4)
    assert set(state.q_routing) == {0}


def test_q_single_expert_is_a_plain_lora_on_every_token():
    m, _ = make_layer("q", experts=1)
    assert m.moe_router is None
    x = torch.randn(1, 5, D_IN)
    out = m(x).detach()
    for t in range(5):
        torch.testing.assert_close(out[0, t], m.base.weight.detach() @ x[0, t] + lora(m, x[0, t], 0),
                                   rtol=1e-4, atol=1e-4)


def test_q_fixed_routing_of_a_decoding_step_is_used():
    m, state = make_layer("q", experts=3)
    g = torch.tensor([[0.2, 0.5, 0.3]])
    state.fixed_routing = g[None]  # [L=1, B=1, E]
    x = torch.randn(1, 1, D_IN)
    want = m.base.weight.detach() @ x[0, 0] + sum(g[0, e] * lora(m, x[0, 0], e) for e in range(3))
    torch.testing.assert_close(m(x).detach()[0, 0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("reference", [False, True])
def test_k_sparse_experts_on_image_tokens_only(top_k, reference):
    m, state = make_layer("k", experts=5, top_k=top_k, reference=reference)
    x = torch.randn(2, 6, D_IN)
    im = torch.zeros(2, 6, dtype=torch.bool)
    im[0, 1:4] = True
    im[1, 0:5] = True
    state.image_mask = im
    out = m(x).detach()
    w = m.base.weight.detach()
    seen = set()
    for b in range(2):
        for t in range(6):
            want = w @ x[b, t]
            if im[b, t]:
                p = router_probs(m, x[b, t])
                order = sorted(range(5), key=lambda e: -float(p[e]))[:top_k]
                seen.update(order)
                if reference:  # theirs: experts written in ascending index, the last one stays, no gate
                    want = want + lora(m, x[b, t], max(order))
                else:
                    want = want + sum(p[e] * lora(m, x[b, t], e) for e in order)
            torch.testing.assert_close(out[b, t], want, rtol=1e-4, atol=1e-4)
    assert len(seen) > 1, "the test should route tokens to several experts"
    n_img = int(im.sum())
    assert state.k_probs[0].shape == (n_img, 5)
    assert torch.equal(state.k_hard[0].sum(1), torch.full((n_img,), float(top_k)))


@pytest.mark.parametrize("reference", [False, True])
def test_k_router_learns_from_the_lm_loss_only_when_gated(reference):
    m, state = make_layer("k", experts=4, top_k=1, reference=reference)
    m.train()
    x = torch.randn(1, 6, D_IN)
    state.image_mask = torch.ones(1, 6, dtype=torch.bool)
    m(x).square().sum().backward()
    grad = m.moe_router.weight.grad
    assert grad is not None  # connected (DDP): every parameter gets a gradient
    if reference:
        assert float(grad.abs().max()) == 0.0  # their forward: the router never learns without the balance loss
    else:
        assert float(grad.abs().max()) > 0.0
    assert m.moe_a.grad is not None and m.moe_b.grad is not None


def test_k_without_image_tokens_is_the_base_layer():
    m, state = make_layer("k", experts=4)
    x = torch.randn(1, 3, D_IN)
    state.image_mask = None
    torch.testing.assert_close(m(x), m.base(x))


def test_fp32_experts_on_a_bf16_base():
    m, state = make_layer("q", experts=2)
    m.base.to(torch.bfloat16)
    x = torch.randn(1, 4, D_IN, dtype=torch.bfloat16)
    state.question_mask = torch.ones(1, 4, dtype=torch.bool)
    out = m(x)
    assert out.dtype == torch.bfloat16 and m.moe_a.dtype == torch.float32
    g = router_probs(m, x[0].float().mean(0))
    want = (m.base.weight.float() @ x[0, 0].float()).bfloat16().float() \
        + sum(g[e] * lora(m, x[0, 0].float(), e) for e in range(2))
    torch.testing.assert_close(out[0, 0].float(), want, rtol=2e-2, atol=2e-2)


def test_balance_loss_formula():
    """v1's llava.py: per sample, sum_e mean(p_e) mean(h_e) over layers x image tokens; batch mean."""
    from student_train import a3moe

    class Fake:  # the handles balance_loss reads: state + the k routers
        pass

    torch.manual_seed(0)
    state = MoeState()
    rows = torch.tensor([0, 0, 0, 1, 1])
    state.image_rows = rows
    layers = 3
    probs = [torch.softmax(torch.randn(5, 4), -1) for _ in range(layers)]
    hard = [torch.zeros(5, 4).scatter(1, p.topk(2, -1).indices, 1.0) for p in probs]
    state.k_probs = dict(enumerate(probs))
    state.k_hard = dict(enumerate(hard))
    fake = Fake()
    fake.state, fake.k = state, []
    with mock.patch.object(a3moe, "get_moe", lambda _m: fake):
        got = a3moe.balance_loss(nn.Linear(1, 1))
    want = 0.0
    for b in (0, 1):
        sel = [i for i in range(5) if int(rows[i]) == b]
        p_all = torch.cat([probs[l][sel] for l in range(layers)])  # [layers * n_b, E]
        h_all = torch.cat([hard[l][sel] for l in range(layers)])
        want += sum(float(p_all[:, e].mean()) * float(h_all[:, e].mean()) for e in range(4))
    assert math.isclose(float(got), want / 2, rel_tol=1e-5)


def test_dropout_only_in_training_and_one_draw_per_expert():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT, bias=False)
    state = MoeState()
    m = MoeLinear(base, "q", 0, state, experts=3, top_k=0, r=R, alpha=ALPHA, dropout=0.5, reference_sparse=False)
    with torch.no_grad():
        m.moe_b.normal_(0, 1.0)
    x = torch.randn(1, 4, D_IN)
    state.question_mask = torch.ones(1, 4, dtype=torch.bool)
    m.eval()
    g = router_probs(m, x[0].mean(0))
    want = m.base.weight.detach() @ x[0, 1] + sum(g[e] * lora(m, x[0, 1], e) for e in range(3))
    torch.testing.assert_close(m(x).detach()[0, 1], want, rtol=1e-4, atol=1e-4)
    m.train()
    torch.manual_seed(1)
    got = m(x).detach()
    torch.manual_seed(1)  # the same draws, written out: one Dropout mask per expert, in expert order
    drop = nn.Dropout(0.5)
    xs = [drop(x.float()) for _ in range(3)]
    ref = m.base(x).detach() + sum(g[e] * (xs[e] @ m.moe_a[e].detach().t() @ m.moe_b[e].detach().t()) * (ALPHA / R)
                                   for e in range(3))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reference", [False, True])
def test_q_sequence_level_top1(reference):
    m, state = make_layer("q", experts=4, top_k=1, reference=reference)
    x = torch.randn(2, 5, D_IN)
    state.question_mask = torch.ones(2, 5, dtype=torch.bool)
    out = m(x).detach()
    for b in range(2):
        g = router_probs(m, x[b].mean(0))
        e = int(g.argmax())
        gate = 1.0 if reference else g[e]
        for t in range(5):
            want = m.base.weight.detach() @ x[b, t] + gate * lora(m, x[b, t], e)
            torch.testing.assert_close(out[b, t], want, rtol=1e-4, atol=1e-4)
