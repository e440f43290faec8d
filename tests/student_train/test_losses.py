"""L_vis and L_att: unit checks of the loss functions, and the full batched step (sdpa + capture,
padded batches) against a per-sample Python loop over a full eager-attention forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from student_train.alignment import get_handles
from student_train.losses import ATT_NORMS, att_loss, normalise_attention, vis_loss
from student_train.config import AlignArgs, LoraArgs
from student_train.model import compute_losses, load_student, prepare_student

TINY_ALIGN_LAYER = 2  # valid for the 4-layer tiny students (conftest)

# --------------------------------------------------------------------------- reference maths


def ref_normalise(x: list[float], mode: str) -> list[float]:
    if mode == "sum":
        s = sum(x)
        return [v / s for v in x]
    if mode == "softmax":
        m = max(x)
        ex = [math.exp(v - m) for v in x]
        s = sum(ex)
        return [v / s for v in ex]
    norm = math.sqrt(sum(v * v for v in x))
    return [v / max(norm, 1e-12) for v in x]


def ref_kl(e_raw: list[float], m_raw: list[float], mode: str, clamp: float = 1e-8) -> float:
    e = ref_normalise(e_raw, mode)
    m = ref_normalise(m_raw, mode)
    if mode == "l2":  # the reference code's call, on the 1-D [N] vectors (batchmean divides by N)
        et = torch.tensor(e, dtype=torch.float64)
        mt = torch.tensor(m, dtype=torch.float64)
        return F.kl_div(torch.log(mt.clamp(min=clamp)), et, reduction="batchmean").item()
    return sum(ei * (math.log(max(ei, clamp)) - math.log(max(mi, clamp))) for ei, mi in zip(e, m) if ei > 0)


def ref_vis(x: torch.Tensor, s_e: torch.Tensor) -> float:
    """x: [N, d] rotated rows, s_e: [N, N]; loop over the entries."""
    n = x.shape[0]
    xd = x.double()
    total = 0.0
    for i in range(n):
        for j in range(n):
            cos = (xd[i] @ xd[j]) / (xd[i].norm() * xd[j].norm())
            total += (s_e[i, j].item() - cos.item()) ** 2
    return total / (n * n)


# --------------------------------------------------------------------------- unit tests


def reference_attention_map_loss(attn_label: torch.Tensor, attn_pred: torch.Tensor) -> torch.Tensor:
    """A transcription of MedAlign's ``get_attention_map_loss`` (llava-med-1.5/llava/model_wrapper.py)
    after the query-row average: both [N] vectors L2-normalised, then ``kl_div(pred.log(), label,
    reduction='batchmean')`` on the 1-D inputs, written out: sum_i E_i (log E_i - log M_i) / N."""
    pred = attn_pred.double() / attn_pred.double().norm()
    label = attn_label.double() / attn_label.double().norm()
    total = torch.zeros((), dtype=torch.float64)
    for e_i, m_i in zip(label, pred):
        if e_i > 0:
            total = total + e_i * (torch.log(e_i) - torch.log(m_i))
    return total / attn_label.shape[0]  # batchmean on a 1-D input: the "batch" is its only dim, N


@pytest.mark.parametrize("n", [36, 196, 576])
@pytest.mark.parametrize("batch", [1, 3])
def test_l2_att_loss_equals_reference_get_attention_map_loss(n, batch):
    g = torch.Generator().manual_seed(n + batch)
    m = torch.softmax(torch.randn(batch, n, generator=g) * 2, dim=-1)  # student attention rows
    e = torch.rand(batch, n, generator=g) ** 3  # raw teacher attention, not normalised
    got = att_loss(m, e, torch.ones(batch, dtype=torch.bool), mode="l2").item()
    want = sum(reference_attention_map_loss(e[i], m[i]).item() for i in range(batch)) / batch
    assert got == pytest.approx(want, rel=1e-6)
    # the old value (no 1/N) was N times larger: this test pins the scale
    assert not got == pytest.approx(want * n, rel=1e-2)


def test_default_att_norm_is_the_reference_l2():
    assert AlignArgs(cache="c").att_norm == "l2" and AlignArgs().att_norm == "l2"
    g = torch.Generator().manual_seed(0)
    m, e = torch.rand(2, 36, generator=g), torch.rand(2, 36, generator=g)
    mask = torch.ones(2, dtype=torch.bool)
    assert att_loss(m, e, mask).item() == pytest.approx(att_loss(m, e, mask, mode="l2").item())



def test_vis_loss_matches_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 7, generator=g)
    s_e = torch.rand(3, 5, 5, generator=g)
    mask = torch.tensor([True, False, True])
    got = vis_loss(x, s_e, mask).item()
    want = (ref_vis(x[0], s_e[0]) + ref_vis(x[2], s_e[2])) / 2
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mode", ATT_NORMS)
def test_att_loss_matches_loop(mode):
    g = torch.Generator().manual_seed(2)
    m = torch.rand(4, 6, generator=g) * 0.1
    e = torch.rand(4, 6, generator=g)
    e[1, 2] = 0.0  # a zero teacher entry contributes 0
    mask = torch.tensor([True, True, False, True])
    rows = torch.tensor([3, 2, 5, 0])  # sample 3 has no query row: left out
    got = att_loss(m, e, mask, mode=mode, rows=rows).item()
    want = (ref_kl(e[0].tolist(), m[0].tolist(), mode) + ref_kl(e[1].tolist(), m[1].tolist(), mode)) / 2
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_att_loss_is_zero_for_equal_distributions_and_positive_otherwise():
    e = torch.rand(2, 9) + 0.1
    for mode in ATT_NORMS:
        same = att_loss(e * 3.0 if mode == "sum" else e, e, torch.tensor([True, True]), mode=mode)
        assert same.item() == pytest.approx(0.0, abs=1e-6)
    m = torch.rand(2, 9) + 0.1
    assert att_loss(m, e, torch.tensor([True, True]), mode="sum").item() > 0


def test_normalise_attention_modes():
    x = torch.tensor([[1.0, 3.0]])
    assert normalise_attention(x, "sum").tolist() == [[0.25, 0.75]]
    assert normalise_attention(x, "l2").norm().item() == pytest.approx(1.0)
    assert normalise_attention(x, "softmax").sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="valid: l2, sum, softmax"):
        normalise_attention(x, "max")


def test_empty_cases_are_connected_zeros():
    x = torch.randn(2, 4, 3, requires_grad=True)
    m = torch.rand(2, 4, requires_grad=True)
    none = torch.tensor([False, False])
    v = vis_loss(x, torch.rand(2, 4, 4), none)
    a = att_loss(m, torch.rand(2, 4), none)
    # a teacher entry but no query row is empty too
    a2 = att_loss(m, torch.rand(2, 4), torch.tensor([True, False]), rows=torch.tensor([0, 3]))
    for loss in (v, a, a2):
        assert loss.item() == 0.0 and loss.dtype == torch.float32 and loss.requires_grad
    (v + a + a2).backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(m.grad, torch.zeros_like(m))
    assert vis_loss(torch.randn(1, 2, 3), torch.rand(1, 2, 2), torch.tensor([False])).item() == 0.0


# --------------------------------------------------------------------------- vs eager reference


def reference_sample(eager, batch, i, layer, w, eps):
    """One unpadded sample through the eager model with W applied by a test hook.

    Returns (X~ rows [N, d], M_a [N] from the full eager attention matrix, logits [L, V])."""
    length = int(batch["attention_mask"][i].sum())
    ids = batch["input_ids"][i, :length][None]
    img = eager.config.image_token_id
    vis_pos = [p for p in range(length) if int(ids[0, p]) == img]
    q_pos = [p for p in range(length) if bool(batch["query_mask"][i, p])]
    captured = {}

    def hook(_m, _a, out):
        out = out.clone()
        x = out[0, vis_pos].double()
        x_rot = x + eps * x @ w.double().t()
        captured["x"] = x_rot
        out[0, vis_pos] = x_rot.to(out.dtype)
        return out

    h = eager.model.language_model.layers[layer - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = eager(input_ids=ids, pixel_values=batch["pixel_values"][i : i + 1], output_attentions=True)
    finally:
        h.remove()
    attn = out.attentions[layer][0].double()  # [H, L, L]
    rows = []
    for q in q_pos:
        rows.append([sum(attn[hh, q, k].item() for hh in range(attn.shape[0])) / attn.shape[0] for k in vis_pos])
    m_a = [sum(r[j] for r in rows) / len(rows) for j in range(len(vis_pos))] if rows else None
    return captured["x"], m_a, out.logits[0]


_MODELS: dict = {}


def models_for(backbone, student_dir):
    """(prepared sdpa+capture student, eager reference) with the same weights, cached per backbone."""
    if backbone not in _MODELS:
        student, _ = load_student(student_dir)
        align = AlignArgs(align_layer=TINY_ALIGN_LAYER, alpha=1.0, beta=1.0)
        student = prepare_student(student, LoraArgs(lora_r=4, lora_dropout=0.0), align, train_projector=False)
        torch.manual_seed(5)
        with torch.no_grad():
            get_handles(student).rotation.weight.normal_(0, 0.05)
        student.eval()
        eager = LlavaForConditionalGeneration.from_pretrained(student_dir, attn_implementation="eager").eval()
        _MODELS[backbone] = (student, eager)
    return _MODELS[backbone]


@pytest.mark.parametrize("backbone", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("mode", ATT_NORMS)
def test_losses_match_per_sample_eager_loop(tiny_student_dirs, tiny_make_batch, backbone, mode):
    student, eager = models_for(backbone, tiny_student_dirs[backbone])
    handles = get_handles(student)
    w, eps, layer = handles.rotation.weight.detach(), handles.rotation.eps, handles.layer
    # 3 padded samples: different lengths, image offsets, query counts; sample 1 has no teacher
    batch = tiny_make_batch(
        student, [30, 25, 34], [2, 5, 1], n_query=[4, 2, 7], teacher=[True, False, True], seed=3
    )
    align = AlignArgs(align_layer=layer, alpha=1.0, beta=0.5, att_norm=mode)
    with torch.no_grad():
        got = compute_losses(student, batch, align)

    vis_terms, att_terms, nll, count = [], [], 0.0, 0
    for i in range(3):
        x_rot, m_a, logits = reference_sample(eager, batch, i, layer, w, eps)
        length = int(batch["attention_mask"][i].sum())
        labels = batch["labels"][i, :length]
        for p in range(length - 1):
            if int(labels[p + 1]) != -100:
                nll -= torch.log_softmax(logits[p].double(), -1)[labels[p + 1]].item()
                count += 1
        if bool(batch["teacher_mask"][i]):
            vis_terms.append(ref_vis(x_rot, batch["teacher_sim"][i]))
            att_terms.append(ref_kl(batch["teacher_attn"][i].tolist(), m_a, mode))
    want_vis = sum(vis_terms) / len(vis_terms)
    want_att = sum(att_terms) / len(att_terms)
    want_lm = nll / count
    assert got["lm_loss"].item() == pytest.approx(want_lm, rel=1e-5)
    assert got["vis_loss"].item() == pytest.approx(want_vis, rel=1e-4, abs=1e-7)
    assert got["att_loss"].item() == pytest.approx(want_att, rel=1e-4, abs=1e-7)
    assert got["loss"].item() == pytest.approx(want_lm + want_vis + 0.5 * want_att, rel=1e-5)


@pytest.mark.parametrize("backbone", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("padded", [True, False])
def test_captured_attention_equals_eager(tiny_student_dirs, tiny_make_batch, backbone, padded):
    student, eager = models_for(backbone, tiny_student_dirs[backbone])
    handles = get_handles(student)
    lengths, offsets = ([31, 24], [3, 0]) if padded else ([28, 28], [1, 6])
    batch = tiny_make_batch(student, lengths, offsets, n_query=[5, 3], seed=11)
    align = AlignArgs(align_layer=handles.layer, alpha=0.0, beta=1.0)
    with torch.no_grad():
        compute_losses(student, batch, align)
    captured = handles.state.attn
    assert captured.shape == (2, 16)
    assert handles.state.attn_rows.tolist() == [5, 3]
    for i in range(2):
        _, m_a, _ = reference_sample(eager, batch, i, handles.layer, handles.rotation.weight.detach(), handles.rotation.eps)
        torch.testing.assert_close(captured[i].double(), torch.tensor(m_a, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    # the probabilities are not trivially uniform, so the comparison is meaningful
    assert captured.std(dim=1).min().item() > 1e-4
