"""medalign-train end to end on a tiny student and a tiny cache: artefacts, ablations, config
precedence, and every bad input refused before RUN_DIR exists."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from cache_helpers import chunk_span, flip_bytes
from train_helpers import write_images, write_records, write_teacher_cache

from student_train import cli
from student_train.config import GROUPS, TrainConfig

LAYER = "2"  # valid for the 4-layer tiny students


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_student_dirs):
    d = tmp_path_factory.mktemp("train")
    images = write_images(d / "images", 6)
    write_records(d / "train.json", images)
    cache, _ = write_teacher_cache(d / "cache", d / "images", images, 4)
    return {"dir": d, "images": images, "cache": cache, "model": tiny_student_dirs["llama"]}


def base_args(s, out, *extra):
    return ["--cache", str(s["cache"]), "--model", str(s["model"]), "--data", str(s["dir"] / "train.json"),
            "--image-root", str(s["dir"] / "images"), "--out", str(out), "--align-layer", LAYER,
            "--batch-size", "2", "--grad-accum", "2", *extra]


def invoke(args):
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    return result


def read_log(out):
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def test_end_to_end_artefacts(setup, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shared.cache import open_cache
    from student_train.model import load_student

    out = tmp_path / "run"
    res = invoke(base_args(setup, out, "--max-steps", "3", "--save-every", "1", "--projector-lr", "1e-3",
                           "--lr", "1e-2"))
    assert res.exit_code == 0, res.output
    # adapter in the standard format
    base, _ = load_student(setup["model"])
    peft = PeftModel.from_pretrained(base, out)
    trained = load_file(str(out / "checkpoints" / "step-00000003" / "trainable.safetensors"))
    loaded = dict(peft.named_parameters())
    lora = [k for k in trained if "lora_" in k]
    assert lora and all(torch.equal(loaded[k], trained[k]) for k in lora)
    assert any(trained[k].abs().sum() > 0 for k in lora if "lora_B" in k)  # training moved them
    # W
    w = load_file(str(out / "rotation.safetensors"))["weight"]
    assert w.dtype == torch.float32 and w.shape == (64, 64) and w.abs().sum() > 0
    assert json.loads((out / "rotation.json").read_text())["layer"] == 2
    # resolved config and teacher identity
    cfg = json.loads((out / "config.json").read_text())
    assert set(cfg) == set(GROUPS) and cfg["align"]["align_layer"] == 2 and cfg["optim"]["max_steps"] == 3
    assert cfg["optim"]["projector_lr"] == 1e-3 and cfg["align"]["cache"] == str(setup["cache"])
    assert json.loads((out / "teacher.json").read_text()) == open_cache(setup["cache"]).identity()
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["used"] == 6 and stats["too_long"] == 0 and stats["template"] == "vicuna_v1"
    # logs: per-step JSONL and TensorBoard scalars
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["no_teacher"] == 0 for r in log)
    for r in log:
        assert r["loss"] == pytest.approx(r["lm_loss"] + 1.0 * r["vis_loss"] + 0.06 * r["att_loss"], rel=1e-5)
        assert r["vis_loss"] > 0 and r["att_loss"] > 0
    assert [r["samples"] for r in log] == [4, 2, 4]  # 6 samples = 3 micro-batches of 2: windows of 2 and 1
    assert log[0]["lr"] == 0.0 and log[1]["lr"] == pytest.approx(1e-2)  # warmup ceil(0.03 * 3) = 1 step
    assert log[1]["projector_lr"] == pytest.approx(1e-3)
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lm_loss", "vis_loss", "att_loss", "lr", "samples_per_s"} <= tags
    assert {"grad_norm", "peak_mem_mib"} <= tags and all(r["grad_norm"] > 0 and r["peak_mem_mib"] > 0 for r in log)
    assert [e.value for e in acc.Scalars("lm_loss")] == pytest.approx([r["lm_loss"] for r in log])
    # atomic checkpoints: only the latest kept, nothing temporary left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
    assert not list(out.rglob(".tmp*")) and not (out / ".final-tmp").exists()


def test_projector_frozen_by_default_and_not_saved(setup, tmp_path):
    """The reference freezes the projector (``mm_projector_lr`` is never read): by default it does
    not move, is not in the optimizer, and is not saved with the adapter."""
    from safetensors.torch import load_file

    from student_train.model import load_student

    out = tmp_path / "frozen"
    res = invoke(base_args(setup, out, "--max-steps", "2", "--lr", "1e-2"))
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optim"]["projector_lr"] == 0.0 and cfg["align"]["att_norm"] == "l2"
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert not any("multi_modal_projector" in k for k in saved)
    assert any("lora_" in k for k in saved)
    trained = load_file(str(out / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert not any("multi_modal_projector" in k for k in trained)
    assert "projector_lr" not in read_log(out)[-1]
    # the loaded run's projector is the base model's, bit for bit
    from evaluation.generate import load_generator

    base, _ = load_student(setup["model"])
    gen = load_generator(setup["model"], out)
    want = {k: p for k, p in base.named_parameters() if "multi_modal_projector" in k}
    got = {k.split("multi_modal_projector.")[-1]: p for k, p in gen.model.named_parameters()
           if "multi_modal_projector" in k}
    want = {k.split("multi_modal_projector.")[-1]: p for k, p in want.items()}
    assert len(want) == 4 and set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("storage", ["zarr", "hdf5"])
def test_an_image_changed_after_the_cache_build_stops_training(tmp_path, tiny_student_dirs, storage):
    """Issue 15 item 3: an image edited in place after the build was trained with its stale teacher
    row; the bytes training reads are checked against the row's key (--allow-missing does not cover it)."""
    from PIL import Image

    images = write_images(tmp_path / "images", 4)
    write_records(tmp_path / "train.json", images)
    cache, _ = write_teacher_cache(tmp_path / "cache", tmp_path / "images", images, 4, storage=storage)
    img = Image.open(tmp_path / "images" / images[2]).convert("RGB")
    img.putpixel((0, 0), tuple(255 - v for v in img.getpixel((0, 0))))
    img.save(tmp_path / "images" / images[2])
    s = {"cache": cache, "model": tiny_student_dirs["llama"], "dir": tmp_path}
    res = CliRunner().invoke(cli.main, base_args(s, tmp_path / "run", "--max-steps", "2", "--allow-missing"))
    assert res.exit_code == 2, res.output
    assert f"image {images[2]} changed since the teacher cache" in res.output and "rebuild" in res.output
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("storage", ["zarr", "hdf5"])
def test_a_flipped_byte_in_the_cache_stops_training_with_one_line(tmp_path, tiny_student_dirs, storage):
    """Issue 15 item 1: two bytes flipped inside one stored S_e chunk trained on without a word
    (vis_loss 15,504 against 0.073); now the read fails its chunk checksum and the run stops with
    one line naming the cache, shard, row and image, before any adapter is written."""
    images = write_images(tmp_path / "images", 4)
    write_records(tmp_path / "train.json", images)
    cache, _ = write_teacher_cache(tmp_path / "cache", tmp_path / "images", images, 4, storage=storage)
    path, start, size = chunk_span(cache, storage, "sim", 1, shard_size=256, shard_rows=4)
    flip_bytes(path, start + size // 2)
    s = {"cache": cache, "model": tiny_student_dirs["llama"], "dir": tmp_path}
    res = CliRunner().invoke(cli.main, base_args(s, tmp_path / "run", "--max-steps", "4"))
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    assert f"teacher cache {cache}: row 1 (shard 0, image {images[1]})" in errors[0]
    assert "medalign-cache verify" in errors[0]
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("storage", ["zarr", "hdf5"])
def test_a_structurally_broken_cache_is_refused_before_the_model_loads(tmp_path, tiny_student_dirs, storage,
                                                                        monkeypatch):
    """Issue 15 item 2: a shard file gone is found by the structural check in plan_run, before
    the student is loaded (a loaded model here would fail the test)."""
    import student_train.model as model_mod

    images = write_images(tmp_path / "images", 4)
    write_records(tmp_path / "train.json", images)
    cache, _ = write_teacher_cache(tmp_path / "cache", tmp_path / "images", images, 4, storage=storage)
    (cache / ("attn/c/0/0" if storage == "zarr" else "shards/shard-00000.h5")).unlink()

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the cache was checked")

    monkeypatch.setattr(model_mod, "load_student", no_load)
    s = {"cache": cache, "model": tiny_student_dirs["llama"], "dir": tmp_path}
    res = CliRunner().invoke(cli.main, base_args(s, tmp_path / "run", "--max-steps", "1"))
    assert res.exit_code == 2, res.output
    assert "is not what its manifest says" in res.output and "missing" in res.output
    assert "medalign-cache verify" in res.output


def test_plain_lora_needs_no_cache(setup, tmp_path):
    out = tmp_path / "lora"
    args = [a for a in base_args(setup, out, "--alpha", "0", "--beta", "0", "--max-steps", "1")]
    i = args.index("--cache")
    del args[i:i + 2]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "teacher.json").read_text())["teacher"] is None
    assert not (out / "rotation.safetensors").exists() and (out / "adapter_model.safetensors").is_file()
    (rec,) = read_log(out)
    assert rec["vis_loss"] == 0 and rec["att_loss"] == 0 and rec["loss"] == rec["lm_loss"]
    assert "no_teacher" not in rec


