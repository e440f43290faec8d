"""Real LLaVA-Med answers to the VQA-RAD test split: they score, match the reference evaluator's
numbers, and do not depend on row order.

The data is committed (``tests/assets``: the 451 official test rows and the three answer files),
and the reference numbers are computed at test time by ``llava_med_evaluator``, a literal
transcription of MedAlign's (fbefd17) ``llava-med-1.5/llava/eval/run_eval.py::evaluate``, so this
paper-compatibility check runs in every clone.
"""

import json
import math
import random
from pathlib import Path

import pytest

from evaluation.scoring.score import score_files

try:
    from . import llava_med_evaluator as oracle
except ImportError:
    import llava_med_evaluator as oracle

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # committed; see assets/vqa-rad/SOURCE.md
QA = ASSETS / "vqa-rad" / "qa.json"
PRED_DIR = ASSETS / "llava-med-predictions" / "vqa-rad"

# Regression pin: the llava_med block of the reference evaluator (MedAlign's run_eval.py, the
# variant that counts every closed miss) on these files with the ground truth built below, as
# printed by ``llava_med_evaluator.evaluate`` when this test was written. 'bleu_score' and
# 'bleu_score_3' are ~0 for all three (no smoothing), 'bleu_score_2' also for the 1-epoch file.
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
#: every metric key of the llava_med block (the rows run_eval.py prints, plus its two counts)
METRIC_KEYS = ("exact match score", "f1 score", "precision", "recall", "bleu_score", "bleu_score_1",
               "bleu_score_2", "bleu_score_3", "yes/no accuracy")


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


@pytest.fixture(scope="module")
def oracle_results(gt_file):
    """The transcribed reference evaluator on each answer file (its own loading and id check)."""
    return {name: oracle.evaluate_files(gt_file, PRED_DIR / name) for name in REFERENCE}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_real_predictions_match_reference_evaluator(gt_file, oracle_results, name):
    m = score_files(PRED_DIR / name, gt_file, "vqa")
    assert m["missing_ids"] == [] and m["extra_ids"] == []
    ref = oracle_results[name]
    assert (ref["num_open"], ref["num_close"]) == (179, 272)
    assert (m["llava_med"]["num_open"], m["llava_med"]["num_close"]) == (ref["num_open"], ref["num_close"])
    assert set(m["llava_med"]) == set(ref) == {*METRIC_KEYS, "num_open", "num_close"}
    for key in METRIC_KEYS:
        # Same per-question arithmetic; the means differ only in summation (math.fsum vs sum)
        # and in 100 * (s / n) vs (100 * s) / n, i.e. a few ulps: rel 1e-12. The abs 1e-12 (in
        # percent) is for the BLEU means that are ~1e-155 .. 1e-307 (no smoothing), where a few
        # ulps of the tiny per-question terms are a larger *relative* error (seen: 4e-15).
        assert m["llava_med"][key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    for key, value in REFERENCE[name].items():  # the pin: the oracle and the scorer still agree with it
        assert ref[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        assert m["llava_med"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert m["llava_med"]["bleu_score"] < 1e-6 and ref["bleu_score"] < 1e-6
    # on yes/no answers a strict (whole-word) hit is always a llava_med (substring) hit
    yes_no = {str(r["id"]) for r in llava_gt()
              if str(r["conversations"][1]["value"]).strip().lower() in ("yes", "no")}
    closed = [q for q in m["per_question"] if q["type"] == "CLOSED" and q["id"] in yes_no]
    assert len(closed) > 200
    assert all(q["hit"] for q in closed if q["strict_hit"])


def test_oracle_per_question_closed_hits_equal_the_scorer(gt_file):
    """Question by question on the CLOSED rows (the rule where the variants differ): the
    transcription's 0/1 list equals the scorer's per-question hits, in the same order."""
    gt = json.loads(gt_file.read_text())
    pred = oracle.load_jsonl(PRED_DIR / "answer-file.jsonl")
    closed_gt = [g for g in gt if g["answer_type"] == "CLOSED"]
    by_id = {p["question_id"]: p for p in pred}
    hits = [oracle.evaluate([g], [by_id[g["id"]]])["yes/no accuracy"] / 100 for g in closed_gt]
    m = score_files(PRED_DIR / "answer-file.jsonl", gt_file, "vqa")
    ours = [q["hit"] for q in m["per_question"] if q["type"] == "CLOSED"]
    assert ours == hits and len(ours) == 272
    # MedAlign's variant: every closed miss stays in the denominator, including a prediction
    # that says "yes"/"no" but not the answer (upstream LLaVA-Med drops those)
    said_yes_no_but_missed = [g for g, h in zip(closed_gt, hits) if not h and any(
        w in oracle.normalize_word(by_id[g["id"]]["text"].lower()) for w in ("yes", "no"))]
    assert said_yes_no_but_missed
    assert math.isclose(m["llava_med"]["yes/no accuracy"], 100 * sum(hits) / 272, rel_tol=1e-12)


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
