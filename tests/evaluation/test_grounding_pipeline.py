"""A minimal run of ``bench/grounding.py``'s pipeline through the real commands (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_minimal_grounding_benchmark(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_grounding", REPO / "bench" / "grounding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from evaluation.grounding import Recipe

    doc = bench.run_benchmark(tmp_path / "w", [0], ["lora", "shuffled"], Recipe(steps=2, batch_size=2),
                              mass_limit=6, sizes={"train": 4, "val": 1, "test": 2})
    for arm in ("lora", "shuffled"):
        run = doc["runs"][arm]["0"]
        assert 0.0 <= run["accuracy"] <= 1.0 and run["questions"] == 6
        assert 0.0 <= run["lesion_attention_mass"] <= 1.0 and run["mass_questions"] == 6
    assert 0.0 <= doc["summary"]["shuffled"]["vs_lora_p_value"] <= 1.0
    assert doc["runs"]["shuffled"]["0"]["final_losses"]["vis_loss"] > 0  # the teacher rows were used
    # the shuffled control names another image's teacher row for every record
    recs = json.loads((tmp_path / "w" / "data" / "train_shuffled_teacher.json").read_text())
    assert all(r["teacher_image"] != r["image"] for r in recs)
    json.dumps(doc)
