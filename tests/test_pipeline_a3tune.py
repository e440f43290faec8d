"""A3Tune end to end on real VQA-RAD images, through the real commands and the real cache reader:
convert -> ``medalign-cache build --signals a3tune`` (the tiny SAM in the original ``.pth`` layout,
the tiny BiomedCLIP directory) -> ``medalign-train --method a3tune`` (with A3MoE, the default, and ``--no-a3-moe``)
-> ``medalign-eval generate --adapter`` -> ``score``.

The training tests in ``tests/student_train/test_a3_train.py`` use a stand-in cache; this one checks
that what stage 1 writes is what stage 2 reads: every training question's labels reach the loss
(a non-zero ``a3_att_loss`` on the questions whose image kept masks), the run records the cache
that taught it, and generation loads the adapter (and the MoE) from the run directory. Runs on the
committed CC0 subset (``tests/assets/vqa-rad``); ``pytest -m slow``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.slow


def _invoke(main, args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def a3_setup(vqa_rad_subset_dir, tmp_path_factory):
    from shared.cache.a3tune import open_a3_cache
    from student_train.convert.cli import main as data_main
    from student_train.tiny import save_tiny_llava
    from teacher_cache.a3tune.sam import FAST_SAM_SETTINGS
    from teacher_cache.a3tune.tiny_clip import save_tiny_biomedclip_clip
    from teacher_cache.a3tune.tiny_sam import save_tiny_sam
    from teacher_cache.cli import main as cache_main

    tmp = tmp_path_factory.mktemp("a3pipe")
    images = vqa_rad_subset_dir / "images"
    _invoke(data_main, ["convert", "--format", "vqa-rad", "--input", vqa_rad_subset_dir / "qa.json",
                        "--out", tmp / "data", "--image-root", images])
    rows = json.loads((tmp / "data" / "test.json").read_text())
    train, test = rows[:24], rows[24:36]
    (tmp / "train.json").write_text(json.dumps(train))
    (tmp / "test.json").write_text(json.dumps(test))

    student = save_tiny_llava(tmp / "student", "mistral", template="vicuna_v1")
    sam = save_tiny_sam(tmp / "sam_tiny.pth")
    clip = save_tiny_biomedclip_clip(tmp / "biomedclip")
    (tmp / "fast.json").write_text(json.dumps(FAST_SAM_SETTINGS.to_json()))
    out = _invoke(cache_main, ["build", "--signals", "a3tune", "--sam", sam, "--biomedclip", clip,
                               "--data", tmp / "train.json", "--image-root", images, "--student", student,
                               "--out", tmp / "a3cache", "--top-k", "3", "--query-template", "vqa-rad",
                               "--sam-settings", tmp / "fast.json", "--num-workers", "0"])
    assert "A3 cache written" in out
    cache = open_a3_cache(tmp / "a3cache")
    entries = {str(r["id"]): cache.entry(str(r["id"])) for r in train}
    assert all(e is not None for e in entries.values())
    with_masks = [k for k, e in entries.items() if len(e.labels)]
    # the tiny SAM thresholds brightness, so real radiographs keep masks; a loss test needs some
    assert len(with_masks) >= len(train) // 2, {k: len(e.labels) for k, e in entries.items()}
    assert all(e.labels.shape[1] == 16 and set(np.unique(e.labels)) <= {0.0, 1.0} for e in entries.values())
    return {"tmp": tmp, "images": images, "student": student, "cache": tmp / "a3cache", "train": train,
            "test": test, "manifest_sha": cache.identity()["manifest_sha256"]}


@pytest.mark.parametrize("moe", [False, True], ids=["lora", "a3moe"])
def test_a3tune_cache_train_generate_score(a3_setup, moe):
    from evaluation.cli import main as eval_main
    from student_train.cli import main as train_main

    s = a3_setup
    run = s["tmp"] / ("run-moe" if moe else "run")
    extra = [] if moe else ["--no-a3-moe"]  # A3MoE is the default (their scripts)
    _invoke(train_main, ["--method", "a3tune", "--cache", s["cache"], "--model", s["student"],
                         "--data", s["tmp"] / "train.json", "--image-root", s["images"], "--out", run,
                         "--a3-top-heads", "8", "--a3-lambda", "0.5", "--max-steps", "4", "--batch-size", "4",
                         "--grad-accum", "1", "--lr", "1e-3", "--num-workers", "0", *extra])
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json", "teacher.json",
                 "train_log.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "moe.safetensors").is_file() == moe and not (run / "rotation.safetensors").exists()
    teacher = json.loads((run / "teacher.json").read_text())
    assert teacher["signals"] == "a3tune" and teacher["manifest_sha256"] == s["manifest_sha"]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["lm_loss"]) for r in log)
    # the cache's labels reach the loss: 4 samples a step, at least half the questions have masks
    assert all(r["a3_att_loss"] > 0 for r in log), [r["a3_att_loss"] for r in log]
    for r in log:  # --a3-balance defaults to 0 (the VQA scripts)
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.5 * r["a3_att_loss"], rel=1e-4, abs=1e-5)

    preds = s["tmp"] / f"preds-{'moe' if moe else 'lora'}.jsonl"
    _invoke(eval_main, ["generate", "--model", s["student"], "--adapter", run, "--data", s["tmp"] / "test.json",
                        "--image-root", s["images"], "--out", preds, "--max-new-tokens", "6", "--batch-size", "4",
                        "--decoding", "greedy", "--device", "cpu"])
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [p["question_id"] for p in lines] == [r["id"] for r in s["test"]]
    assert all(isinstance(p["text"], str) for p in lines)
    assert lines[0]["metadata"]["teacher"]["signals"] == "a3tune"
    _invoke(eval_main, ["score", "--pred", preds, "--gt", s["tmp"] / "test.json", "--task", "vqa",
                        "--out", s["tmp"] / "metrics.json"])
    assert json.loads((s["tmp"] / "metrics.json").read_text())["llava_med"]["num_close"] >= 0
