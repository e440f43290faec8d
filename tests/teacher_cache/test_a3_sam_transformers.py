"""The tiny SAM's model half pinned against an independent implementation: transformers'
``SamModel`` with the original ``.pth`` converted to its key layout here. Both get the same
preprocessed pixels and point prompts; the multimask logits (64 x 64) and predicted IoUs must
agree, on the designed tiny model and on purely random weights. (The generator around the model
is segment-anything's own, pinned in test_a3_sam.py against the stock class.)"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from a3_cache_fakes import nested_shapes

from teacher_cache.a3tune.sam import load_sam
from teacher_cache.a3tune.tiny_sam import TINY_ARCH, tiny_sam_state

RULES = [  # original key -> transformers key, applied in order
    (r"^image_encoder\.", "vision_encoder."),
    (r"patch_embed\.proj\.", "patch_embed.projection."),
    (r"vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"(vision_encoder\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"neck\.0\.", "neck.conv1."), (r"neck\.1\.", "neck.layer_norm1."),
    (r"neck\.2\.", "neck.conv2."), (r"neck\.3\.", "neck.layer_norm2."),
    (r"mask_downscaling\.0\.", "mask_embed.conv1."), (r"mask_downscaling\.1\.", "mask_embed.layer_norm1."),
    (r"mask_downscaling\.3\.", "mask_embed.conv2."), (r"mask_downscaling\.4\.", "mask_embed.layer_norm2."),
    (r"mask_downscaling\.6\.", "mask_embed.conv3."),
    (r"prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"(transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"transformer\.norm_final_attn\.", "transformer.layer_norm_final_attn."),
    (r"output_upscaling\.0\.", "upscale_conv1."), (r"output_upscaling\.1\.", "upscale_layer_norm."),
    (r"output_upscaling\.3\.", "upscale_conv2."),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0\.", r"\1.proj_in."),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.1\.", r"\1.layers.0."),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.2\.", r"\1.proj_out."),
]


def to_transformers(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if k == "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
            out["shared_image_embedding.positional_embedding"] = v
            out["prompt_encoder.shared_embedding.positional_embedding"] = v
            continue
        for pattern, repl in RULES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def hf_model(state: dict):
    from transformers import SamConfig, SamModel
    from transformers.models.sam.configuration_sam import (SamMaskDecoderConfig, SamPromptEncoderConfig,
                                                           SamVisionConfig)
    a = TINY_ARCH
    vision = SamVisionConfig(
        hidden_size=a.encoder_embed_dim, output_channels=a.prompt_embed_dim,
        num_hidden_layers=a.encoder_depth, num_attention_heads=a.encoder_num_heads,
        image_size=a.image_size, patch_size=a.patch_size, window_size=a.window_size,
        global_attn_indexes=list(a.encoder_global_attn_indexes), mlp_ratio=a.mlp_ratio,
        num_pos_feats=a.prompt_embed_dim // 2)
    prompt = SamPromptEncoderConfig(hidden_size=a.prompt_embed_dim, image_size=a.image_size,
                                    patch_size=a.patch_size, mask_input_channels=a.mask_in_chans)
    decoder = SamMaskDecoderConfig(hidden_size=a.prompt_embed_dim, mlp_dim=a.decoder_mlp_dim,
                                   num_hidden_layers=a.decoder_depth, num_attention_heads=8,
                                   iou_head_hidden_dim=a.iou_head_hidden_dim)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt,
                               mask_decoder_config=decoder)).eval()
    missing, unexpected = model.load_state_dict(to_transformers(state), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model


@pytest.mark.parametrize("designed", [True, False], ids=["designed", "random"])
def test_model_outputs_match_transformers(tmp_path, designed):
    from segment_anything import SamPredictor
    from segment_anything.utils.amg import build_point_grid

    state = tiny_sam_state(seed=5, designed=designed)
    torch.save(state, tmp_path / "sam.pth")
    sam = load_sam(tmp_path / "sam.pth")
    rng = np.random.default_rng(0)
    view = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    view[60:180, 50:200] = 220
    predictor = SamPredictor(sam.model)
    predictor.set_image(view)
    points = torch.as_tensor(predictor.transform.apply_coords(build_point_grid(4) * 256, (256, 256)),
                             dtype=torch.float32)
    labels = torch.ones(len(points), 1, dtype=torch.int)
    with torch.no_grad():
        _, iou_sa, low_sa = predictor.predict_torch(points[:, None], labels, multimask_output=True)
        hf = hf_model(state)
        pixels = sam.model.preprocess(
            torch.as_tensor(predictor.transform.apply_image(view)).permute(2, 0, 1)[None].float())
        out = hf(pixel_values=pixels, input_points=points[None, :, None], input_labels=labels[None],
                 multimask_output=True)
    low_hf, iou_hf = out.pred_masks[0], out.iou_scores[0]
    assert low_hf.shape == low_sa.shape == (16, 3, 64, 64)
    torch.testing.assert_close(iou_hf, iou_sa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low_hf, low_sa, atol=1e-4 * float(low_sa.abs().max()) + 1e-5, rtol=1e-4)
    assert float(low_sa.std()) > 0  # not a degenerate comparison


# -- an independent automatic mask generator on top of transformers' model ------------------------

def _crop_boxes(h: int, w: int, n_layers: int, overlap_ratio: float = 512 / 1500):
    boxes, layers = [[0, 0, w, h]], [0]
    for layer in range(1, n_layers + 1):
        n = 2 ** layer
        overlap = int(overlap_ratio * min(h, w) * 2 / n)
        cw, ch = -(-(overlap * (n - 1) + w) // n), -(-(overlap * (n - 1) + h) // n)
        for x0 in [int((cw - overlap) * i) for i in range(n)]:
            for y0 in [int((ch - overlap) * i) for i in range(n)]:
                boxes.append([x0, y0, min(x0 + cw, w), min(y0 + ch, h)])
                layers.append(layer)
    return boxes, layers


def _grid(n: int) -> np.ndarray:
    side = (np.arange(n) + 0.5) / n
    return np.stack([np.tile(side, n), np.repeat(side, n)], axis=1)  # x fastest, as SAM's


def _box(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def _small_regions(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    import cv2
    changed = False
    for fill_holes in (True, False):
        work = (~mask if fill_holes else mask).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(work, connectivity=8)
        sizes = stats[1:, cv2.CC_STAT_AREA]
        small = [i + 1 for i, s in enumerate(sizes) if s < min_area]
        if not small:
            continue
        changed = True
        if fill_holes:  # holes become mask
            mask = mask | np.isin(labels, small)
        else:  # keep the big islands (the largest if none is big)
            keep = [i for i in range(1, n) if i not in small] or [int(np.argmax(sizes)) + 1]
            mask = np.isin(labels, keep)
    return mask, changed


def reference_generate(hf, view: np.ndarray, s) -> list[dict]:
    """SAM's automatic mask generation written out from its description, on ``hf``."""
    from PIL import Image
    from torchvision.ops import batched_nms
    img_size = TINY_ARCH.image_size
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    H, W = view.shape[:2]
    crops, layers = _crop_boxes(H, W, s.crop_n_layers)
    found = []  # dicts with mask, box (xyxy, image frame), iou, stab, crop
    for crop, layer in zip(crops, layers):
        x0, y0, x1, y1 = crop
        part = view[y0:y1, x0:x1]
        h, w = part.shape[:2]
        scale = img_size / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        resized = np.array(Image.fromarray(part).resize((nw, nh), Image.Resampling.BILINEAR))
        x = (torch.as_tensor(resized).permute(2, 0, 1).float() - mean) / std
        x = torch.nn.functional.pad(x, (0, img_size - nw, 0, img_size - nh))[None]
        pts = _grid(s.points_per_side // s.crop_n_points_downscale_factor ** layer) * [w, h]
        coords = torch.as_tensor(pts * [nw / w, nh / h], dtype=torch.float32)
        crop_found = []
        with torch.no_grad():
            emb = hf.get_image_embeddings(x)
            for b in range(0, len(coords), s.points_per_batch):
                c = coords[b:b + s.points_per_batch]
                out = hf(image_embeddings=emb, input_points=c[None, :, None],
                         input_labels=torch.ones(1, len(c), 1, dtype=torch.int), multimask_output=True)
                logits = torch.nn.functional.interpolate(out.pred_masks[0], (img_size, img_size),
                                                         mode="bilinear", align_corners=False)
                logits = torch.nn.functional.interpolate(logits[..., :nh, :nw], (h, w),
                                                         mode="bilinear", align_corners=False)
                for lg, iou in zip(logits.flatten(0, 1), out.iou_scores[0].flatten()):
                    if not iou > s.pred_iou_thresh:
                        continue
                    stab = ((lg > 1.0).sum() / (lg > -1.0).sum()).item()
                    if not stab >= s.stability_score_thresh:
                        continue
                    m = lg > 0
                    bx = _box(m)
                    full = [bx[0] + x0, bx[1] + y0, bx[2] + x0, bx[3] + y0]
                    near = [abs(v - c_) <= 20 and abs(v - o) > 20
                            for v, c_, o in zip(full, crop, [0, 0, W, H])]
                    if any(near):
                        continue
                    canvas = torch.zeros(H, W, dtype=torch.bool)
                    canvas[y0:y1, x0:x1] = m
                    crop_found.append(dict(mask=canvas, box=full, iou=iou.item(), stab=stab, crop=crop))
        if crop_found:
            keep = batched_nms(torch.tensor([f["box"] for f in crop_found], dtype=torch.float),
                               torch.tensor([f["iou"] for f in crop_found]),
                               torch.zeros(len(crop_found)), s.box_nms_thresh)
            found += [crop_found[i] for i in keep.tolist()]
    if len(crops) > 1 and found:
        area = torch.tensor([(c[2] - c[0]) * (c[3] - c[1]) for c in (f["crop"] for f in found)], dtype=torch.float)
        keep = batched_nms(torch.tensor([f["box"] for f in found], dtype=torch.float), 1 / area,
                           torch.zeros(len(found)), s.crop_nms_thresh)
        found = [found[i] for i in keep.tolist()]
    if s.min_mask_region_area > 0 and found:
        cleaned = [_small_regions(f["mask"].numpy(), s.min_mask_region_area) for f in found]
        boxes = torch.tensor([_box(torch.as_tensor(m)) for m, _ in cleaned], dtype=torch.float)
        keep = batched_nms(boxes, torch.tensor([0.0 if ch else 1.0 for _, ch in cleaned]),
                           torch.zeros(len(found)), max(s.box_nms_thresh, s.crop_nms_thresh))
        for i in keep.tolist():
            if cleaned[i][1]:
                found[i]["mask"] = torch.as_tensor(cleaned[i][0])
                found[i]["box"] = [int(v) for v in boxes[i]]
        found = [found[i] for i in keep.tolist()]
    return [{"segmentation": f["mask"].numpy(), "area": int(f["mask"].sum()),
             "bbox": [f["box"][0], f["box"][1], f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]],
             "predicted_iou": f["iou"], "stability_score": f["stab"]} for f in found]


