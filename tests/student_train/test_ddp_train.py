"""Multi-process training on CPU: `torchrun --nproc-per-node 2` with the gloo backend.

Two ranks with one sample per step each must train exactly like one process accumulating the same
two samples: same per-step losses and the same final weights. That holds only if each rank reads its
own slice of the epoch order (rank r takes positions r, r + 2, ...) and the gradients are averaged.
Marked slow: two fresh interpreters importing torch/transformers take ~25 s on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from train_helpers import write_images, write_records, write_teacher_cache

from student_train import cli


def _args(d, cache, model, out, *extra):
    return ["--cache", str(cache), "--model", str(model), "--data", str(d / "train.json"),
            "--image-root", str(d / "images"), "--out", str(out), "--align-layer", "2", "--epochs", "1",
            "--lr", "5e-3", "--projector-lr", "1e-3", "--warmup-ratio", "0", "--lora-dropout", "0",
            "--device", "cpu", "--batch-size", "1", *extra]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path, tiny_student_dirs):
    d = tmp_path
    images = write_images(d / "images", 6)
    write_records(d / "train.json", images)
    cache, _ = write_teacher_cache(d / "cache", d / "images", images, 4)
    model = tiny_student_dirs["qwen2"]

    single = d / "single"
    res = CliRunner().invoke(cli.main, _args(d, cache, model, single, "--grad-accum", "2"), catch_exceptions=False)
    assert res.exit_code == 0, res.output

    ddp = d / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "student_train.cli", *_args(d, cache, model, ddp, "--grad-accum", "1", "--num-workers", "1")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr + proc.stdout

    a = [json.loads(x) for x in (single / "train_log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (ddp / "train_log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3  # 6 samples, 2 per optimizer step
    for ra, rb in zip(a, b):
        assert rb["samples"] == 2
        for k in ("loss", "lm_loss", "vis_loss", "att_loss"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    wa = load_file(str(single / "checkpoints" / "step-00000003" / "trainable.safetensors"))
    wb = load_file(str(ddp / "checkpoints" / "step-00000003" / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)
    ckpt = d / "ddp" / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in ckpt.glob("rng-rank*.json")) == ["rng-rank00000.json", "rng-rank00001.json"]
    assert (ddp / "adapter_model.safetensors").is_file() and (ddp / "rotation.safetensors").is_file()
