"""``medalign-eval demo``: all three stages on a generated dataset, in a few minutes on a CPU.

1. data: synthetic scans + LLaVA-style train/test JSON (:mod:`shared.demo_data`);
2. stage 1: ``medalign-cache demo`` builds the teacher cache with a tiny random-weight UniMed-format
   expert (run as its own process: evaluation never imports the teacher side);
3. a tiny random-weight LLaVA student (:mod:`student_train.tiny`);
4. stage 2: two ``medalign-train`` runs from the one cache: plain LoRA (alpha = beta = 0) and MedAlign;
5. stage 3: ``medalign-eval generate`` + ``score`` for each, then ``compare``.

Every stage runs as the same command a user would type, and the commands are printed.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

from shared.demo_data import make_demo_dataset
from shared.errors import MedAlignError

_ENTRY = {
    "medalign-cache": "teacher_cache.cli",
    "medalign-train": "student_train.cli",
    "medalign-eval": "evaluation.cli",
}


def _run(tool: str, *args, log: Path) -> None:
    """Run one of our CLIs in a subprocess, echoing the command; output goes to the console and a log."""
    shown = " ".join([tool, *(shlex.quote(str(a)) for a in args)])
    click.secho(f"\n$ {shown}", fg="cyan", err=True)
    cmd = [sys.executable, "-c", f"import sys; from {_ENTRY[tool]} import main; sys.exit(main())", *map(str, args)]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {shown}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f)  # progress bars (stderr) stay on the console
    if proc.returncode != 0:
        raise MedAlignError(f"`{shown}` failed with status {proc.returncode}; see {log}")
    click.echo(f"  done in {time.perf_counter() - t0:.0f}s", err=True)


def run_pipeline(out: Path, images: int = 24, steps: int = 120) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    log.write_text("")
    click.secho(f"MedAlign demo -> {out} (commands below; their output is in {log})", bold=True, err=True)
    data = make_demo_dataset(out / "data", images)
    cache = out / "cache"
    if not (cache / "manifest.json").is_file():
        _run("medalign-cache", "demo", "--out", cache, "--data", data["train"], "--data", data["test"],
             "--image-root", data["images"], "--grid", "4", log=log)
    student = out / "student"
    if not (student / "config.json").is_file():
        from student_train.tiny import save_tiny_llava
        save_tiny_llava(student, "mistral", layers=4, template="mistral_instruct")
        click.echo(f"\ntiny random-weight LLaVA student (Mistral backbone, 4x4 image grid) -> {student}", err=True)
    runs = {"lora": ("--alpha", "0", "--beta", "0"), "medalign": ("--cache", cache, "--alpha", "1.0", "--beta", "0.06")}
    metrics = {}
    for name, extra in runs.items():
        run_dir = out / "runs" / name
        common = ("--model", student, "--data", data["train"], "--image-root", data["images"], "--out", run_dir,
                  "--align-layer", "2", "--max-steps", steps, "--batch-size", "4", "--grad-accum", "1",
                  "--lr", "5e-3", "--lora-r", "16", "--seed", "0", "--num-workers", "0")
        if not (run_dir / "adapter_config.json").is_file():
            _run("medalign-train", *common, *extra, log=log)
        preds = out / "runs" / name / "preds.jsonl"
        _run("medalign-eval", "generate", "--model", student, "--adapter", run_dir, "--data", data["test"],
             "--image-root", data["images"], "--out", preds, "--batch-size", "8",
             "--decoding", "beam", "--decoding-arg", "num_beams=5", "--max-new-tokens", "8", log=log)  # the paper's decoding
        metrics[name] = out / "runs" / name / "metrics.json"
        _run("medalign-eval", "score", "--pred", preds, "--gt", data["test"], "--task", "vqa", "--out",
             metrics[name], log=log)
    return {"data": out / "data", "cache": cache, "student": student, "log": log, **metrics}


@click.command()
@click.option("--out", default="medalign-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", default=24, show_default=True, help="Number of generated scans.")
@click.option("--steps", default=120, show_default=True, help="Optimizer steps per training run.")
def demo(out, images, steps):
    """Run all three stages on a generated dataset with tiny random-weight models (no downloads)."""
    paths = run_pipeline(out, images, steps)
    click.secho("\nResults (tiny random-weight models on synthetic data: the numbers show the pipeline "
                "works, not MedAlign's effect):", bold=True)
    _compare(paths["lora"], paths["medalign"])
    click.echo(f"""
Artefacts:
  data (LLaVA-style JSON + images)  {paths['data']}
  teacher cache                     {paths['cache']}   (medalign-cache info {paths['cache']})
  student                           {paths['student']}
  LoRA-FT run                       {out / 'runs' / 'lora'}   (adapter, config.json, tensorboard/)
  MedAlign run                      {out / 'runs' / 'medalign'}   (adapter, rotation.safetensors, teacher.json)
  predictions + metrics             {out / 'runs' / '*' / 'preds.jsonl, metrics.json, metrics.md'}
  full log of every command         {paths['log']}
Next: the same commands on real data and weights: see "Reproducing the paper" in README.md.""")


def _compare(lora: Path, medalign: Path) -> None:
    from evaluation.scoring.summary import compare_table, load_metrics
    click.echo(compare_table([("LoRA-FT", load_metrics(lora)), ("MedAlign", load_metrics(medalign))]))
