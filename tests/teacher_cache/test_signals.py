"""teacher_signals: resampling to the student grid, cosine similarities, raw attention.

Checked against a float64 numpy bilinear implementation (``expert_reference``), which is itself
checked against hand-computed values, and end to end from a tiny expert's fp64 forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.errors import MedAlignError
from teacher_cache import tiny
from teacher_cache.experts import load_expert
from teacher_cache.signals import resample_grid, teacher_signals

try:
    from . import expert_reference as ref
except ImportError:
    import expert_reference as ref


def _inputs(b: int, g: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    e_v = torch.randn(b, g * g, dim, generator=gen)
    e_a = torch.rand(b, g * g, generator=gen)
    return e_v, e_a / e_a.sum(1, keepdim=True) * 0.9


def test_reference_bilinear_by_hand():
    # 2 -> 4, align_corners=False: output centres at source coords -0.25(->0), 0.25, 0.75, 1.25(->1)
    r = ref.bilinear_1d_matrix(2, 4)
    np.testing.assert_allclose(r, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    # 4 -> 2: source coords 0.5 and 2.5 -> plain averages of neighbours
    np.testing.assert_allclose(ref.bilinear_1d_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    # 3 -> 3 is the identity
    np.testing.assert_allclose(ref.bilinear_1d_matrix(3, 3), np.eye(3))
    maps = np.array([[1.0, 2.0], [3.0, 4.0]])
    # row 1 = 0.75 * [1, 2] + 0.25 * [3, 4] = [1.5, 2.5], then the same column weights
    np.testing.assert_allclose(ref.bilinear(maps, 4)[1], [1.5, 1.75, 2.25, 2.5])


def test_identity_grid_skips_interpolation_exactly(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("interpolate called for g == G")
    monkeypatch.setattr(F, "interpolate", forbidden)
    e_v, e_a = _inputs(2, 5, 7)
    sim, attn = teacher_signals(e_v, e_a, 5)
    assert torch.equal(attn, e_a)  # raw, bit for bit
    feats = F.normalize(e_v, dim=-1)
    torch.testing.assert_close(sim, feats @ feats.transpose(1, 2), rtol=0, atol=0)
    x = torch.randn(1, 3, 5, 5)
    assert resample_grid(x, 5) is x


@pytest.mark.parametrize(("g", "big"), [(4, 6), (6, 4), (14, 24), (24, 14), (3, 24)])
def test_resampled_signals_match_reference(g, big):
    e_v, e_a = _inputs(2, g, 16, seed=g * 100 + big)
    sim, attn = teacher_signals(e_v, e_a, big)
    r_sim, r_attn = ref.signals(e_v, e_a, big)
    n = big * big
    assert sim.shape == (2, n, n) and attn.shape == (2, n)
    assert sim.dtype == torch.float32 and attn.dtype == torch.float32
    np.testing.assert_allclose(sim.numpy(), r_sim, atol=1e-5, rtol=0)  # fp32 vs fp64
    np.testing.assert_allclose(attn.numpy(), r_attn, atol=1e-7, rtol=1e-6)


def test_similarity_properties_and_raw_attention():
    e_v, e_a = _inputs(3, 14, 32, seed=4)
    sim, attn = teacher_signals(e_v, e_a, 24)
    torch.testing.assert_close(sim, sim.transpose(1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.diagonal(sim, dim1=1, dim2=2), torch.ones(3, 576), rtol=0, atol=1e-5)
    assert sim.abs().max() <= 1 + 1e-5
    assert (attn >= 0).all()
    # not renormalised: upsampling a map summing to 0.9 over 196 cells gives ~0.9 * 576 / 196
    assert not torch.allclose(attn.sum(1), torch.ones(3))
    assert torch.allclose(attn.sum(1), torch.full((3,), 0.9 * 576 / 196), rtol=0.05)


def test_low_precision_inputs_compute_in_float32():
    e_v, e_a = _inputs(1, 4, 8, seed=2)
    sim16, attn16 = teacher_signals(e_v.bfloat16(), e_a.bfloat16(), 6)
    assert sim16.dtype == torch.float32 and attn16.dtype == torch.float32
    r_sim, _ = ref.signals(e_v.bfloat16().float(), e_a.bfloat16().float(), 6)
    np.testing.assert_allclose(sim16.numpy(), r_sim, atol=2e-6, rtol=0)


def test_bad_shapes():
    e_v, e_a = _inputs(2, 4, 8)
    with pytest.raises(MedAlignError, match="not a square grid"):
        teacher_signals(e_v[:, :15], e_a[:, :15], 4)
    with pytest.raises(MedAlignError, match="E_a"):
        teacher_signals(e_v, e_a[:1], 4)
    with pytest.raises(MedAlignError, match="E_v"):
        teacher_signals(e_v[0], e_a[0], 4)
    with pytest.raises(MedAlignError, match="positive"):
        teacher_signals(e_v, e_a, 0)


def test_end_to_end_tiny_expert_against_fp64(tmp_path):
    """Tiny UniMed-L expert (6x6 grid) -> signals on a 4x4 student grid, vs. fp64 forward + numpy bilinear."""
    path = tmp_path / "tiny-l.pt"
    cfg = tiny.save_tiny_unimed(path, "l", seed=6)
    expert = load_expert("unimed-l", path, model_cfg=cfg)
    x = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    sim, attn = teacher_signals(*expert.encode(x), 4)
    state = {k.removeprefix("module.visual."): v for k, v in
             torch.load(path, weights_only=True)["state_dict"].items() if k.startswith("module.visual.")}
    r_v, r_a = ref.open_clip_vit(state, x, patch=7, heads=3, quick=True)
    r_sim, r_attn = ref.signals(r_v, r_a, 4)
    np.testing.assert_allclose(sim.numpy(), r_sim, atol=1e-5, rtol=0)
    np.testing.assert_allclose(attn.numpy(), r_attn, atol=1e-6, rtol=0)
