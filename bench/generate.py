"""Greedy generation throughput of ``medalign-eval generate``: batch 1 vs batch B, in one run.

A random-weight student is saved with :func:`student_train.tiny.save_tiny_llava` and loaded through
the real path (:func:`evaluation.generate.load_generator`); the questions (different lengths, so the
batches are really left-padded) are answered with :func:`evaluation.generate.generate_ids`, every
answer forced to exactly ``--new-tokens`` tokens (the end-of-answer id is set to one outside the
vocabulary, so no answer stops early) so that both batch sizes do the same work. Image preprocessing is done once beforehand and not timed. One warm-up batch per
batch size; then the whole question set is answered ``--repeats`` times per batch size,
interleaved, and the median time is reported.

    python bench/generate.py                                   # medium student, CPU
    python bench/generate.py --preset tiny --questions 32
    python bench/generate.py --device cuda --dtype bfloat16    # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.generate import generate_ids, load_generator  # noqa: E402
from evaluation.generate_config import DecodingConfig  # noqa: E402
from shared.runtime import DTYPE_NAMES, torch_dtype  # noqa: E402
from student_train.tiny import save_tiny_llava  # noqa: E402

PRESETS = {
    # 16 image tokens, hidden 64, 4 layers: the test students
    "tiny": dict(image_size=32, patch_size=8, hidden=64, layers=4, heads=4, kv_heads=2),
    # 576 image tokens (336 / 14) like LLaVA-Med, hidden 512, 8 layers, GQA 8/2
    "medium": dict(image_size=336, patch_size=14, hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1376,
                   vision_hidden=64, vision_layers=2, vision_heads=2),
}

QUESTIONS = [
    "Is there evidence of a pneumothorax?",
    "What organ is shown in this image?",
    "Where is the lesion located?",
    "Is the liver normal? Please choose from the following two options: [yes, no]",
    "What imaging modality was used to take this image of the chest and the lungs?",
    "Are the kidneys enlarged?",
    "Is there a mass in the left upper lobe or in the right lower lobe of the lung?",
    "CT or MRI?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    ap.add_argument("--batch-size", type=int, default=8, help="the batched size compared with batch 1")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_llava(Path(tmp) / "student", "mistral", template="vicuna_v1", **PRESETS[args.preset])
        gen = load_generator(model_dir, dtype=torch_dtype(args.dtype), device=args.device)
    size = gen.model.config.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.questions)]
    pixels = torch.randn(args.questions, 3, size, size, generator=g)
    gen.eos_ids = [len(gen.tokenizer) + 1]  # never generated: every answer has exactly --new-tokens tokens
    dec = DecodingConfig(mode="greedy", max_new_tokens=args.new_tokens)

    def run(bs: int) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(0, len(qs), bs):
            out = generate_ids(gen, qs[s:s + bs], pixels[s:s + bs], dec)
            assert all(len(o) == args.new_tokens for o in out)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    sizes = [1, args.batch_size]
    for bs in sizes:  # warm-up
        generate_ids(gen, qs[:bs], pixels[:bs], dec)
    times: dict[int, list[float]] = {bs: [] for bs in sizes}
    for _ in range(args.repeats):
        for bs in sizes:
            times[bs].append(run(bs))

    n_tok = gen.num_image_tokens
    print(f"preset {args.preset} ({n_tok} image tokens, hidden {gen.model.config.text_config.hidden_size}, "
          f"{gen.model.config.text_config.num_hidden_layers} layers), device {args.device}, {args.dtype}, "
          f"{args.questions} questions x {args.new_tokens} new tokens, greedy, median of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| batch | seconds | samples/s | speed-up vs batch 1 |")
    print("|------:|--------:|----------:|--------------------:|")
    base = statistics.median(times[1])
    for bs in sizes:
        t = statistics.median(times[bs])
        print(f"| {bs} | {t:.2f} | {args.questions / t:.2f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
