"""Training-step cost of MedAlign and A3Tune vs plain LoRA, and vs the whole-model eager attention
the reference codes use.

Variants (each measured in a fresh subprocess so peak memory is its own):

* ``plain``    alpha = beta = 0: plain LoRA fine-tuning, pure SDPA, no W, no capture.
* ``medalign`` MedAlign as built: W on layers[l-1], L_vis, and L_att from the layers[l]
               capture (only the query rows' probabilities), the rest of the model on SDPA.
* ``eager``    MedAlign the reference's way: the whole model on eager attention with
               ``output_attentions=True``, M_a read from the full T x T matrix of layers[l].
* ``a3tune``   A3Tune as built (no MoE): the per-head query-row capture in every layer (SDPA for
               the outputs), top L*H/8 heads (128 of 1024 at 7B), squared loss on 8 weak masks.
* ``a3tune_eager``  the same loss the authors' way: every layer on eager attention with
               ``output_attentions=True``, ratios and maps read from the full T x T matrices.
* ``a3moe`` / ``a3moe_eager``  the same two with A3MoE (VQA preset; LoRA without q_proj / k_proj),
               when student_train/a3moe.py is present.

One step = forward + backward + AdamW step (LoRA r 32, projector trainable), batch of 2 padded
samples with 576 image tokens each. Step times come from one process holding the three variants
and interleaving their steps (robust to a drifting machine load): median seconds per step after
warm-up. Peak memory comes from a fresh subprocess per variant (CPU: peak RSS via getrusage and
its growth over the post-setup RSS; CUDA: ``torch.cuda.max_memory_allocated`` over one step after
a warm-up step).

    python bench/train_step.py                                  # medium config, CPU
    python bench/train_step.py --device cuda --preset 7b        # 7B-shaped student, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

PRESETS = {
    # hidden 512, 8 layers, 576 image tokens (336 / 14 with a tiny vision tower); vocab 4096 so
    # that lm_head is a 7B-like small share of the step (32000 x 512 would dominate it)
    "medium": dict(
        hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1376, vision_hidden=64, vision_layers=2,
        vision_heads=2, vocab=4096, image_size=336, patch_size=14, align_layer=4,
    ),
    # Mistral-7B language model + CLIP ViT-L/14 @336 (LLaVA-Med-1.5 shapes)
    "7b": dict(
        hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vision_hidden=1024,
        vision_layers=24, vision_heads=16, vocab=32000, image_size=336, patch_size=14, align_layer=20,
    ),
}
VARIANTS = ("plain", "medalign", "eager", "a3tune", "a3tune_eager", "a3moe", "a3moe_eager")
#: A3Tune variants: (A3MoE installed, whole model on eager attention).
A3_VARIANTS = {"a3tune": (False, False), "a3tune_eager": (False, True), "a3moe": (True, False),
               "a3moe_eager": (True, True)}
#: Weak masks per sample in the A3Tune variants (the VQA top-k).
A3_MASKS = 8


def build_model(preset: dict, attn: str, dtype: torch.dtype, device: str):
    from transformers import LlavaForConditionalGeneration

    from student_train.tiny import tiny_llava_config

    config = tiny_llava_config(
        "mistral",
        vocab_size=preset["vocab"],
        image_token_id=preset["vocab"] - 1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        image_size=preset["image_size"],
        patch_size=preset["patch_size"],
        hidden=preset["hidden"],
        layers=preset["layers"],
        heads=preset["heads"],
        kv_heads=preset["kv_heads"],
        intermediate=preset["intermediate"],
        vision_hidden=preset["vision_hidden"],
        vision_layers=preset["vision_layers"],
        vision_heads=preset["vision_heads"],
    )
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    return model


def make_batch(model, device, dtype, seed=0):
    """2 right-padded samples: different image offsets, prompt lengths and answer lengths."""
    cfg = model.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    specs = [(35, 14, 40), (5, 22, 70)]  # (image offset, query rows, answer tokens)
    lengths = [off + n + q + a for off, q, a in specs]
    t = max(lengths)
    ids = torch.zeros(2, t, dtype=torch.long)
    am = torch.zeros(2, t, dtype=torch.long)
    qm = torch.zeros(2, t, dtype=torch.bool)
    labels = torch.full((2, t), -100, dtype=torch.long)
    for i, ((off, q, a), length) in enumerate(zip(specs, lengths)):
        seq = torch.randint(3, cfg.text_config.vocab_size - 1, (length,), generator=g)
        seq[off : off + n] = cfg.image_token_id
        ids[i, :length] = seq
        am[i, :length] = 1
        qm[i, off + n : off + n + q] = True
        labels[i, off + n + q : length] = seq[off + n + q : length]
    feats = torch.nn.functional.normalize(torch.randn(2, n, 32, generator=g), dim=-1)
    size = cfg.vision_config.image_size
    batch = {
        "input_ids": ids,
        "attention_mask": am,
        "labels": labels,
        "pixel_values": torch.randn(2, 3, size, size, generator=g).to(dtype),
        "query_mask": qm,
        "teacher_sim": feats @ feats.transpose(1, 2),
        "teacher_attn": torch.rand(2, n, generator=g),
        "teacher_mask": torch.tensor([True, True]),
    }
    return {k: v.to(device) for k, v in batch.items()}


def add_a3_labels(batch, n_heads_total: int, seed=1):
    """Random weak masks (~15% of the cells) for the A3Tune variants."""
    g = torch.Generator().manual_seed(seed)
    b, n = batch["teacher_attn"].shape
    labels = (torch.rand(b, A3_MASKS, n, generator=g) < 0.15).float()
    labels[:, :, 0] = 1.0
    device = batch["input_ids"].device
    return {**batch, "a3_labels": labels.to(device), "a3_label_mask": torch.ones(b, A3_MASKS, dtype=torch.bool,
                                                                                  device=device)}


def a3_config(preset: dict, moe: bool, lam: float):
    from student_train.config import TrainConfig

    top = preset["layers"] * preset["heads"] // 8
    return TrainConfig.from_flat(dict(method="a3tune", cache="unused", model="m", data="d", image_root="i", out="o",
                                      a3_top_heads=top, a3_lambda=lam, a3_moe=moe, lora_r=32, lora_alpha=16,
                                      lora_dropout=0.05))


def eager_a3_losses(model, batch, a3):
    """A3Tune the authors' way: output_attentions of every layer (eager), ratios and image maps
    read from the full [B, H, T, T] matrices, then the same selection and loss."""
    from student_train.a3_losses import a3_att_loss, combine_maps, select_heads
    from student_train.head_attention import gather_rows, image_columns, rows_after_image

    from contextlib import nullcontext

    from student_train import a3moe as moe

    image_id = model.config.image_token_id
    ctx = (moe.moe_inputs(model, question_mask=batch["query_mask"], image_mask=batch["input_ids"] == image_id)
           if moe.get_moe(model) is not None else nullcontext())
    with ctx:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"], use_cache=False, output_attentions=True)
    rows, valid = gather_rows(rows_after_image(batch["input_ids"], batch["attention_mask"], image_id))
    cols = image_columns(batch["input_ids"] == image_id)
    ratios, maps = [], []
    for att in out.attentions:  # [B, H, T, T]
        att = att.float()
        b, h, t, _ = att.shape
        sel = torch.gather(att, 2, rows[:, None, :, None].expand(b, h, rows.shape[1], t))
        sel = sel * valid[:, None, :, None]
        m = torch.gather(sel, 3, cols[:, None, None, :].expand(b, h, rows.shape[1], cols.shape[1]))
        ratios.append((m.sum((-1, -2)) / sel.sum((-1, -2)).clamp(min=1e-30)).detach())
        maps.append(m)
    selected = select_heads(torch.stack(ratios, 1), a3.a3_top_heads)
    att_loss = a3_att_loss(combine_maps(maps, selected), valid, batch["a3_labels"], batch["a3_label_mask"], a3.a3_loss)
    return out.loss.float() + a3.a3_lambda * att_loss


def eager_losses(model, batch, align):
    """The reference's way: full eager attention matrices, M_a read from layers[l]'s."""
    from student_train.alignment import get_handles
    from student_train.losses import att_loss, vis_loss

    handles = get_handles(model)
    handles.state.store_rotated = True
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        labels=batch["labels"], use_cache=False, output_attentions=True,
    )
    bsz, n = batch["teacher_attn"].shape
    vis = vis_loss(handles.state.rotated.view(bsz, n, -1), batch["teacher_sim"], batch["teacher_mask"])
    probs = out.attentions[align.align_layer].float().mean(1)  # [B, T, T]
    vis_mask = batch["input_ids"] == model.config.image_token_id
    m_a = torch.stack(
        [probs[b][batch["query_mask"][b]][:, vis_mask[b]].mean(0) for b in range(bsz)]
    )
    att = att_loss(m_a, batch["teacher_attn"], batch["teacher_mask"], mode=align.att_norm)
    return out.loss.float() + align.alpha * vis + align.beta * att


class Runner:
    """One variant's model, optimizer and batch; ``step()`` runs forward + backward + AdamW."""

    def __init__(self, variant: str, preset_name: str, device: str, gradient_checkpointing: bool):
        from student_train.config import AlignArgs, LoraArgs
        from student_train.model import prepare_student

        preset = PRESETS[preset_name]
        self.variant, self.device = variant, device
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        torch.manual_seed(0)
        eager = variant == "eager" or A3_VARIANTS.get(variant, (False, False))[1]
        model = build_model(preset, "eager" if eager else "sdpa", dtype, device)
        self.a3 = None
        if variant in A3_VARIANTS:
            from student_train.methods import get_method

            moe, eager = A3_VARIANTS[variant]
            cfg = a3_config(preset, moe, 0.09)
            self.a3 = cfg.a3
            # the eager variants read the attention from output_attentions: no capture installed
            prep = a3_config(preset, moe, 0.0) if eager else cfg
            self.model = get_method("a3tune").prepare(model, prep, train_projector=False)
            self._finish(device, dtype, gradient_checkpointing)
            return
        if variant == "plain":
            self.align = AlignArgs(align_layer=preset["align_layer"], alpha=0.0, beta=0.0)
        else:
            self.align = AlignArgs(align_layer=preset["align_layer"], alpha=1.0, beta=0.06)
        # the eager variant reads the attention from output_attentions: no capture installed
        prep = AlignArgs(align_layer=self.align.align_layer, alpha=1.0, beta=0.0) if variant == "eager" else self.align
        self.model = prepare_student(model, LoraArgs(lora_r=32, lora_alpha=16, lora_dropout=0.05), prep, train_projector=False)
        self._finish(device, dtype, gradient_checkpointing)

    def _finish(self, device, dtype, gradient_checkpointing: bool):
        from student_train.model import enable_gradient_checkpointing, param_groups

        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model.train()
        self.opt = torch.optim.AdamW(param_groups(self.model, 2e-4, 0.0))
        self.batch = make_batch(self.model, device, dtype)
        if self.a3 is not None:
            self.batch = add_a3_labels(self.batch, 0)

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step(self) -> float:
        from student_train.model import compute_losses

        if self.variant in A3_VARIANTS:
            from student_train.methods.a3tune import compute_a3_losses

            if A3_VARIANTS[self.variant][1]:
                loss = eager_a3_losses(self.model, self.batch, self.a3)
            else:
                loss = compute_a3_losses(self.model, self.batch, self.a3)["loss"]
        elif self.variant == "eager":
            loss = eager_losses(self.model, self.batch, self.align)
        else:
            loss = compute_losses(self.model, self.batch, self.align)["loss"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def timed_step(self) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.step()
        self.sync()
        return time.perf_counter() - t0


def memory_worker(args) -> dict:
    """Peak memory of one variant, alone in this process."""
    runner = Runner(args.worker, args.preset, args.device, args.gradient_checkpointing)
    runner.step()  # warm-up: optimizer state allocated
    runner.sync()
    rss_setup = _current_rss_mb()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runner.step()
    runner.sync()
    result = {"variant": args.worker, "seq_len": int(runner.batch["input_ids"].shape[1])}
    if args.device == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["rss_setup_mb"] = rss_setup
    return result


def timing_worker(args, variants) -> dict:
    """All variants in one process, steps interleaved (A B C A B C ...) so that a drifting machine
    load affects them alike; returns the median seconds per step of each."""
    runners = {v: Runner(v, args.preset, args.device, args.gradient_checkpointing) for v in variants}
    for _ in range(args.warmup):
        for r in runners.values():
            r.step()
    times = {v: [] for v in variants}
    for _ in range(args.steps):
        for v, r in runners.items():
            times[v].append(r.timed_step())
    return {v: {"step_s": statistics.median(t), "times": t} for v, t in times.items()}


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if args.worker == "timing":
        print("RESULT " + json.dumps(timing_worker(args, variants)), flush=True)
        return 0
    if args.worker:
        print("RESULT " + json.dumps(memory_worker(args)), flush=True)
        return 0

    def run_worker(worker: str):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--device", args.device,
               "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--variants", args.variants]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return None
        return json.loads(line[len("RESULT "):])

    results = {}
    for variant in variants:
        results[variant] = run_worker(variant)
        if results[variant]:
            print(f"{variant}: peak {results[variant]['peak_mb']:.0f} MiB", file=sys.stderr)
    timing = run_worker("timing")
    for variant in variants:
        if results[variant] is not None and timing is not None:
            results[variant].update(timing[variant])
            print(f"{variant}: {results[variant]['step_s']:.3f} s/step", file=sys.stderr)
        else:
            results[variant] = None

    preset = PRESETS[args.preset]
    base = results.get("plain")
    mem_label = "peak GPU MiB (max_memory_allocated)" if args.device == "cuda" else "peak RSS MiB"
    seq = next((r["seq_len"] for r in results.values() if r), "?")
    print(
        f"\npreset {args.preset} (hidden {preset['hidden']}, {preset['layers']} layers, "
        f"{(preset['image_size'] // preset['patch_size']) ** 2} image tokens, batch 2, T={seq}), "
        f"device {args.device}, {'bf16' if args.device == 'cuda' else 'fp32'}, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}, torch threads {torch.get_num_threads()}\n"
    )
    extra = " | RSS growth over setup MiB" if args.device == "cpu" else ""
    print(f"| variant | s/step | vs plain LoRA | {mem_label} | vs plain LoRA{extra} |")
    print("|---|---:|---:|---:|---:|" + ("---:|" if extra else ""))
    names = {"plain": "plain LoRA (alpha=beta=0)", "medalign": "MedAlign as built", "eager": "MedAlign, whole model eager",
             "a3tune": "A3Tune as built (no MoE)", "a3tune_eager": "A3Tune, whole model eager (the authors' way)",
             "a3moe": "A3Tune + A3MoE as built", "a3moe_eager": "A3Tune + A3MoE, whole model eager"}
    for variant, r in results.items():
        if r is None:
            print(f"| {names[variant]} | failed | | | |")
            continue
        t_ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        m_ratio = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base else "-"
        row = f"| {names[variant]} | {r['step_s']:.3f} | {t_ratio} | {r['peak_mb']:.0f} | {m_ratio} |"
        if extra:
            row += f" {r['peak_mb'] - r['rss_setup_mb']:.0f} |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
