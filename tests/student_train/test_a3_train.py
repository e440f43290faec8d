"""``medalign-train --method a3tune`` end to end on the tiny LLaVA with a fake A3 cache: the
attention loss goes down, a resumed run equals an uninterrupted one, the plan refuses bad caches,
and the config refuses bad settings."""

from __future__ import annotations

import json

import pytest
import torch
from a3_train_fakes import use_fake_a3, write_fake_a3_cache
from click.testing import CliRunner
from safetensors.torch import load_file
from train_helpers import write_images, write_records

from shared.errors import MedAlignError
from student_train import cli
from student_train.config import TrainConfig
from student_train.recipe import Recipe

GRID = 4  # the tiny students: 32 / 8 -> 4 x 4 = 16 image tokens


@pytest.fixture(autouse=True)
def fake_a3(monkeypatch):
    use_fake_a3(monkeypatch)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("a3data")
    images = write_images(d / "images", 4)
    recs = write_records(d / "train.json", images, 6)
    write_fake_a3_cache(d / "a3cache", d / "images", recs, GRID, k=2, empty=(3,))
    return d, recs


def flags(d, model, out, **extra) -> dict:
    return {"method": "a3tune", "cache": str(d / "a3cache"), "model": str(model), "data": str(d / "train.json"),
            "image_root": str(d / "images"), "out": str(out), "a3_top_heads": 6, "a3_lambda": 1.0,
            "lora_dropout": 0.0, "seed": 3, "a3_moe": False, **extra}


def cli_args(f: dict) -> list[str]:
    """``flags()`` as command-line arguments (booleans as ``--x`` / ``--no-x``)."""
    args = [x for k, v in f.items() if not isinstance(v, bool) for x in ("--" + k.replace("_", "-"), str(v))]
    return args + [("--" if v else "--no-") + k.replace("_", "-") for k, v in f.items() if isinstance(v, bool)]


