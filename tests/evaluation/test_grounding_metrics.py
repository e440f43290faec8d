"""The grounding benchmark's metrics against straightforward computations."""

from __future__ import annotations

import json
import math
from itertools import product

import numpy as np

from evaluation.grounding_metrics import correct_per_question, lesion_mass, paired_bootstrap, sign_test


def test_lesion_mass_is_the_share_on_the_mask():
    rng = np.random.default_rng(0)
    attn = rng.random((5, 36))
    mask = rng.random((5, 36)) < 0.2
    got = lesion_mass(attn, mask)
    for b in range(5):
        on = sum(attn[b, i] for i in range(36) if mask[b, i])
        assert math.isclose(got[b], on / sum(attn[b]), rel_tol=1e-12)
    assert lesion_mass(np.zeros((1, 4)), np.ones((1, 4), bool))[0] == 0.0


def _binom_two_sided(n10, n01):
    n, k = n10 + n01, min(n10, n01)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def test_sign_test_matches_the_binomial_tail():
    for n10, n01 in product(range(0, 12), range(0, 12)):
        a = np.array([1] * n10 + [0] * n01 + [1, 0] * 3, dtype=bool)
        b = np.array([0] * n10 + [1] * n01 + [1, 0] * 3, dtype=bool)
        r = sign_test(a, b)
        assert (r["a_only"], r["b_only"]) == (n10, n01)
        assert math.isclose(r["p_value"], _binom_two_sided(n10, n01), rel_tol=1e-9)
    big = sign_test(np.array([1] * 700 + [0] * 600, bool), np.array([0] * 700 + [1] * 600, bool))
    assert math.isclose(big["p_value"], _binom_two_sided(700, 600), rel_tol=1e-6)


def test_bootstrap_mean_and_interval():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 1] * 20)
    b = np.array([0, 1, 0, 1, 0, 0, 1, 1] * 20)
    r = paired_bootstrap(a, b, n_boot=500)
    assert math.isclose(r["mean_diff"], (a.sum() - b.sum()) / len(a))
    assert r["ci95"][0] <= r["mean_diff"] <= r["ci95"][1] and r["ci95"][0] > 0


def test_correct_per_question_normalises_and_follows_gt_order(tmp_path):
    gt = [{"id": i, "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                        {"from": "gpt", "value": ans}]}
          for i, ans in enumerate(["yes", "upper left", "no", "lower right"])]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    preds = [{"question_id": 1, "text": "Upper  left."}, {"question_id": 0, "text": "yes"},
             {"question_id": 3, "text": "lower left"}]  # id 2 missing -> wrong
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    assert correct_per_question(tmp_path / "p.jsonl", tmp_path / "gt.json").tolist() == [True, True, False, False]


def test_shuffled_teacher_is_a_derangement_of_the_images(tmp_path):
    from evaluation.grounding import shuffled_records
    from student_train.data import teacher_image

    recs = [{"id": i, "image": f"im{i // 3}.png", "conversations": []} for i in range(30)]
    (tmp_path / "t.json").write_text(json.dumps(recs))
    out = json.loads(shuffled_records(tmp_path / "t.json", tmp_path / "s.json").read_text())
    partner = {r["image"]: r["teacher_image"] for r in out}
    assert all(teacher_image(r) != r["image"] for r in out)
    assert sorted(partner.values()) == sorted(partner)  # every image's row is used exactly once
    assert all(partner[r["image"]] == r["teacher_image"] for r in out)  # one partner per image
    assert teacher_image(recs[0]) == "im0.png"
