"""The resample order of the patch features (docs/design.md 1, "Resampling").

The reference notebooks (``Distill_data_unimed_B/Similarity_matrix.ipynb``) L2-normalise each
patch token, interpolate the (1, D, 14, 14) map bilinearly (``align_corners=False``) to 24x24,
L2-normalise each row again and take ``F F^T`` (the default order); the BiomedCLIP notebook
interpolates the un-normalised tokens (the ``resample-norm`` option). The expected values here are
written out in float64 torch the way the notebooks do it, independently of ``teacher_signals``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cache_helpers import make_legacy_manifest, write_cache
from shared.cache import Manifest, open_cache
from shared.errors import MedAlignError
from teacher_cache.signals import teacher_signals


def _tokens(bsz: int, g: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens like a ViT's last block before ln_post: a shared non-zero mean direction and norms
    that vary by an order of magnitude across patches."""
    gen = torch.Generator().manual_seed(seed)
    mean = 2.0 * torch.randn(dim, generator=gen)
    scale = torch.exp(1.2 * torch.randn(bsz, g * g, 1, generator=gen))
    e_v = (mean + torch.randn(bsz, g * g, dim, generator=gen)) * scale
    e_a = torch.rand(bsz, g * g, generator=gen)
    return e_v, e_a / e_a.sum(1, keepdim=True)


def notebook_signals(e_v: torch.Tensor, e_a: torch.Tensor, big: int, normalise_first: bool = True):
    """Per image, as the notebook's cell: normalise -> (1, D, g, g) -> interpolate -> (N, D) ->
    normalise -> F F^T; attention (1, 1, g, g) -> interpolate -> N. float64."""
    sims, attns = [], []
    for v, a in zip(e_v.double(), e_a.double()):
        m, d = v.shape
        g = int(round(m ** 0.5))
        if normalise_first:
            v = F.normalize(v, dim=1)
        maps = v.view(g, g, d).permute(2, 0, 1).unsqueeze(0)                         # [1, D, g, g]
        up = F.interpolate(maps, size=(big, big), mode="bilinear", align_corners=False)
        rows = F.normalize(up.squeeze(0).permute(1, 2, 0).reshape(-1, d), dim=1)        # [N, D]
        sims.append(rows @ rows.T)
        attns.append(F.interpolate(a.view(1, 1, g, g), size=(big, big), mode="bilinear",
                                   align_corners=False).view(big * big))
    return torch.stack(sims), torch.stack(attns)


