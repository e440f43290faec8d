"""Real LLaVA-Med answers to the VQA-RAD test split: they score, match the reference evaluator's
numbers, and do not depend on row order."""

import json
import random
from pathlib import Path

import pytest

from evaluation.scoring.score import score_files

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
QA = SHARED / "data" / "vqa-rad" / "qa.json"
PRED_DIR = SHARED / "data" / "llava-med-predictions" / "vqa-rad"

# llava_med block of the reference evaluator (LLaVA-Med run_eval.py logic, the variant that counts
# every closed miss), obtained by running a literal transcription of it on these files with the
# ground truth built below. 'bleu_score'/'bleu_score_3' are ~0 for all three (no smoothing).
REFERENCE = {
    "answer-file-1epoch.jsonl": {
        "exact match score": 2.886405959031658, "f1 score": 2.2422549517521584,
        "precision": 2.886405959031658, "recall": 2.0391061452513966,
        "bleu_score_1": 1.7460199304569397, "yes/no accuracy": 23.16176470588235},
    "answer-file-llava-zeorshot.jsonl": {
        "exact match score": 1.2916670560318564, "f1 score": 2.800198373021614,
        "precision": 1.7081618671901977, "recall": 12.041127437939796,
        "bleu_score_1": 1.2916670560318564, "bleu_score_2": 0.08729050279329612,
        "yes/no accuracy": 28.676470588235293},
    "answer-file.jsonl": {
        "exact match score": 2.607962027027744, "f1 score": 4.539660158822325,
        "precision": 2.7977383306068933, "recall": 17.532588454376164,
        "bleu_score_1": 2.607962027027744, "bleu_score_2": 0.20550678371907424,
        "yes/no accuracy": 47.05882352941177},
}

pytestmark = pytest.mark.skipif(not QA.is_file(), reason=f"shared data not found at {SHARED}")


def llava_gt(shuffle_seed=None):
    """LLaVA-style test list from the official qa.json (split == test; id = qid)."""
    rows = [r for r in json.loads(QA.read_text()) if r["split"] == "test"]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return [{"id": r["qid"], "image": r["image_name"],
             "conversations": [{"from": "human", "value": "<image>\n" + r["question"]},
                               {"from": "gpt", "value": r["answer"]}],
             "answer_type": r["answer_type"]} for r in rows]


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("gt") / "test.json"
    p.write_text(json.dumps(llava_gt()))
    return p


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_real_predictions_match_reference_evaluator(gt_file, name):
    m = score_files(PRED_DIR / name, gt_file, "vqa")
    assert m["missing_ids"] == [] and m["extra_ids"] == []
    assert (m["llava_med"]["num_open"], m["llava_med"]["num_close"]) == (179, 272)
    for key, value in REFERENCE[name].items():
        assert m["llava_med"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert m["llava_med"]["bleu_score"] < 1e-6
    # on yes/no answers a strict (whole-word) hit is always a llava_med (substring) hit
    yes_no = {str(r["id"]) for r in llava_gt()
              if str(r["conversations"][1]["value"]).strip().lower() in ("yes", "no")}
    closed = [q for q in m["per_question"] if q["type"] == "CLOSED" and q["id"] in yes_no]
    assert len(closed) > 200
    assert all(q["hit"] for q in closed if q["strict_hit"])


def test_real_predictions_row_order_does_not_matter(tmp_path):
    name = "answer-file.jsonl"
    base_gt = tmp_path / "gt.json"
    base_gt.write_text(json.dumps(llava_gt()))
    shuf_gt = tmp_path / "gt_shuffled.json"
    shuf_gt.write_text(json.dumps(llava_gt(shuffle_seed=1)))
    lines = (PRED_DIR / name).read_text().splitlines()
    random.Random(2).shuffle(lines)
    shuf_pred = tmp_path / "shuffled.jsonl"
    shuf_pred.write_text("\n".join(lines) + "\n")

    def core(m):
        return {k: m[k] for k in ("llava_med", "strict", "counts", "missing_ids", "extra_ids")}

    a = score_files(PRED_DIR / name, base_gt, "vqa")
    b = score_files(shuf_pred, shuf_gt, "vqa")
    assert core(a) == core(b)  # exactly equal: sums are order-independent (math.fsum)
    assert sorted(a["per_question"], key=lambda q: q["id"]) == sorted(b["per_question"], key=lambda q: q["id"])
