"""Real VQA-RAD end to end: convert -> cache -> train -> generate -> score, checking every artefact.

Two variants, both on real VQA-RAD: the full copy in ../shared/data/vqa-rad (skipped when absent)
and the committed subset in tests/assets/vqa-rad (the official test rows whose image is among the
12 committed JPEGs; runs in every clone). A random-weight UniMed-B-format expert and a tiny
random-weight student; run with ``pytest -m slow``.
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


def test_vqa_rad_pipeline(vqa_rad_dir, tmp_path):
    def small(train, test):
        assert (len(train), len(test)) == (1797, 451)
        return train[:48], test[:24]  # small subsets keep the CPU run short; the cache covers both

    _pipeline(vqa_rad_dir, small, tmp_path)


def test_vqa_rad_pipeline_on_the_committed_subset(vqa_rad_subset_dir, tmp_path):
    def small(train, test):
        # convert --image-root keeps the 44 test rows whose image is committed; no train rows
        assert (len(train), len(test)) == (0, 44)
        return test[:32], test[32:]

    _pipeline(vqa_rad_subset_dir, small, tmp_path)


def _pipeline(vqa_rad_dir, small, tmp_path):
    from evaluation.cli import main as eval_main
    from shared.cache import open_cache
    from student_train.convert.cli import main as data_main
    from student_train.cli import main as train_main
    from student_train.tiny import save_tiny_llava
    from teacher_cache.cli import main as cache_main
    from teacher_cache.tiny import save_tiny_unimed

    images = vqa_rad_dir / "images"
    # 1. convert the official JSON
    _invoke(data_main, ["convert", "--format", "vqa-rad", "--input", vqa_rad_dir / "qa.json", "--out", tmp_path / "data",
                        "--image-root", images])
    train = json.loads((tmp_path / "data" / "train.json").read_text())
    test = json.loads((tmp_path / "data" / "test.json").read_text())
    train, test = small(train, test)
    (tmp_path / "train_small.json").write_text(json.dumps(train))
    (tmp_path / "test_small.json").write_text(json.dumps(test))

    # 2. teacher cache with a random-weight UniMed-B-format expert (tiny config, 4x4 grid)
    weights = tmp_path / "unimed-b.pt"
    (tmp_path / "unimed-b.json").write_text(json.dumps(save_tiny_unimed(weights, "b")))
    student = save_tiny_llava(tmp_path / "student", "mistral", template="vicuna_v1")
    _invoke(cache_main, ["build", "--expert", "unimed-b", "--weights", weights, "--model-config",
                         tmp_path / "unimed-b.json", "--data", tmp_path / "train_small.json", "--data",
                         tmp_path / "test_small.json", "--image-root", images, "--student", student,
                         "--out", tmp_path / "cache", "--num-workers", "0"])
    reader = open_cache(tmp_path / "cache")
    wanted = {r["image"] for r in train + test}
    assert set(reader.index) == wanted and reader.manifest.grid == 4
    sim, attn = reader.get(train[0]["image"])
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-3)

    # 3. a short MedAlign run
    run = tmp_path / "run"
    _invoke(train_main, ["--cache", tmp_path / "cache", "--model", student, "--data", tmp_path / "train_small.json",
                         "--image-root", images, "--out", run, "--align-layer", "2", "--max-steps", "6",
                         "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3", "--num-workers", "0"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "rotation.safetensors", "config.json",
                 "teacher.json", "train_log.jsonl"):
        assert (run / name).is_file(), name
    assert json.loads((run / "teacher.json").read_text())["expert"] == "unimed-b"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(np.isfinite(r["loss"]) and r["vis_loss"] > 0 for r in log)

    # 4. generation on the test subset, 5. scoring
    preds = tmp_path / "preds.jsonl"
    _invoke(eval_main, ["generate", "--model", student, "--adapter", run, "--data", tmp_path / "test_small.json",
                        "--image-root", images, "--out", preds, "--max-new-tokens", "6", "--batch-size", "8",
                        "--device", "cpu"])
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [p["question_id"] for p in lines] == [r["id"] for r in test]
    assert all(isinstance(p["text"], str) and p["metadata"]["teacher"]["expert"] == "unimed-b" for p in lines)
    _invoke(eval_main, ["score", "--pred", preds, "--gt", tmp_path / "test_small.json", "--task", "vqa",
                        "--out", tmp_path / "metrics.json"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    closed = sum(1 for r in test if r["answer_type"] == "CLOSED")
    assert metrics["llava_med"]["num_close"] == closed and metrics["llava_med"]["num_open"] == len(test) - closed
    assert 0 <= metrics["llava_med"]["yes/no accuracy"] <= 100
    assert (tmp_path / "metrics.md").is_file()