def test_default_is_the_reference_order_14_to_24():
    e_v, e_a = _tokens(2, 14, 48)
    sim, attn = teacher_signals(e_v, e_a, 24)  # the default
    r_sim, r_attn = notebook_signals(e_v, e_a, 24)
    assert sim.shape == (2, 576, 576)
    np.testing.assert_allclose(sim.numpy(), r_sim.numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(attn.numpy(), r_attn.numpy(), atol=1e-8, rtol=1e-6)
    explicit, _ = teacher_signals(e_v, e_a, 24, "norm-resample-norm")
    assert torch.equal(explicit, sim)


def test_raw_order_option_resamples_the_raw_tokens():
    e_v, e_a = _tokens(2, 14, 48, seed=1)
    sim, attn = teacher_signals(e_v, e_a, 24, "resample-norm")
    r_sim, r_attn = notebook_signals(e_v, e_a, 24, normalise_first=False)
    np.testing.assert_allclose(sim.numpy(), r_sim.numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(attn.numpy(), r_attn.numpy(), atol=1e-8, rtol=1e-6)


def test_the_two_orders_really_differ():
    """On tokens with a non-zero mean and uneven norms the orders differ by far more than float16
    storage error, so the default must be the reference's, not the raw order."""
    e_v, e_a = _tokens(2, 14, 48, seed=2)
    ref_order, _ = notebook_signals(e_v, e_a, 24)
    raw_order, _ = notebook_signals(e_v, e_a, 24, normalise_first=False)
    gap = float((ref_order - raw_order).abs().max())
    assert gap > 5e-2
    sim, _ = teacher_signals(e_v, e_a, 24)
    assert float((sim.double() - raw_order).abs().max()) > 5e-2
    assert float((sim.double() - ref_order).abs().max()) < 1e-5


@pytest.mark.parametrize("order", ["norm-resample-norm", "resample-norm"])
def test_same_grid_is_the_plain_cosine_matrix(order, monkeypatch):
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: pytest.fail("interpolate called for g == G"))
    e_v, e_a = _tokens(2, 6, 16, seed=3)
    sim, attn = teacher_signals(e_v, e_a, 6, order)
    v = e_v.double()
    cos = (v @ v.transpose(1, 2)) / (v.norm(dim=-1, keepdim=True) * v.norm(dim=-1)[:, None, :])
    np.testing.assert_allclose(sim.numpy(), cos.numpy(), atol=1e-6, rtol=0)
    assert torch.equal(attn, e_a)
    # one normalisation, not two: both orders give the same bits
    other, _ = teacher_signals(e_v, e_a, 6, "resample-norm" if order == "norm-resample-norm" else "norm-resample-norm")
    assert torch.equal(sim, other)


def test_unknown_order_lists_the_valid_ones():
    e_v, e_a = _tokens(1, 4, 8)
    with pytest.raises(MedAlignError, match="'norm-first'.*norm-resample-norm, resample-norm"):
        teacher_signals(e_v, e_a, 6, "norm-first")


# -- the manifest ------------------------------------------------------------------------------------

def _tiny_cache(path, **kw):
    sims = np.stack([np.eye(4, dtype=np.float32)] * 2)
    attns = np.full((2, 4), 0.25, np.float32)
    return write_cache(path, sims, attns, ["a" * 64, "b" * 64], {"x.png": 0, "y.png": 1}, patch_grid=1, **kw)


def test_manifest_records_the_order_and_round_trips(tmp_path):
    _tiny_cache(tmp_path / "c", resample_order="resample-norm")
    data = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert data["resample_order"] == "resample-norm"
    m = Manifest.from_json(data)
    assert m.resample_order == "resample-norm" and m.resampled
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert m.identity()["resample_order"] == "resample-norm"
    assert "features resample-norm (raw tokens resampled" in m.describe()
    with pytest.raises(MedAlignError, match="manifest resample_order 'sideways'.*norm-resample-norm"):
        Manifest.from_json(dict(data, resample_order="sideways", checksum=""))
    _tiny_cache(tmp_path / "d")
    assert Manifest.load(tmp_path / "d").resample_order == "norm-resample-norm"


def test_manifest_without_the_key_reads_as_the_old_raw_order(tmp_path):
    """Caches written before the setting existed resampled the raw tokens; they stay readable."""
    _tiny_cache(tmp_path / "c")
    make_legacy_manifest(tmp_path / "c", "resample_order")
    reader = open_cache(tmp_path / "c")
    assert reader.manifest.resample_order == "resample-norm"
    assert reader.manifest.format_version == 1
    np.testing.assert_array_equal(reader.read(1)[0], np.eye(4))


def test_default_order_is_each_experts_notebook(tmp_path):
    """UniMed-B's notebook normalises before and after resampling; BiomedCLIP's resamples the raw
    tokens (Distill_data_biomed/Similarity_matrix.ipynb). An explicit --resample-order wins."""
    from teacher_cache.build import BuildConfig

    def cfg(expert, order=None):
        return BuildConfig(expert=expert, weights=tmp_path / "w", data=(tmp_path / "d.json",), image_root=tmp_path,
                           grid=24, out=tmp_path / "c", resample_order=order)

    assert cfg("unimed-b").resample_order == "norm-resample-norm"
    assert cfg("unimed-l").resample_order == "norm-resample-norm"
    assert cfg("biomedclip").resample_order == "resample-norm"
    assert cfg("biomedclip", "norm-resample-norm").resample_order == "norm-resample-norm"
