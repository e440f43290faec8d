"""Acceptance: ``medalign-cache build --geometry crop`` reproduces the reference's signals.

A random-weight tower in the UniMed-B checkpoint format (224 px input, 16 px patches, 14x14 grid;
reduced width so it runs on a CPU) goes through the real ``unimed-b`` loading path and the real
CLI onto the student's 24x24 grid, over real VQA-RAD images (non-square ones included; committed
under ``tests/assets/vqa-rad/images``, so the test runs in every clone). The expected signals are computed independently in float64, the way the reference notebooks
(``Distill_data_unimed_B/{Similarity_matrix,Attention}.ipynb``) do: open_clip's own eval
transform, the ViT forward from the state dict (``expert_reference.open_clip_vit``), the last
block's patch tokens L2-normalised -> bilinear 14 -> 24 -> L2-normalised -> ``F F^T``, and the
head-mean CLS attention resampled bilinearly.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from open_clip.transform import image_transform

from shared.cache import open_cache
from shared.images import load_image
from teacher_cache.cli import main
from teacher_cache.tiny import save_random_unimed

try:
    from . import expert_reference as ref
except ImportError:
    import expert_reference as ref

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: UniMed-B's input size and patch (224 / 16 = 14x14), at a width a CPU runs in a blink.
NARROW_B16 = {"embed_dim": 32, "quick_gelu": True,
              "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32}}
IMAGES = ["synpic21776.jpg",   # 986 x 1200
          "synpic44865.jpg",   # 1024 x 1500, the tallest
          "synpic55583.jpg",   # 532 x 768
          "synpic25534.jpg",   # 1024 x 421, the widest
          "synpic42157.jpg",   # 1024 x 553
          "synpic100132.jpg",  # 2321 x 1384, the largest
          "synpic51426.jpg",   # 256 x 256
          "synpic100176.jpg"]  # 1024 x 1024


def reference_signals(state: dict, images: list, grid: int) -> tuple[np.ndarray, np.ndarray]:
    transform = image_transform(224, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    pixels = torch.stack([transform(img) for img in images]).double()
    e_v, e_a = ref.open_clip_vit(state, pixels, patch=16, heads=2, quick=True)  # raw tokens, before ln_post
    sims, attns = [], []
    for v, a in zip(torch.from_numpy(e_v), torch.from_numpy(e_a)):
        v = F.normalize(v, dim=1)                                                   # [196, D]
        maps = v.view(14, 14, -1).permute(2, 0, 1).unsqueeze(0)                     # [1, D, 14, 14]
        up = F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)
        rows = F.normalize(up.squeeze(0).permute(1, 2, 0).reshape(grid * grid, -1), dim=1)
        sims.append((rows @ rows.T).numpy())
        attns.append(F.interpolate(a.view(1, 1, 14, 14), size=(grid, grid), mode="bilinear",
                                   align_corners=False).view(-1).numpy())
    return np.stack(sims), np.stack(attns)


def test_crop_build_equals_the_reference_computation(vqa_rad_subset_dir, tmp_path):
    """On the eight committed images of ``IMAGES`` (tests/assets/vqa-rad/images)."""
    weights = tmp_path / "unimed-b-narrow.pt"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(save_random_unimed(weights, "unimed-b", NARROW_B16, seed=3)))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": i, "image": name, "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]} for i, name in enumerate(IMAGES)]))
    res = CliRunner().invoke(main, [
        "build", "--expert", "unimed-b", "--weights", str(weights), "--model-config", str(cfg_path),
        "--data", str(data), "--image-root", str(vqa_rad_subset_dir / "images"), "--grid", "24", "--geometry", "crop",
        "--out", str(tmp_path / "c"), "--batch-size", "4", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    cache = open_cache(tmp_path / "c")
    assert cache.manifest.patch_grid == 14 and cache.manifest.grid == 24 and cache.manifest.geometry == "crop"
    assert cache.manifest.resample_order == "norm-resample-norm" and cache.manifest.sim_dtype == "float16"

    state = {k.removeprefix("module.visual."): v for k, v in
             torch.load(weights, weights_only=True)["state_dict"].items() if k.startswith("module.visual.")}
    images = [load_image(vqa_rad_subset_dir / "images" / name)[0] for name in IMAGES]
    assert sum(img.size[0] != img.size[1] for img in images) == 6
    r_sim, r_attn = reference_signals(state, images, 24)
    for i, name in enumerate(IMAGES):
        sim, attn = cache.get(name)
        assert sim.shape == (576, 576) and attn.shape == (576,)
        d_sim, d_attn = np.abs(sim - r_sim[i]).max(), np.abs(attn - r_attn[i]).max()
        assert d_sim <= 1e-3 and d_attn <= 1e-3, f"{name}: max |d S_e| {d_sim:.3g}, max |d E_a| {d_attn:.3g}"
        np.testing.assert_allclose(attn, r_attn[i], rtol=1e-4, atol=1e-7, err_msg=name)  # float32, not float16
