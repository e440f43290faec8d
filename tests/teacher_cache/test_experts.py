"""Expert registry, offline loading in the real weight formats, and E_v / E_a extraction.

Ground truth is an independent float64 numpy ViT (``expert_reference``) run on the saved weights.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import MedAlignError
from shared.images import sha256_file
from teacher_cache import tiny
from teacher_cache.experts import (EXPERTS, OPENAI_MEAN, OPENAI_STD, get_expert, list_experts, load_expert,
                                   weights_sha256)

try:  # tests as a package or as rootdir-inserted modules
    from . import expert_reference as ref
except ImportError:
    import expert_reference as ref


# ------------------------------------------------------------------------------------------------
# fixtures: tiny experts written once per module in the real formats
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experts")


@pytest.fixture(scope="module")
def unimed_b(tiny_dir):
    path = tiny_dir / "unimed-b.pt"
    cfg = tiny.save_tiny_unimed(path, "b", seed=1)
    return path, cfg


@pytest.fixture(scope="module")
def unimed_l(tiny_dir):
    path = tiny_dir / "unimed-l.pt"
    cfg = tiny.save_tiny_unimed(path, "l", seed=2)
    return path, cfg


@pytest.fixture(scope="module")
def biomed_dir(tiny_dir):
    return tiny.save_tiny_biomedclip(tiny_dir / "biomedclip", seed=3)


def _pixels(expert, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = expert.spec.image_size
    return torch.randn(n, 3, s, s, generator=gen)


def _visual_state(path: Path) -> dict:
    """The visual.* tensors straight from the saved file (independent of the loader)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj["state_dict"] if "state_dict" in obj else obj
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("visual."):
            out[k[len("visual."):]] = v
    return out


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

def test_registry_entries():
    assert list_experts() == ["unimed-l", "unimed-b", "biomedclip"]
    l, b, m = (get_expert(n) for n in list_experts())
    assert (l.arch, l.image_size, l.grid, l.token_mode, l.weight_format) == (
        "ViT-L-14-336-quickgelu", 336, 24, "raw", "unimed-pt")
    assert (b.arch, b.image_size, b.grid, b.token_mode) == ("ViT-B-16-quickgelu", 224, 14, "raw")
    assert (m.image_size, m.grid, m.token_mode, m.weight_format) == (224, 14, "proj", "open-clip-dir")
    assert l.num_patches == 576 and b.num_patches == 196
    assert l.mean == OPENAI_MEAN and l.std == OPENAI_STD


def test_registry_matches_open_clip_configs():
    import open_clip
    for spec in EXPERTS.values():
        if spec.arch is None:
            continue
        cfg = open_clip.get_model_config(spec.arch)
        vc = cfg["vision_cfg"]
        assert vc["image_size"] == spec.image_size
        assert vc["image_size"] // vc["patch_size"] == spec.grid
        assert cfg["quick_gelu"] is True and spec.quick_gelu is True


def test_unknown_expert_lists_valid_ones():
    with pytest.raises(MedAlignError) as e:
        get_expert("unimed-xl")
    msg = str(e.value)
    assert "unimed-xl" in msg
    for name in ("unimed-l", "unimed-b", "biomedclip"):
        assert name in msg
    with pytest.raises(MedAlignError, match="valid experts"):
        load_expert("clip", "/nonexistent.pt")


def test_spec_validation():
    with pytest.raises(MedAlignError, match="token mode"):
        replace(get_expert("unimed-b"), token_mode="cls")
    with pytest.raises(MedAlignError, match="weight format"):
        replace(get_expert("unimed-b"), weight_format="hf")


