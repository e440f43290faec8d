"""``bench/grounding.py``'s pipeline: the lesion masks as ``--regions`` and the t-SNE step (fast, on
tiny sizes: 5 test images, a run with a zero LoRA update and a non-zero W; the command runs in this
process instead of a subprocess, which would cost ~10 s of imports), and a minimal run of the whole
benchmark through the real commands in subprocesses, t-SNE included (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from decoding_helpers import make_w_run
from PIL import Image

from shared.grounding_data import IMAGE_SIZE, make_grounding_dataset, write_lesion_regions
from shared.regions import patch_labels, read_regions

REPO = Path(__file__).resolve().parents[2]
SIZES = {"train": 2, "val": 1, "test": 6}
SCORES = ("probe_accuracy", "probe_balanced_accuracy", "majority_fraction", "silhouette")


def test_lesion_masks_are_a_regions_folder(tmp_path):
    paths = make_grounding_dataset(tmp_path / "d", 0, SIZES)
    regions = read_regions(paths["regions"])
    assert regions.labels == {0: "background", 1: "lesion"}
    test_images = {r["image"] for r in json.loads(paths["test"].read_text())}
    assert test_images <= set(regions.masks)
    for name in test_images:
        mask = regions.mask(name)  # the reader tsne uses: labels 0/1, the image's size
        assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE) == Image.open(paths["images"] / name).size[::-1]
        assert set(np.unique(mask)) == {0, 1}
        assert (mask == 1).tolist() == (np.asarray(Image.open(paths["masks"] / name)) > 127).tolist()
        assert (patch_labels(mask, 6) == 1).any()  # the lesion covers most of at least one patch
    # a data folder from before regions/ existed gets the same files (what prepare() does for it)
    first = paths["regions"].read_text()
    paths["regions"].unlink()
    assert write_lesion_regions(paths["root"]).read_text() == first


def test_tsne_step_writes_figure_and_separability(tmp_path, monkeypatch):
    """:func:`evaluation.grounding.tsne_separability` -> ``medalign-eval tsne`` on the grounding
    student and data, its JSON returned (and reused when asked again)."""
    from threadpoolctl import threadpool_limits

    from evaluation import grounding as G
    from evaluation.cli import main
    from evaluation.grounding import Recipe, Setup, make_student, tsne_layers, tsne_separability

    calls = []

    def in_process(tool, *args, log, quiet=False, env=None):
        calls.append((tool, [str(a) for a in args], env))
        with threadpool_limits(1):  # what env's OMP_NUM_THREADS=1 does in the subprocess
            main.main(args=[str(a) for a in args], standalone_mode=False)
        return 0.0

    monkeypatch.setattr(G, "run_command", in_process)

    data = make_grounding_dataset(tmp_path / "data", 0, SIZES)
    student = make_student(tmp_path / "student", layers=4)
    run_dir, _ = make_w_run(student, tmp_path / "run")
    setup = Setup(tmp_path, data, tmp_path / "t.pt", tmp_path / "cache", student, data["train"],
                  tmp_path / "commands.log")
    recipe = Recipe(layers=4, align_layer=1)
    assert tsne_layers(recipe) == (0, 1, 3)
    doc = tsne_separability(setup, run_dir, recipe, max_images=5)
    assert (run_dir / "tsne.png").stat().st_size > 0 and (run_dir / "tsne.json").is_file()
    assert json.loads((run_dir / "tsne.json").read_text()) == doc
    assert doc["images"] == 5 and doc["tokens"] == 5 * 36 and doc["labels"] == {"0": "background", "1": "lesion"}
    assert sorted(doc["layers"], key=int) == ["0", "1", "3"]
    for s in doc["layers"].values():
        assert s["split"] == "image" and s["folds"] == 5
        for k in SCORES:
            assert math.isfinite(s[k]), (k, s)
        assert 0.0 <= s["probe_accuracy"] <= 1.0 and -1.0 <= s["silhouette"] <= 1.0
    assert doc["grounding"]["split"] == "test" and doc["grounding"]["max_images"] == 5
    [(tool, args, env)] = calls
    assert tool == "medalign-eval" and args[:1] == ["tsne"] and env in ({}, {"OMP_NUM_THREADS": "1"})
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags["--regions"] == str(data["regions"]) and flags["--adapter"] == str(run_dir)
    assert flags["--layers"] == "0,1,3" and flags["--data"] == str(data["test"])
    assert tsne_separability(setup, run_dir, recipe, max_images=5) == doc and len(calls) == 1  # reused
    tsne_separability(setup, run_dir, recipe, max_images=4)  # other settings: run again
    assert len(calls) == 2


@pytest.mark.slow
def test_minimal_grounding_benchmark(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_grounding", REPO / "bench" / "grounding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from evaluation.grounding import Recipe

    doc = bench.run_benchmark(tmp_path / "w", [0], ["lora", "shuffled"], Recipe(steps=2, batch_size=2),
                              mass_limit=6, sizes={"train": 4, "val": 1, "test": 2}, tsne_arms=("lora", "shuffled"),
                              tsne_images=2)
    for arm in ("lora", "shuffled"):
        run = doc["runs"][arm]["0"]
        assert 0.0 <= run["accuracy"] <= 1.0 and run["questions"] == 6
        assert 0.0 <= run["lesion_attention_mass"] <= 1.0 and run["mass_questions"] == 6
        sep = run["separability"]
        assert sorted(sep, key=int) == ["0", "1", "3"]
        assert all(k in s for s in sep.values() for k in SCORES)
        assert math.isfinite(sep["1"]["silhouette"])
        assert (Path(run["run_dir"]) / "tsne.png").is_file()
    assert 0.0 <= doc["summary"]["shuffled"]["vs_lora_p_value"] <= 1.0
    assert doc["runs"]["shuffled"]["0"]["final_losses"]["vis_loss"] > 0  # the teacher rows were used
    # the shuffled control names another image's teacher row for every record
    recs = json.loads((tmp_path / "w" / "data" / "train_shuffled_teacher.json").read_text())
    assert all(r["teacher_image"] != r["image"] for r in recs)
    json.dumps(doc)
