"""The recipe: resume gives the same per-step losses and weights as an uninterrupted run;
checkpoint selection; JSON RNG state round trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from train_helpers import write_images, write_records, write_teacher_cache

from student_train import cli
from student_train.checkpoint import find_checkpoint
from student_train.rng import rng_state, set_rng_state


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_student_dirs):
    d = tmp_path_factory.mktemp("resume")
    images = write_images(d / "images", 5)
    write_records(d / "train.json", images)
    cache, _ = write_teacher_cache(d / "cache", d / "images", images, 4, skip=(images[3],))
    return d, cache, tiny_student_dirs["mistral"]


def run(setup, out, *extra):
    d, cache, model = setup
    args = ["--cache", str(cache), "--model", str(model), "--data", str(d / "train.json"),
            "--image-root", str(d / "images"), "--out", str(out), "--align-layer", "2", "--allow-missing",
            "--batch-size", "2", "--grad-accum", "2", "--epochs", "2", "--lr", "5e-3", "--projector-lr", "1e-3",
            "--warmup-ratio", "0.3", "--lora-dropout", "0.3", "--seed", "7", *extra]
    res = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_resume_gives_identical_losses_and_weights(setup, tmp_path):
    # 5 samples, batch 2 -> 3 micro-batches per epoch, accumulation 2 -> 2 steps per epoch, 4 steps.
    full = tmp_path / "full"
    run(setup, full)
    part = tmp_path / "part"
    run(setup, part, "--stop-after", "1")           # stops mid-epoch
    assert not (part / "adapter_model.safetensors").exists()  # not finished: no final adapter
    assert find_checkpoint(part).name == "step-00000001"
    run(setup, part, "--resume", "--stop-after", "2")  # crosses the epoch boundary
    run(setup, part, "--resume", "--num-workers", "2")  # run-control flags may change
    a = [json.loads(x) for x in (full / "train_log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "vis_loss", "att_loss", "lr", "no_teacher"):
            assert ra[k] == rb[k], (ra["step"], k)
    wa = load_file(str(full / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    wb = load_file(str(part / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any("multi_modal_projector" in k for k in wa) and any("medalign_rotation" in k for k in wa)
    ra = load_file(str(full / "rotation.safetensors"))["weight"]
    assert torch.equal(ra, load_file(str(part / "rotation.safetensors"))["weight"])
    # resuming a finished run is a no-op that keeps the result
    run(setup, part, "--resume")
    assert len((part / "train_log.jsonl").read_text().splitlines()) == 4


def test_resume_refuses_changed_settings(setup, tmp_path):
    from student_train.config import TrainConfig
    d, cache, model = setup
    out = tmp_path / "run"
    flags = dict(cache=str(cache), model=str(model), data=str(d / "train.json"), image_root=str(d / "images"),
                 out=str(out), align_layer=2, allow_missing=True)
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "checkpoints" / "step-00000001" / "state.json").write_text("{}")
    (out / "config.json").write_text(json.dumps(TrainConfig.from_flat({**flags, "lr": 5e-3}).to_dict()))
    args = [x for k, v in flags.items() if v is not True for x in ("--" + k.replace("_", "-"), str(v))]
    res = CliRunner().invoke(cli.main, args + ["--allow-missing", "--resume", "--lr", "1e-3", "--num-workers", "1"])
    assert res.exit_code == 2 and "--resume with different settings" in res.output
    assert "lr: 0.005 -> 0.001" in res.output and "num_workers" not in res.output


def test_rng_state_round_trips_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_find_checkpoint_ignores_half_written(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step-00000002", True), ("step-00000010", False), (".tmp-step-00000012", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "state.json").write_text("{}")
    assert find_checkpoint(tmp_path).name == "step-00000002"
    assert find_checkpoint(tmp_path / "nothing") is None
