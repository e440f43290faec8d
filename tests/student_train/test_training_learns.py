"""Training does something: a few dozen optimizer steps on one fixed tiny batch lower the loss
(plain LoRA and with MedAlign's L_vis / L_att on), every step logs its grad norm and peak memory,
and the logged learning rate is transformers' cosine schedule with warmup."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from train_helpers import write_images, write_records, write_teacher_cache

from student_train.config import TrainConfig
from student_train.recipe import train

STEPS = 30
LR = 1e-2

pytestmark = pytest.mark.slow  # whole training runs (~9 s in all); CI runs the slow tests


@pytest.fixture(scope="module")
def tiny_batch(tmp_path_factory, tiny_student_dirs):
    """One record written 2 x STEPS times (distinct ids): every step trains on the same batch of two,
    and the whole run is one epoch (one checkpoint, at the end)."""
    d = tmp_path_factory.mktemp("learns")
    images = write_images(d / "images", 1)
    record = write_records(d / "train.json", images)[0]
    (d / "train.json").write_text(json.dumps([{**record, "id": i} for i in range(2 * STEPS)]))
    cache, _ = write_teacher_cache(d / "cache", d / "images", images, 4)
    return d, cache, tiny_student_dirs["llama"]


def _train(tiny_batch, out, **settings) -> list[dict]:
    d, cache, model = tiny_batch
    cfg = TrainConfig.from_flat({
        "model": str(model), "data": str(d / "train.json"), "image_root": str(d / "images"), "out": str(out),
        "cache": str(cache), "align_layer": 2, "batch_size": 2, "grad_accum": 1, "max_steps": STEPS, "lr": LR,
        "warmup_ratio": 0.1, "lora_dropout": 0.0, "device": "cpu", "save_every": 0, **settings})
    assert train(cfg)
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def _first_last(log: list[dict], key: str = "loss", k: int = 5) -> tuple[float, float]:
    values = [r[key] for r in log]
    return sum(values[:k]) / k, sum(values[-k:]) / k


@pytest.mark.parametrize("settings", [{"alpha": 0.0, "beta": 0.0, "max_grad_norm": 0.0},
                                      {"alpha": 1.0, "beta": 0.06, "max_grad_norm": 1.0}],
                         ids=["plain_lora_unclipped", "medalign_clipped"])
def test_a_few_dozen_steps_on_a_fixed_batch_lower_the_loss(tiny_batch, tmp_path, settings):
    # measured: last-5 mean / first-5 mean 0.034 for both; 1.000 with lr 1e-9 (an optimizer that does nothing)
    log = _train(tiny_batch, tmp_path / "run", **settings)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    first, last = _first_last(log)
    assert last < 0.5 * first, (first, last)
    # the library schedule: linear warmup over ceil(0.1 * 30) = 3 steps, then a cosine down to 0
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    ref = get_cosine_schedule_with_warmup(opt, math.ceil(0.1 * STEPS), STEPS)
    expected = []
    for _ in range(STEPS):
        expected.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    assert [r["lr"] for r in log] == expected
    # told to the user: the gradient norm (computed with clipping off too) and peak memory
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) and r["peak_mem_mib"] > 0 for r in log)
    if settings["max_grad_norm"]:
        assert log[0]["grad_norm"] > settings["max_grad_norm"]  # the norm before clipping (~6 here)


@pytest.mark.parametrize("term", ["vis", "grad"])
def test_non_finite_step_stops_before_the_update_and_stays_resumable(tiny_batch, tmp_path, monkeypatch, term):
    """A non-finite loss term (or gradient) at step 3 stops the run there, naming the step and the
    term; no adapter is written from that state, the step-2 checkpoint stays, --resume finishes."""
    from shared.errors import MedAlignError
    from student_train import model as student_model

    real = student_model.compute_losses
    calls = {"n": 0}

    def poisoned(model, batch, align):
        out = real(model, batch, align)
        calls["n"] += 1
        if calls["n"] == 3:
            if term == "vis":
                out["vis_loss"] = out["vis_loss"] * float("nan")
                out["loss"] = out["lm_loss"] + out["vis_loss"]
            else:  # finite losses, a gradient that is not
                for p in model.parameters():
                    if p.requires_grad:
                        p.register_hook(lambda g: g * float("inf"))
                        break
        return out

    monkeypatch.setattr(student_model, "compute_losses", poisoned)
    out = tmp_path / "run"
    want = re.escape("loss term(s) vis") if term == "vis" else "gradient norm"
    with pytest.raises(MedAlignError, match=rf"step 3: non-finite {want}.*step-00000002\) is resumable"):
        _train(tiny_batch, out, max_steps=5, save_every=1)
    assert not (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    monkeypatch.setattr(student_model, "compute_losses", real)
    log = _train(tiny_batch, out, max_steps=5, save_every=1, resume=True)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and all(math.isfinite(r["loss"]) for r in log)