def test_allow_missing_trains_with_lm_loss_and_counts(setup, tmp_path):
    d = setup["dir"]
    cache, _ = write_teacher_cache(tmp_path / "partial", d / "images", setup["images"], 4,
                                   skip=tuple(setup["images"][:3]))
    out = tmp_path / "run"
    args = base_args(setup, out, "--max-steps", "2", "--grad-accum", "3")
    args[args.index("--cache") + 1] = str(cache)
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 2 and "3 of 6 image(s) are not in the teacher cache" in res.output and not out.exists()
    res = invoke(args + ["--allow-missing"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "data_stats.json").read_text())["no_teacher"] == 3
    log = read_log(out)
    assert sum(r["no_teacher"] for r in log) == 6  # two epochs of 6 samples, 3 without teacher each


def test_bf16_gradient_checkpointing_workers(setup, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "bf16"
    res = invoke(base_args(setup, out, "--max-steps", "1", "--grad-accum", "1", "--bf16", "--gradient-checkpointing",
                           "--num-workers", "1"))
    assert res.exit_code == 0, res.output
    (rec,) = read_log(out)
    assert rec["vis_loss"] > 0 and rec["att_loss"] > 0
    trained = load_file(str(out / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    assert all(t.dtype == torch.float32 for t in trained.values())  # trainable weights stay fp32


def test_corrupt_image_is_a_clear_error(setup, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(setup["dir"], d)
    (d / "images" / setup["images"][0]).write_bytes(b"not a png")
    args = base_args({**setup, "dir": d, "cache": setup["cache"]}, tmp_path / "run", "--max-steps", "1",
                     "--allow-missing", "--num-workers", "1")
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 2 and "bad image" in res.output and "img/000.png" in res.output


def test_config_yaml_and_flags_precedence(setup, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("student_train.recipe.train", lambda cfg: seen.setdefault("cfg", cfg))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model: {setup['model']}\ndata: {setup['dir'] / 'train.json'}\n"
                         f"image-root: {setup['dir'] / 'images'}\nout: {tmp_path / 'o'}\nalpha: 0.5\n"
                         "optim:\n  lr: 0.001\n  max_steps: 7\nbf16: true\nbeta: 0\n")
    res = CliRunner().invoke(cli.main, ["--config", str(yaml_file), "--alpha", "0.25", "--no-bf16",
                                        "--cache", "c"])
    assert res.exit_code == 0, res.output
    cfg: TrainConfig = seen["cfg"]
    assert cfg.align.alpha == 0.25 and cfg.optim.lr == 0.001 and cfg.optim.max_steps == 7
    assert cfg.model.bf16 is False and cfg.align.beta == 0 and cfg.align.cache == "c"
    assert cfg.lora.lora_r == 32 and cfg.optim.grad_accum == 8  # untouched defaults
    yaml_file.write_text("alpah: 1\n")
    res = CliRunner().invoke(cli.main, ["--config", str(yaml_file)])
    assert res.exit_code == 2 and "unknown setting(s): alpah" in res.output
    yaml_file.write_text("alpha: [1\n")
    res = CliRunner().invoke(cli.main, ["--config", str(yaml_file)])
    assert res.exit_code == 2 and "malformed YAML" in res.output


def test_cli_defaults_match_config_defaults():
    import dataclasses
    params = {p.name: p.default for p in cli.main.params}
    for group in GROUPS.values():
        for f in dataclasses.fields(group):
            if f.default is not dataclasses.MISSING and f.default not in ("",):
                assert params[f.name] == f.default, f.name


def _bad(setup, tmp_path, monkeypatch, edit, *extra, expect):
    """Run with one broken input; the message must be clear and RUN_DIR must not exist."""
    import student_train.model as model_mod
    monkeypatch.setattr(model_mod, "load_student", lambda *a, **k: pytest.fail("model loaded before validation"))
    d = tmp_path / "case"
    shutil.copytree(setup["dir"], d)
    s = {**setup, "dir": d, "cache": d / "cache"}
    edit(s)
    out = tmp_path / "out" / "run"
    res = CliRunner().invoke(cli.main, base_args(s, out, *extra))
    assert res.exit_code == 2, res.output
    assert res.output.startswith("Error: ") and "Traceback" not in res.output
    for e in expect:
        assert e in res.output, res.output
    assert not out.exists() and not out.parent.exists()


def _set_records(mutate):
    def edit(s):
        recs = json.loads((s["dir"] / "train.json").read_text())
        mutate(recs)
        (s["dir"] / "train.json").write_text(json.dumps(recs))
    return edit


def _nonllava(s):
    bad = s["dir"] / "textonly"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                                                 "num_attention_heads": 1, "vocab_size": 10}))
    s["model"] = bad


def _grid3_cache(s):
    from train_helpers import write_teacher_cache as w
    shutil.rmtree(s["cache"])
    w(s["cache"], s["dir"] / "images", s["images"], 3)


BAD_CASES = {
    "malformed_json": (lambda s: (s["dir"] / "train.json").write_text('[{"id": 1,\n "image": }]'), [],
                       ["train.json:2:", "malformed JSON"]),
    "no_gpt_turn": (_set_records(lambda r: r[4].__setitem__("conversations", r[4]["conversations"][:1])), [],
                    ["no 'gpt' turn", "record 4 (id q4)"]),
    "missing_image": (lambda s: (s["dir"] / "images" / s["images"][1]).unlink(), [],
                      ["image file(s) not found", "img/001.png"]),
    "layer_too_high": (lambda s: None, ["--align-layer", "4"], ["--align-layer 4 is out of range", "4 decoder layers"]),
    "layer_zero": (lambda s: None, ["--align-layer", "0"], ["--align-layer must be >= 1"]),
    "not_llava": (_nonllava, [], ["is not a LLaVA model", "'llama'"]),
    "no_model_dir": (lambda s: s.__setitem__("model", s["dir"] / "nope"), [], ["does not exist"]),
    "grid_mismatch": (_grid3_cache, [], ["3x3 grid", "N = 9", "16 image tokens"]),
    "no_cache": (lambda s: s.__setitem__("cache", s["dir"] / "nocache"), [], ["cache not found"]),
    "needs_cache": (lambda s: s.__setitem__("cache", ""), [], ["--cache is required when --alpha"]),
    "unknown_template": (lambda s: None, ["--template", "chatml"], ["unknown prompt template 'chatml'", "vicuna_v1"]),
    "all_too_long": (lambda s: None, ["--max-length", "20"], ["longer than --max-length 20"]),
    # issue 15 item 6: non-finite numbers (inf trained to an all-NaN adapter, nan ended in tracebacks,
    # a nan clipping norm silently switched clipping off)
    "lr_inf": (lambda s: None, ["--lr", "inf"], ["--lr must be a finite number, got inf"]),
    "lr_nan": (lambda s: None, ["--lr", "nan"], ["--lr must be a finite number, got nan"]),
    "epochs_nan": (lambda s: None, ["--epochs", "nan"], ["--epochs must be a finite number, got nan"]),
    "clip_nan": (lambda s: None, ["--max-grad-norm", "nan"], ["--max-grad-norm must be a finite number"]),
    "beta_inf": (lambda s: None, ["--beta", "inf"], ["--beta must be a finite number, got inf"]),
    "global_batch_disagrees": (lambda s: None, ["--global-batch-size", "8"],
                               ["--grad-accum 2 and --global-batch-size 8 disagree", "x 1 process(es)) = 4"]),
    "global_batch_indivisible": (lambda s: None, ["--global-batch-size", "3"],
                                 ["--global-batch-size 3 is not a multiple of --batch-size 2 x 1 process(es)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_refused_before_run_dir(setup, tmp_path, monkeypatch, case):
    edit, extra, expect = BAD_CASES[case]
    _bad(setup, tmp_path, monkeypatch, edit, *extra, expect=expect)


def test_existing_run_dir_needs_resume(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    res = CliRunner().invoke(cli.main, base_args(setup, out, "--max-steps", "1"))
    assert res.exit_code == 2 and "already exists and is not empty; pass --resume" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["something"]


def test_global_batch_size_sets_grad_accum_for_the_world_size():
    from shared.errors import MedAlignError
    from student_train.config import OptimArgs
    assert OptimArgs().grad_accum == 8
    o = OptimArgs(global_batch_size=32, batch_size=2)
    assert o.grad_accum is None  # derived once the number of processes is known
    assert o.for_world(4).grad_accum == 4 and o.for_world(1).grad_accum == 16 and o.for_world(16).grad_accum == 1
    assert OptimArgs(global_batch_size=32, batch_size=2, grad_accum=4).for_world(4).grad_accum == 4  # agree
    with pytest.raises(MedAlignError, match=r"--global-batch-size 32 is not a multiple of --batch-size 2 x 3 "):
        o.for_world(3)
    with pytest.raises(MedAlignError, match="--grad-accum 8 and --global-batch-size 32 disagree"):
        OptimArgs(global_batch_size=32, batch_size=2, grad_accum=8).for_world(4)


def test_global_batch_size_instead_of_grad_accum(setup, tmp_path):
    out = tmp_path / "run"
    args = base_args(setup, out, "--max-steps", "1", "--global-batch-size", "4")
    i = args.index("--grad-accum")
    del args[i:i + 2]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    optim = json.loads((out / "config.json").read_text())["optim"]
    assert optim["grad_accum"] == 2 and optim["global_batch_size"] == 4  # 4 / (batch 2 x 1 process)
    assert [r["samples"] for r in read_log(out)] == [4]