def _compare(ours, ref):
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref):
        assert a.bbox == b.bbox and a.area == b.area
        assert np.array_equal(a.segmentation, b.segmentation)
        assert abs(a.predicted_iou - b.predicted_iou) < 1e-5  # the two models' float noise
        assert abs(a.stability_score - b.stability_score) < 1e-6


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    state = tiny_sam_state(seed=0)
    path = tmp_path_factory.mktemp("sam") / "sam.pth"
    torch.save(state, path)
    return load_sam(path), hf_model(state)


def test_generate_masks_equals_the_independent_path(both, vqa_rad_subset_dir):
    """A crop layer at the smallest grid, and the fast settings on a real image."""
    import cv2
    from teacher_cache.a3tune.sam import FAST_SAM_SETTINGS, SamSettings, filter_records, generate_masks
    sam, hf = both
    real = cv2.resize(cv2.imread(str(vqa_rad_subset_dir / "images" / "synpic100176.jpg")), (256, 256))
    for view, settings in ((nested_shapes(), SamSettings(points_per_side=4)),
                           (real, FAST_SAM_SETTINGS)):
        _compare(generate_masks(sam, view, settings),
                 filter_records(reference_generate(hf, view, settings), settings))


@pytest.mark.slow
def test_full_settings_equal_the_independent_path(both):
    from teacher_cache.a3tune.sam import SamSettings, filter_records, generate_masks
    sam, hf = both
    settings = SamSettings()
    _compare(generate_masks(sam, nested_shapes(), settings),
             filter_records(reference_generate(hf, nested_shapes(), settings), settings))