def run_cli(d, model, out, *extra):
    args = cli_args(flags(d, model, out))
    res = CliRunner().invoke(cli.main, args + ["--batch-size", "2", "--grad-accum", "2", "--epochs", "2",
                                               "--lr", "5e-3", "--warmup-ratio", "0.3", "--lora-dropout", "0.2",
                                               *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_a3tune_learns_the_masks(data, tiny_mistral_dir, tmp_path):
    """Attention-only objective on the same 2 samples: the a3 loss must fall."""
    d, _ = data
    cfg = TrainConfig.from_flat(flags(d, tiny_mistral_dir, tmp_path / "run", a3_lambda=50.0, lr=2e-2, max_steps=12,
                                      batch_size=2, grad_accum=1, warmup_ratio=0.0, log_every=100, max_grad_norm=0.0))
    recipe = Recipe(cfg)
    recipe.setup()
    recipe.dataset.samples = recipe.dataset.samples[:2] * 12  # the same batch (both with masks) 12 times
    recipe.sampler = type(recipe.sampler)(24, shuffle=False)
    recipe.micro_per_epoch = recipe.steps_per_epoch = 12  # one epoch, one checkpoint
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    att = [r["a3_att_loss"] for r in log]
    assert all(k in log[0] for k in ("lm_loss", "a3_att_loss", "balance_loss"))
    assert att[0] > 0 and att[-1] < 0.8 * att[0], att
    assert all(r["balance_loss"] == 0 for r in log)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method"]["method"] == "a3tune"
    teacher = json.loads((tmp_path / "run" / "teacher.json").read_text())
    assert teacher["method"] == "a3tune" and teacher["signals"] == "a3tune"


@pytest.mark.parametrize("moe", [False, True], ids=["lora", "a3moe"])
def test_resume_equals_uninterrupted(data, tiny_mistral_dir, tmp_path, moe):
    d, _ = data
    full, part = tmp_path / "full", tmp_path / "part"
    flag = "--a3-moe" if moe else "--no-a3-moe"
    run_cli(d, tiny_mistral_dir, full, flag)
    run_cli(d, tiny_mistral_dir, part, flag, "--stop-after", "1")
    run_cli(d, tiny_mistral_dir, part, flag, "--resume")
    a = [json.loads(x) for x in (full / "train_log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "a3_att_loss", "balance_loss", "lr"):
            assert ra[k] == rb[k], (ra["step"], k)
    assert any(r["a3_att_loss"] > 0 for r in a)
    wa = load_file(str(full / "adapter_model.safetensors"))
    wb = load_file(str(part / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (full / "rotation.safetensors").exists()
    assert (full / "moe.safetensors").is_file() == moe
    if moe:
        ma, mb = load_file(str(full / "moe.safetensors")), load_file(str(part / "moe.safetensors"))
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_plan_checks_the_cache(data, tiny_mistral_dir, tiny_llama_dir, tmp_path):
    from student_train.plan import plan_run
    d, recs = data
    # a question not in the cache: refused unless --allow-missing
    cache2 = tmp_path / "partial"
    write_fake_a3_cache(cache2, d / "images", recs, GRID, skip=(recs[1]["id"],))
    with pytest.raises(MedAlignError, match="not in the teacher cache"):
        plan_run(TrainConfig.from_flat(flags(d, tiny_mistral_dir, tmp_path / "o1", cache=str(cache2))))
    plan = plan_run(TrainConfig.from_flat(flags(d, tiny_mistral_dir, tmp_path / "o2", cache=str(cache2),
                                                allow_missing=True)))
    assert plan.stats.no_teacher == 1
    # the grid must be the student's
    cache3 = tmp_path / "grid"
    write_fake_a3_cache(cache3, d / "images", recs, 5)
    with pytest.raises(MedAlignError, match="5x5 grid"):
        plan_run(TrainConfig.from_flat(flags(d, tiny_mistral_dir, tmp_path / "o3", cache=str(cache3))))
    # a question edited after the build
    edited = json.loads((d / "train.json").read_text())
    edited[2]["conversations"][0]["value"] = "<image>\nIs this a different question?"
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(MedAlignError, match="query text changed"):
        plan_run(TrainConfig.from_flat(flags(d, tiny_mistral_dir, tmp_path / "o4", data=str(tmp_path / "edited.json"))))
    # not an A3 cache; too many heads for the student
    (tmp_path / "plain").mkdir()
    with pytest.raises(MedAlignError, match="is not an A3 cache"):
        plan_run(TrainConfig.from_flat(flags(d, tiny_mistral_dir, tmp_path / "o5", cache=str(tmp_path / "plain"))))
    with pytest.raises(MedAlignError, match="4 layers x 4 heads = 16"):
        plan_run(TrainConfig.from_flat(flags(d, tiny_llama_dir, tmp_path / "o6", a3_top_heads=17)))


def test_stale_image_is_refused(data, tiny_mistral_dir, tmp_path):
    import shutil

    from PIL import Image

    from student_train.plan import plan_run
    d, recs = data
    root = tmp_path / "images"
    shutil.copytree(d / "images", root)
    Image.new("RGB", (20, 30), (9, 9, 9)).save(root / recs[0]["image"])
    cfg = TrainConfig.from_flat(flags(d, tiny_mistral_dir, tmp_path / "o", image_root=str(root)))
    plan = plan_run(cfg)
    from student_train.methods import get_method
    from student_train.data import TrainDataset
    ds = TrainDataset(plan.samples, root, plan.image_processor, image_token_id=plan.image_token_id,
                      num_image_tokens=plan.num_image_tokens, **get_method("a3tune").dataset_kwargs(cfg, plan))
    with pytest.raises(MedAlignError, match="changed since the A3 cache"):
        ds[0]
    item = ds[3]  # record 3: in the cache with no masks
    assert item["a3_labels"].shape == (0, 16) and item["teacher_mask"] is True


@pytest.mark.parametrize("bad, message", [
    (dict(a3_top_heads=0), "--a3-top-heads must be > 0"),
    (dict(a3_loss="l2"), "unknown --a3-loss 'l2'"),
    (dict(a3_lambda=-1.0), "--a3-lambda must be >= 0"),
    (dict(a3_moe_preset="big"), "unknown --a3-moe-preset"),
    (dict(a3_moe=False, a3_balance=0.01), "--a3-balance needs --a3-moe"),
    (dict(a3_moe=False, a3_reference_moe=True), "--a3-reference-moe needs --a3-moe"),
    (dict(cache=None), "--method a3tune needs --cache"),
    (dict(method="medalign", cache="c", a3_top_heads=64), "--a3-top-heads only applies to --method a3tune"),
    (dict(method="lora"), "unknown --method 'lora'"),
    (dict(a3_lambda=float("nan")), "--a3-lambda must be a finite number"),
])
def test_config_validation(bad, message):
    base = {"method": "a3tune", "cache": "c", "model": "m", "data": "d", "image_root": "i", "out": "o"}
    with pytest.raises(MedAlignError, match=message.replace("(", r"\(")):
        TrainConfig.from_flat({**base, **bad})


def test_lambda_zero_needs_no_cache():
    cfg = TrainConfig.from_flat({"method": "a3tune", "a3_lambda": 0.0, "model": "m", "data": "d", "image_root": "i",
                                 "out": "o"})
    assert cfg.method.method == "a3tune" and cfg.to_dict()["a3"]["a3_top_heads"] == 128


def test_defaults_are_the_published_runs():
    """--method a3tune defaults to A3Tune's scripts (A3MoE on, LoRA r 64, alpha 16), medalign to
    MedAlign's (r 32); a rank given on the command line wins."""
    base = {"model": "m", "data": "d", "image_root": "i", "out": "o", "cache": "c"}
    a3 = TrainConfig.from_flat({**base, "method": "a3tune"})
    assert (a3.a3.a3_moe, a3.lora.lora_r, a3.lora.lora_alpha, a3.a3.a3_lambda) == (True, 64, 16, 0.09)
    med = TrainConfig.from_flat(base)
    assert (med.lora.lora_r, med.lora.lora_alpha) == (32, 16)
    assert TrainConfig.from_flat({**base, "method": "a3tune", "lora_r": 8}).lora.lora_r == 8
    assert TrainConfig.from_flat({**base, "method": "a3tune", "a3_moe": False}).a3.a3_moe is False


def test_a3moe_wiring(data, tiny_mistral_dir, tmp_path):
    """--a3-moe: LoRA leaves q_proj/k_proj to the experts, the balance term is logged and weighted,
    the experts are trained and saved with the adapter."""
    d, _ = data
    out = tmp_path / "moe"
    run_cli(d, tiny_mistral_dir, out, "--a3-moe", "--a3-moe-preset", "report", "--a3-balance", "0.01",
            "--max-steps", "2")
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(r["balance_loss"] > 0 for r in log)
    for r in log:
        assert r["loss"] == pytest.approx(r["lm_loss"] + 1.0 * r["a3_att_loss"] + 0.01 * r["balance_loss"], rel=1e-5)
    assert (out / "moe.safetensors").is_file() and (out / "moe.json").is_file()
    assert json.loads((out / "moe.json").read_text())["settings"]["k_top_k"] == 2
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert not any("q_proj" in k or "k_proj" in k for k in adapter) and any("v_proj" in k for k in adapter)
    moe = load_file(str(out / "moe.safetensors"))
    ckpt = load_file(str(out / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert any("moe" in k for k in ckpt)
    assert any(float(v.abs().sum()) > 0 for k, v in moe.items() if "moe_b" in k)  # the experts moved


@pytest.mark.slow
def test_a3tune_two_process_gloo_matches_one_process(data, tiny_qwen2_dir, tmp_path):
    """DDP: 2 ranks x 1 sample per step train like 1 process accumulating the same 2 samples."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    d, _ = data
    common = ["--epochs", "1", "--lr", "5e-3", "--warmup-ratio", "0", "--lora-dropout", "0", "--device", "cpu",
              "--batch-size", "1"]
    single_args = cli_args(flags(d, tiny_qwen2_dir, tmp_path / "single")) + common
    res = CliRunner().invoke(cli.main, single_args + ["--grad-accum", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ddp_args = cli_args(flags(d, tiny_qwen2_dir, tmp_path / "ddp")) + common
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(here.parent.parent), str(here), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(here / "a3_train_fakes.py"), *ddp_args, "--grad-accum", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = [json.loads(x) for x in (tmp_path / "single" / "train_log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "a3_att_loss"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    wa = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)