# ------------------------------------------------------------------------------------------------
# loading + extraction against the float64 reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["b", "l"])
def test_unimed_matches_fp64_reference(which, unimed_b, unimed_l):
    path, cfg = unimed_b if which == "b" else unimed_l
    expert = load_expert(f"unimed-{which}", path, model_cfg=cfg)
    vc = cfg["vision_cfg"]
    g = vc["image_size"] // vc["patch_size"]
    assert expert.grid == g and expert.spec.grid == g and expert.spec.image_size == vc["image_size"]
    assert expert.layer == vc["layers"] - 1

    x = _pixels(expert, 3)
    e_v, e_a = expert.encode(x)
    assert e_v.dtype == torch.float32 and e_a.dtype == torch.float32
    assert e_v.shape == (3, g * g, vc["width"]) and e_a.shape == (3, g * g)

    r_v, r_a = ref.open_clip_vit(_visual_state(path), x, patch=vc["patch_size"],
                                 heads=vc["width"] // vc["head_width"], quick=True, mode="raw")
    np.testing.assert_allclose(e_v.numpy(), r_v, atol=2e-5 * np.abs(r_v).max(), rtol=0)
    np.testing.assert_allclose(e_a.numpy(), r_a, atol=1e-6, rtol=0)
    # CLS->patch probabilities: a proper part of a distribution, not renormalised, not uniform
    assert (e_a > 0).all() and (e_a.sum(1) < 1).all()
    assert e_a.std(1).min() > 0.1 * e_a.mean(1).max()


def test_biomedclip_matches_fp64_reference(biomed_dir):
    expert = load_expert("biomedclip", biomed_dir)
    assert expert.grid == 10 and expert.spec.image_size == 160
    assert expert.spec.token_mode == "proj"
    # mean/std come from the directory's preprocess_cfg, not the registry
    assert expert.preprocess.mean == tuple(tiny.TINY_BIOMEDCLIP_PREPROCESS["mean"])
    assert expert.preprocess.std == tuple(tiny.TINY_BIOMEDCLIP_PREPROCESS["std"])
    assert expert.preprocess.image_size == 160

    x = _pixels(expert, 2, seed=5)
    e_v, e_a = expert.encode(x)
    assert e_v.shape == (2, 100, 32) and e_a.shape == (2, 100)
    state = torch.load(biomed_dir / "open_clip_pytorch_model.bin", weights_only=True)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    r_v, r_a = ref.timm_vit(visual, x, patch=16, heads=2, mode="proj")
    np.testing.assert_allclose(e_v.numpy(), r_v, atol=2e-5 * np.abs(r_v).max(), rtol=0)
    np.testing.assert_allclose(e_a.numpy(), r_a, atol=1e-7, rtol=1e-5)
    # 'raw' would be a different thing (before norm + projection, 64-d)
    raw_v, _ = ref.timm_vit(visual, x, patch=16, heads=2, mode="raw")
    assert raw_v.shape[-1] == 64


def test_token_modes_native(unimed_b):
    path, cfg = unimed_b
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    state = _visual_state(path)
    for mode in ("norm", "proj"):
        expert = load_expert(replace(get_expert("unimed-b"), token_mode=mode), path, model_cfg=cfg)
        e_v, _ = expert.encode(x)
        r_v, _ = ref.open_clip_vit(state, x, patch=8, heads=2, quick=True, mode=mode)
        assert e_v.shape == r_v.shape
        np.testing.assert_allclose(e_v.numpy(), r_v, atol=2e-5 * np.abs(r_v).max(), rtol=0)


def test_attention_matches_need_weights(unimed_l):
    """E_a equals nn.MultiheadAttention's own need_weights=True probabilities for the same input."""
    path, cfg = unimed_l
    expert = load_expert("unimed-l", path, model_cfg=cfg)
    attn = expert.visual.transformer.resblocks[-1].attn
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x = _pixels(expert, 3, seed=2)
    try:
        _, e_a = expert.encode(x)
    finally:
        handle.remove()
    (inp,) = seen
    with torch.no_grad():
        _, w = attn(inp, inp, inp, need_weights=True, average_attn_weights=True)
    np.testing.assert_allclose(e_a.numpy(), w[:, 0, 1:].numpy(), atol=1e-6, rtol=0)


def test_attention_matches_eager_timm(biomed_dir):
    """E_a equals the probabilities timm's own eager attention path computes (captured at attn_drop)."""
    expert = load_expert("biomedclip", biomed_dir)
    attn = expert.visual.trunk.blocks[-1].attn
    x = _pixels(expert, 2, seed=4)
    _, e_a = expert.encode(x)  # fused path
    seen = []
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    try:
        with torch.no_grad():
            expert.visual(x)
    finally:
        handle.remove()
        attn.fused_attn = True
    (probs,) = seen  # (B, H, L, L)
    np.testing.assert_allclose(e_a.numpy(), probs.mean(1)[:, 0, 1:].numpy(), atol=1e-6, rtol=0)


def test_e_v_is_forward_intermediates_output(unimed_b):
    """raw mode = open_clip's forward_intermediates(..., output_fmt='NLC') of the last block."""
    path, cfg = unimed_b
    expert = load_expert("unimed-b", path, model_cfg=cfg)
    x = _pixels(expert, 2, seed=3)
    e_v, _ = expert.encode(x)
    with torch.no_grad():
        out = expert.visual.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(e_v, out["image_intermediates"][0], rtol=0, atol=0)


def test_batched_equals_per_image(unimed_b, biomed_dir):
    path, cfg = unimed_b
    for expert in (load_expert("unimed-b", path, model_cfg=cfg), load_expert("biomedclip", biomed_dir)):
        x = _pixels(expert, 4, seed=7)
        e_v, e_a = expert.encode(x)
        for i in range(4):
            v1, a1 = expert.encode(x[i:i + 1])
            torch.testing.assert_close(v1[0], e_v[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a1[0], e_a[i], rtol=1e-5, atol=1e-7)


def test_quick_gelu_matters(unimed_b):
    """The same weights built with plain GELU load silently but give different features."""
    path, cfg = unimed_b
    quick = load_expert("unimed-b", path, model_cfg=cfg)
    plain = load_expert(replace(get_expert("unimed-b"), quick_gelu=False), path, model_cfg=cfg)
    x = _pixels(quick, 2, seed=11)
    v_q, _ = quick.encode(x)
    v_p, _ = plain.encode(x)
    r_p, _ = ref.open_clip_vit(_visual_state(path), x, patch=8, heads=2, quick=False)
    np.testing.assert_allclose(v_p.numpy(), r_p, atol=2e-5 * np.abs(r_p).max(), rtol=0)
    # the fp32-vs-fp64 error is ~1e-6 relative; the activation change is three orders above it
    assert (v_q - v_p).abs().max() > 1e-3 * v_q.abs().max()
    assert np.abs(v_q.numpy() - r_p).max() > 100 * np.abs(v_p.numpy() - r_p).max()
    assert quick.spec.quick_gelu and not plain.spec.quick_gelu


def test_bf16_weights_cast(unimed_b):
    path, cfg = unimed_b
    full = load_expert("unimed-b", path, model_cfg=cfg)
    half = load_expert("unimed-b", path, model_cfg=cfg, dtype=torch.bfloat16)
    assert next(half.visual.parameters()).dtype == torch.bfloat16
    x = _pixels(full, 2, seed=1)
    v32, a32 = full.encode(x)
    v16, a16 = half.encode(x)
    assert v16.dtype == torch.float32 and a16.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(v16, v32, dim=-1)
    assert cos.min() > 0.99
    assert (a16 - a32).abs().max() < 0.1 * a32.max()
    assert load_expert("unimed-b", path, model_cfg=cfg, dtype="float16").dtype == torch.float16


# ------------------------------------------------------------------------------------------------
# formats and errors
# ------------------------------------------------------------------------------------------------

def test_unimed_checkpoint_format(unimed_b):
    """The tiny file looks like a real UniMed training checkpoint: nested, module.-prefixed, text keys."""
    path, _ = unimed_b
    obj = torch.load(path, map_location="cpu", weights_only=True)
    keys = list(obj["state_dict"])
    assert all(k.startswith("module.") for k in keys)
    assert any(k.startswith("module.text.") for k in keys)
    assert any(k.startswith("module.visual.transformer.resblocks.") for k in keys)


def test_flat_state_dict_without_prefix_loads(tmp_path, unimed_b):
    path, cfg = unimed_b
    obj = torch.load(path, map_location="cpu", weights_only=True)
    flat = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    torch.save(flat, tmp_path / "flat.pt", _use_new_zipfile_serialization=False)  # legacy: no mmap
    x = torch.randn(1, 3, 32, 32)
    a = load_expert("unimed-b", tmp_path / "flat.pt", model_cfg=cfg).encode(x)[0]
    b = load_expert("unimed-b", path, model_cfg=cfg).encode(x)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mismatched_checkpoint_names_keys(tmp_path, unimed_b):
    path, cfg = unimed_b
    # a 3-layer config against the 2-layer checkpoint: block 2 is missing
    deeper = json.loads(json.dumps(cfg))
    deeper["vision_cfg"]["layers"] = 3
    with pytest.raises(MedAlignError) as e:
        load_expert("unimed-b", path, model_cfg=deeper)
    msg = str(e.value)
    assert "unimed-b" in msg and "missing keys" in msg and "transformer.resblocks.2." in msg
    assert "unexpected" not in msg

    # an extra and a dropped visual key
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj["state_dict"]
    sd["module.visual.extra_head.weight"] = torch.zeros(2)
    del sd["module.visual.ln_post.bias"]
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(MedAlignError) as e:
        load_expert("unimed-b", tmp_path / "bad.pt", model_cfg=cfg)
    msg = str(e.value)
    assert "1 missing keys: ln_post.bias" in msg and "1 unexpected keys: extra_head.weight" in msg

    # the 'l' tiny config against the 'b' checkpoint: same names, different shapes
    with pytest.raises(MedAlignError, match=r"shape mismatches.*conv1.weight"):
        load_expert("unimed-b", path, model_cfg=tiny.TINY_UNIMED_CFGS["l"] | {
            "vision_cfg": {**tiny.TINY_UNIMED_CFGS["l"]["vision_cfg"], "layers": 2}})


def test_missing_and_unreadable_weights(tmp_path, biomed_dir):
    with pytest.raises(MedAlignError, match="not found"):
        load_expert("unimed-b", tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedAlignError, match="weights_only"):
        load_expert("unimed-b", tmp_path / "junk.pt")
    torch.save({"state_dict": {"module.text.w": torch.zeros(2)}}, tmp_path / "text_only.pt")
    with pytest.raises(MedAlignError, match="no 'visual"):
        load_expert("unimed-b", tmp_path / "text_only.pt")
    with pytest.raises(MedAlignError, match="directory"):
        load_expert("unimed-b", biomed_dir)
    with pytest.raises(MedAlignError, match="open_clip model directory"):
        load_expert("biomedclip", tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedAlignError, match="open_clip_config.json"):
        load_expert("biomedclip", empty)
    with pytest.raises(MedAlignError, match="model_cfg cannot be given"):
        load_expert("biomedclip", biomed_dir, model_cfg={"embed_dim": 1, "vision_cfg": {}})


def test_local_dir_prefix_and_sha(biomed_dir, unimed_b):
    e = load_expert("biomedclip", f"local-dir:{biomed_dir}")
    assert e.grid == 10
    assert weights_sha256(biomed_dir) == sha256_file(biomed_dir / "open_clip_pytorch_model.bin")
    path, _ = unimed_b
    assert weights_sha256(path) == sha256_file(path)


def test_loading_never_touches_the_network(monkeypatch, biomed_dir, unimed_b):
    """BiomedCLIP's config names a hub text model; building the image tower alone must not reach for it."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    load_expert("biomedclip", biomed_dir).encode(torch.zeros(1, 3, 160, 160))
    path, cfg = unimed_b
    load_expert("unimed-b", path, model_cfg=cfg)


def test_preprocess_geometry_and_pixel_check(unimed_b):
    path, cfg = unimed_b
    crop = load_expert("unimed-b", path, model_cfg=cfg, geometry="crop")
    assert crop.preprocess.geometry == "crop" and crop.preprocess.image_size == 32
    assert crop.preprocess.mean == OPENAI_MEAN
    pad = load_expert("unimed-b", path, model_cfg=cfg)
    assert pad.preprocess.geometry == "pad"
    with pytest.raises(MedAlignError, match="geometry"):
        load_expert("unimed-b", path, model_cfg=cfg, geometry="stretch")
    with pytest.raises(MedAlignError, match=r"\(B, 3, 32, 32\)"):
        pad.encode(torch.zeros(1, 3, 30, 30))
    from PIL import Image
    img = Image.new("RGB", (50, 20), (200, 30, 30))
    pixels = torch.from_numpy(pad.preprocess(img))
    e_v, e_a = pad.encode(torch.stack([pixels, pixels]))  # as the build batches preprocessed images
    assert e_v.shape == (2, 16, 64) and torch.equal(e_v[0], e_v[1])
    assert pad.spec.name == "unimed-b" and pad.layer == 1 and pad.grid == 4


# ------------------------------------------------------------------------------------------------
# the registry's real architectures build and run (random weights, real formats)
# ------------------------------------------------------------------------------------------------

def _full_size_round_trip(tmp_path, name: str):
    t0 = time.perf_counter()
    if name == "biomedclip":
        weights = tiny.save_random_biomedclip(tmp_path / "biomedclip")
    else:
        weights = tmp_path / f"{name}.pt"
        tiny.save_random_unimed(weights, name)
    expert = load_expert(name, weights)
    spec = get_expert(name)
    assert expert.spec.image_size == spec.image_size and expert.grid == spec.grid
    e_v, e_a = expert.encode(torch.randn(1, 3, spec.image_size, spec.image_size))
    width = {"unimed-l": 1024, "unimed-b": 768, "biomedclip": 512}[name]
    assert e_v.shape == (1, spec.num_patches, width) and e_a.shape == (1, spec.num_patches)
    assert torch.isfinite(e_v).all() and (e_a >= 0).all() and e_a.sum() <= 1 + 1e-5
    return time.perf_counter() - t0


@pytest.mark.parametrize("name", ["unimed-b", "biomedclip"])
def test_full_size_base_experts_build(tmp_path, name):
    _full_size_round_trip(tmp_path, name)


@pytest.mark.slow
def test_full_size_unimed_l_builds(tmp_path):
    _full_size_round_trip(tmp_path, "unimed-l")


# ------------------------------------------------------------------------------------------------
# CUDA (run with -m gpu on a machine with a GPU)
# ------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp32_matches_fp64_reference(unimed_b, biomed_dir):
    path, cfg = unimed_b
    expert = load_expert("unimed-b", path, model_cfg=cfg, device="cuda", dtype=torch.float32)
    x = _pixels(expert, 3, seed=21)
    e_v, e_a = expert.encode(x)
    assert e_v.device.type == "cuda" and e_v.dtype == torch.float32
    r_v, r_a = ref.open_clip_vit(_visual_state(path), x, patch=8, heads=2, quick=True)
    # cuDNN may run the patch-embedding convolution in TF32
    np.testing.assert_allclose(e_v.cpu().numpy(), r_v, atol=5e-3 * np.abs(r_v).max(), rtol=0)
    np.testing.assert_allclose(e_a.cpu().numpy(), r_a, atol=5e-3 * r_a.max(), rtol=0)

    expert = load_expert("biomedclip", biomed_dir, device="cuda")
    assert expert.dtype in (torch.bfloat16, torch.float16)  # the CUDA default casts the weights
    x = _pixels(expert, 2, seed=22)
    e_v, e_a = expert.encode(x)
    state = torch.load(biomed_dir / "open_clip_pytorch_model.bin", weights_only=True)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    r_v, r_a = ref.timm_vit(visual, x, patch=16, heads=2)
    cos = (e_v.cpu().double().numpy() * r_v).sum(-1) / np.linalg.norm(e_v.cpu().double().numpy(), axis=-1) \
        / np.linalg.norm(r_v, axis=-1)
    assert cos.min() > 0.99
    np.testing.assert_allclose(e_a.cpu().numpy(), r_a, atol=0.05 * r_a.max(), rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_full_size_unimed_l(tmp_path):
    """Full-size UniMed-L (random weights) on CUDA: bf16 weight cast vs fp32, the hook against
    need_weights=True, signals on the GPU, and the encode throughput."""
    from teacher_cache.signals import teacher_signals
    path = tmp_path / "unimed-l.pt"
    tiny.save_random_unimed(path, "unimed-l")
    e32 = load_expert("unimed-l", path, device="cuda", dtype=torch.float32)
    e16 = load_expert("unimed-l", path, device="cuda")
    assert e16.dtype == torch.bfloat16
    x = torch.randn(16, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    v32, a32 = e32.encode(x)
    seen = []
    attn = e16.visual.transformer.resblocks[-1].attn
    handle = attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    v16, a16 = e16.encode(x)
    handle.remove()
    assert v16.shape == (16, 576, 1024) and a16.shape == (16, 576) and v16.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(v16, v32, dim=-1)
    print(f"\nbf16 vs fp32 E_v cosine: min {cos.min().item():.5f} mean {cos.mean().item():.5f}; "
          f"E_a max abs diff {(a16 - a32).abs().max().item():.2e} (max {a32.max().item():.2e})")
    assert cos.mean() > 0.999
    assert (a16 - a32).abs().max() < 0.05 * a32.max()
    # the hook's fp32 recomputation equals PyTorch's own weights on the same (bf16) block input
    with torch.no_grad():
        inp = seen[0].float()
        mha = torch.nn.MultiheadAttention(1024, 16, batch_first=True).cuda().eval()
        mha.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
        _, w = mha(inp, inp, inp, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(a16, w[:, 0, 1:], rtol=0, atol=1e-5)
    # signals on the GPU equal those on the CPU
    s_gpu, t_gpu = teacher_signals(v16, a16, 24)
    s_cpu, t_cpu = teacher_signals(v16.cpu(), a16.cpu(), 24)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=0, atol=1e-5)
    assert torch.equal(t_gpu.cpu(), t_cpu)

    for bsz in (32, 128):
        xb = torch.randn(bsz, 3, 336, 336).cuda()
        for expert, label in ((e16, "bf16"), (e32, "fp32")):
            expert.encode(xb)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                ev, ea = expert.encode(xb)
                teacher_signals(ev, ea, 24)
            torch.cuda.synchronize()
            rate = 3 * bsz / (time.perf_counter() - t0)
            print(f"unimed-l {label} batch {bsz}: {rate:.0f} images/s (encode + signals)")
