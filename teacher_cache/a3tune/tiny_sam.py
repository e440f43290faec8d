"""A tiny SAM saved in the original ``.pth`` layout, for tests and smoke runs.

The file is what ``torch.save(sam.state_dict())`` writes for the released checkpoints: one flat
dict of ``image_encoder.* / prompt_encoder.* / mask_decoder.*`` tensors, so ``load_sam`` reads it
through the same path as ``sam_vit_h_4b8939.pth``. The sizes are written in below (a 2-block ViT of
width 32 on a 256 x 256 input; the mask decoder keeps SAM's 8 attention heads, which the builder
hard-codes, at a width of 32). The file is about 0.5 MB.

Random SAM weights give masks that are noise over the whole image, so nothing would survive the
authors' filter. Most weights here are random (seeded), but a few are set so the model is a
brightness thresholder with known output:

- the patch embedding's channels ``2k, 2k+1`` carry ``+-(patch brightness - THRESHOLDS[k])``; the
  encoder blocks are identities (attention and MLP output projections zero), the neck passes the
  channels through (LayerNorms keep their signs);
- in the mask decoder the two-way transformer does not update the image features, the 4x
  upsampling is nearest (equal kernel taps) and passes the positive halves through, and
  multimask output ``k`` (tokens 1..3) scores ``LOGIT_SCALE * [brightness > THRESHOLDS[k-1]]``
  minus ``LOGIT_OFFSET``; its predicted IoU is ``IOU_SCORES[k]``.

So on any image the masks are the patch-level regions brighter than 60, 120 and 180 (of 255),
whatever the point prompt: a synthetic image with nested bright shapes gives a known set of
masks, and real images give a few. The generator, the NMS steps, the crop layer and the
small-region removal all still run on them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from teacher_cache.a3tune.sam_arch import PIXEL_MEAN, PIXEL_STD, SamArch, build_sam

#: the tiny model's sizes: a 2-block ViT (window 4, block 1 global) on a 256 x 256 input
TINY_ARCH = SamArch(
    encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
    window_size=4, patch_size=16, image_size=256, mlp_ratio=4.0, prompt_embed_dim=32,
    mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=64, num_multimask_outputs=3,
    iou_head_depth=3, iou_head_hidden_dim=32)
#: brightness (0..255, mean over a 16 x 16 patch and the channels) of multimask outputs 1, 2, 3
THRESHOLDS = (60.0, 120.0, 180.0)
#: predicted IoU of the single-mask output and the three multimask outputs
IOU_SCORES = (0.7, 0.9, 0.8, 0.95)
LOGIT_SCALE = 20.0
LOGIT_OFFSET = 8.0


def _design(model, thresholds=THRESHOLDS) -> None:
    enc, dec = model.image_encoder, model.mask_decoder
    c = enc.patch_embed.proj  # [32, 3, 16, 16]; input is (pixel - mean) / std per channel
    c.weight.zero_()
    c.bias.zero_()
    n = c.weight.shape[-1] * c.weight.shape[-2]
    for k, t in enumerate(thresholds):
        for ch in range(3):  # mean over the patch of pixel value = sum_ch std_ch * x_ch / 3 + mean
            c.weight[2 * k, ch] = PIXEL_STD[ch] / (3 * n) / 10.0
        c.bias[2 * k] = (sum(PIXEL_MEAN) / 3 - t) / 10.0  # (brightness - t) / 10
        c.weight[2 * k + 1] = -c.weight[2 * k]
        c.bias[2 * k + 1] = -c.bias[2 * k]
    enc.pos_embed.zero_()
    for block in enc.blocks:
        for lin in (block.attn.proj, block.mlp.lin2):
            lin.weight.zero_()
            lin.bias.zero_()
    eye = torch.eye(enc.neck[0].weight.shape[0], enc.neck[0].weight.shape[1])
    enc.neck[0].weight.copy_(eye[:, :, None, None])
    enc.neck[2].weight.zero_()
    enc.neck[2].weight[:, :, 1, 1] = torch.eye(enc.neck[2].weight.shape[0])
    model.prompt_encoder.no_mask_embed.weight.zero_()
    for layer in dec.transformer.layers:
        layer.cross_attn_image_to_token.out_proj.weight.zero_()
        layer.cross_attn_image_to_token.out_proj.bias.zero_()
    up1, up2 = dec.output_upscaling[0], dec.output_upscaling[3]  # ConvTranspose2d: [in, out, 2, 2]
    up1.weight.zero_()
    up1.bias.zero_()
    for k in range(len(thresholds)):
        up1.weight[2 * k, 2 * k] = 1.0
        up1.weight[2 * k + 1, 2 * k + 1] = 1.0
    up2.weight.zero_()
    up2.bias.zero_()
    up2.bias[0] = 1.0  # channel 0: the constant GELU(1), for the offset
    for k in range(len(thresholds)):
        up2.weight[2 * k, k + 1] = 1.0  # channel k + 1: the positive half of threshold k
    gelu1 = torch.nn.functional.gelu(torch.tensor(1.0)).item()
    for i, mlp in enumerate(dec.output_hypernetworks_mlps):
        last = mlp.layers[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = -LOGIT_OFFSET / gelu1
        last.bias[(i - 1) % len(thresholds) + 1] = LOGIT_SCALE
    head = dec.iou_prediction_head.layers[-1]
    head.weight.zero_()
    head.bias.copy_(torch.tensor(IOU_SCORES))


def tiny_sam_state(seed: int = 0, arch: SamArch = TINY_ARCH, designed: bool = True) -> dict[str, torch.Tensor]:
    """The tiny model's state dict, deterministic in ``seed``; ``designed=False``: purely random."""
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_sam(arch)
        if designed:
            with torch.no_grad():
                _design(model)
    finally:
        torch.random.set_rng_state(rng)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_tiny_sam(path: Path, seed: int = 0) -> Path:
    """Write the tiny SAM ``.pth`` (original flat layout) to ``path``; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_sam_state(seed), path)
    return path
