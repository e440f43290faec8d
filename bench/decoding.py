"""Throughput of every ``medalign-eval generate --decoding`` method against greedy, batch 1 and batch B.

Every method in the registry (:func:`evaluation.decoding.names`; a method merged later is measured
without editing this file) answers the same questions about the same images through the real path
(:func:`evaluation.generate.generate_ids`), with its default arguments, on a random-weight student
saved with :func:`student_train.tiny.save_tiny_llava` (the presets of ``bench/generate.py``). Every
answer is forced to exactly ``--new-tokens`` tokens (the end-of-answer id is set to one outside the
vocabulary), so all methods and batch sizes do the same number of steps. Image preprocessing is done
once and not timed. Per method and batch size: one warm-up batch, then the whole question set
``--repeats`` times; the median is reported, with samples/s relative to greedy at the same batch
size and batch B's speed-up over batch 1.

    python bench/decoding.py                                    # medium student, CPU, all methods
    python bench/decoding.py --preset tiny --questions 8 --methods greedy,vcd,m3id
    python bench/decoding.py --arg vcd:sample=false --arg beam:num_beams=3
    python bench/decoding.py --device cuda --dtype bfloat16     # on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.decoding import names  # noqa: E402
from evaluation.generate import generate_ids, load_generator  # noqa: E402
from evaluation.generate_config import DecodingConfig  # noqa: E402
from shared.runtime import DTYPE_NAMES, torch_dtype  # noqa: E402
from student_train.tiny import save_tiny_llava  # noqa: E402


def _generate_bench():
    """bench/generate.py as a module (its PRESETS and QUESTIONS are shared, not copied)."""
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _method_args(items: list[str], methods: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {m: [] for m in methods}
    for item in items:
        method, sep, kv = item.partition(":")
        if not sep or method not in out:
            raise SystemExit(f"--arg {item!r}: expected METHOD:KEY=VALUE with METHOD one of {', '.join(methods)}")
        out[method].append(kv)
    return out


def main() -> None:
    bg = _generate_bench()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(bg.PRESETS), default="medium")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--arg", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="a --decoding-arg for one method (repeatable)")
    ap.add_argument("--batch-size", type=int, default=8, help="the batched size compared with batch 1")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else list(names())
    if "greedy" not in methods:
        methods.insert(0, "greedy")
    extra = _method_args(args.arg, methods)
    configs = {m: DecodingConfig(mode=m, args=tuple(extra[m]), max_new_tokens=args.new_tokens) for m in methods}

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_llava(Path(tmp) / "student", "mistral", template="vicuna_v1", **bg.PRESETS[args.preset])
        gen = load_generator(model_dir, dtype=torch_dtype(args.dtype), device=args.device)
    gen.eos_ids = [len(gen.tokenizer) + 1]  # never generated: every answer has exactly --new-tokens tokens
    size = gen.model.config.vision_config.image_size
    qs = [bg.QUESTIONS[i % len(bg.QUESTIONS)] for i in range(args.questions)]
    keys = [str(i) for i in range(args.questions)]
    pixels = torch.randn(args.questions, 3, size, size, generator=torch.Generator().manual_seed(0))

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(dec: DecodingConfig, bs: int) -> float:
        sync()
        t0 = time.perf_counter()
        for s in range(0, len(qs), bs):
            out = generate_ids(gen, qs[s:s + bs], pixels[s:s + bs], dec, keys=keys[s:s + bs])
            assert all(len(o) == args.new_tokens for o in out), [len(o) for o in out]
        sync()
        return time.perf_counter() - t0

    sizes = [1, args.batch_size]
    times: dict[tuple[str, int], float] = {}
    for m in methods:
        for bs in sizes:
            generate_ids(gen, qs[:bs], pixels[:bs], configs[m], keys=keys[:bs])  # warm-up
            times[m, bs] = statistics.median(run(configs[m], bs) for _ in range(args.repeats))
            print(f"  {m} batch {bs}: {times[m, bs]:.2f} s", file=sys.stderr, flush=True)

    cfg = gen.model.config.text_config
    print(f"preset {args.preset} ({gen.num_image_tokens} image tokens, hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers), device {args.device}, {args.dtype}, {args.questions} questions x "
          f"{args.new_tokens} new tokens, default arguments{' + ' + ' '.join(args.arg) if args.arg else ''}, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}\n")
    b = args.batch_size
    print(f"| method | batch 1 samples/s | batch 1 vs greedy | batch {b} samples/s | batch {b} vs greedy "
          f"| batch {b} vs batch 1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in methods:
        r1, rb = args.questions / times[m, 1], args.questions / times[m, b]
        g1, gb = args.questions / times["greedy", 1], args.questions / times["greedy", b]
        print(f"| {m} | {r1:.2f} | {r1 / g1:.2f}x | {rb:.2f} | {rb / gb:.2f}x | {rb / r1:.2f}x |")


if __name__ == "__main__":
    main()
