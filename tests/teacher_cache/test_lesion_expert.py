"""The hand-set lesion expert loads through the real loader and its CLS attention finds the lesion."""

from __future__ import annotations

import numpy as np
import torch

from shared.grounding_data import load_grid_masks, make_grounding_dataset
from shared.images import load_image
from teacher_cache.experts import load_expert
from teacher_cache.lesion_expert import save_lesion_unimed


def test_lesion_expert_attends_to_the_lesion(tmp_path):
    p = make_grounding_dataset(tmp_path / "d", 0, {"test": 20})
    cfg = save_lesion_unimed(tmp_path / "lesion.pt")
    expert = load_expert("unimed-b", tmp_path / "lesion.pt", model_cfg=cfg)
    masks = load_grid_masks(p["grid_masks"])
    names = sorted(masks)
    pixels = torch.stack([torch.as_tensor(expert.preprocess(load_image(p["images"] / n)[0])) for n in names])
    e_v, e_a = expert.encode(pixels)
    m = np.stack([masks[n] for n in names])
    a = e_a.numpy().astype(np.float64)
    share = (a * m).sum(1) / a.sum(1)
    assert share.mean() > 0.95 and share.min() > 0.5, share  # uniform attention: m.mean() ~ 0.1
    # E_v: lesion patches are more similar to each other than to the background
    f = torch.nn.functional.normalize(e_v, dim=-1)
    sim = (f @ f.transpose(1, 2)).numpy()
    k = 0
    les, bg = np.nonzero(m[k])[0], np.nonzero(~m[k])[0]
    assert sim[k][np.ix_(les, les)].mean() > sim[k][np.ix_(les, bg)].mean() + 0.2
