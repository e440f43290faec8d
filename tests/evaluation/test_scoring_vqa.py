"""VQA metrics: LLaVA-Med quirks vs the strict block, on hand-computed cases; id joining."""

import json
import math

import pytest

from evaluation.scoring.join import join_by_id, load_ground_truth, load_predictions
from evaluation.scoring.vqa import (
    llava_bleu, llava_closed_hit, llava_exact_match, llava_f1, most_similar_index, score_vqa,
    strict_closed_hit, strict_open_prf,
)
from shared.errors import MedAlignError


def rec(rid, answer, atype="OPEN", **extra):
    r = {"id": rid, "image": "x.jpg",
         "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": answer}]}
    if atype is not None:
        r["answer_type"] = atype
    r.update(extra)
    return r


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ open-ended, llava_med
def test_exact_match_is_distinct_answer_words_over_prediction_length():
    assert llava_exact_match("left lung left", "left lung") == pytest.approx(2 / 3)
    assert llava_exact_match("left lung", "left lung") == 1.0
    assert llava_exact_match("lung", "left lung") == 1.0  # 1 found / 1 predicted word
    assert llava_exact_match("", "left") == 0.0


def test_f1_counts_the_predictions_repeats_as_true_positives():
    f1, p, r = llava_f1("left left left", "left lung")
    # tp = 3 (prediction's count), fp = 0, fn = 1 ("lung")
    assert (p, r) == (1.0, 0.75)
    assert f1 == pytest.approx(2 * 0.75 / 1.75)
    f1, p, r = llava_f1("right upper lobe", "right lower lobe")
    assert (p, r) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert llava_f1("", "x") == (0.0, 0.0, 0.0)
    assert llava_f1("y", "x") == (0.0, 0.0, 0.0)


def test_strict_open_clips_token_counts():
    f1, p, r = strict_open_prf("left left left", "left lung")
    assert (p, r) == (pytest.approx(1 / 3), 0.5)
    assert f1 == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert strict_open_prf("", "x") == (0.0, 0.0, 0.0)


def test_bleu_hand_computed():
    b = llava_bleu("right upper lobe mass", "right upper lobe nodule")
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0; brevity penalty 1
    assert b["bleu_score_1"] == pytest.approx(0.75)
    assert b["bleu_score_2"] == pytest.approx(2 / 3)
    assert b["bleu_score_3"] == pytest.approx(0.5)
    assert b["bleu_score"] < 1e-50  # no 4-gram match, no smoothing: ~1e-77
    short = llava_bleu("left", "left lung")
    assert short["bleu_score_1"] == pytest.approx(math.exp(1 - 2 / 1))  # brevity penalty only


# ------------------------------------------------------------------ closed-ended
@pytest.mark.parametrize("pred, answer, llava, strict", [
    ("yes", "yes", True, True),
    ("no", "no", True, True),
    ("normal", "no", True, False),                     # "no" inside "normal"
    ("there is nodule", "no", True, False),            # "no" inside "nodule"
    ("yes there is no effusion", "yes", True, False),  # both words: strict says wrong
    ("yes there is no effusion", "no", True, False),
    ("left", "left", False, True),                     # llava needs a yes/no substring
    ("not left", "left", True, True),                  # "no" inside "not" lets it count
    ("right", "left", False, False),
    ("", "no", False, False),
    ("left side", "left side", False, True),           # multi-token answer, contiguous
    ("side left", "left side", False, False),
])
def test_closed_hits(pred, answer, llava, strict):
    assert llava_closed_hit(pred, answer) is llava
    assert strict_closed_hit(pred, answer) is strict


def test_most_similar_index_difflib():
    opts = ["left lung", "right lung"]
    assert most_similar_index(opts, "The right lung") == 1
    assert most_similar_index(opts, "left lung") == 0
    assert most_similar_index(opts, "") is None       # every ratio 0 -> None


# ------------------------------------------------------------------ aggregation
def test_score_vqa_aggregates_in_percent_with_answer_type_mess():
    gt = [
        rec(1, "Left lung", "OPEN"),
        rec("2", "No", "CLOSED "),          # stray space
        rec(3, "yes", "closed"),            # lower case
        rec(4, "no", None),                 # missing -> CLOSED, as the reference does
        rec(5, 4, "open"),                  # numeric answer
        rec(6, "x", "OTHER"),               # skipped
    ]
    preds = {"1": "left left left", "2": "Normal.", "3": "Yes, but no effusion", "4": "no",
             "5": "four", "6": "x"}
    from evaluation.scoring.join import Prediction
    joined = join_by_id(gt, {k: Prediction(k, v, i) for i, (k, v) in enumerate(preds.items())})
    res = score_vqa(joined)
    lm, st = res["llava_med"], res["strict"]
    assert (lm["num_open"], lm["num_close"]) == (2, 3)
    assert res["counts"]["skipped_answer_type"] == 1
    # open: q1 recall .75 precision 1; q5 "four" -> "4" == "4": all 1
    assert lm["recall"] == pytest.approx(100 * (0.75 + 1) / 2)
    assert lm["precision"] == pytest.approx(100.0)
    assert lm["exact match score"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert st["recall"] == pytest.approx(100 * (0.5 + 1) / 2)
    assert st["exact match score"] == pytest.approx(50.0)
    # closed: llava hits all three (normal~no, yes..no~yes, no); strict only q4
    assert lm["yes/no accuracy"] == pytest.approx(100.0)
    assert st["yes/no accuracy"] == pytest.approx(100 / 3)
    assert "multiple_choice" not in res


def test_score_vqa_multiple_choice_and_empty_types():
    four = dict(option_A="left lung", option_B="right lung", option_C="both", option_D="neither")
    gt = [rec(1, "right lung", "CLOSED", option_A="left lung", option_B="right lung"),
          rec(2, "left lung", "CLOSED", **four),
          rec(3, "left lung", "CLOSED", **four)]
    from evaluation.scoring.join import Prediction
    joined = join_by_id(gt, {"1": Prediction("1", "the right lung", 1),
                             # difflib: "both lungs" is closer to "left lung" (0.63) than "both"
                             # (0.57), so this counts as correct, as in the reference
                             "2": Prediction("2", "both lungs", 2),
                             "3": Prediction("3", "neither", 3)})
    res = score_vqa(joined)
    assert res["multiple_choice"] == {"accuracy": pytest.approx(200 / 3), "num_mc": 3}
    # no open / closed questions: metrics are null, counts 0
    assert res["llava_med"]["recall"] is None and res["llava_med"]["yes/no accuracy"] is None
    assert res["llava_med"]["num_open"] == 0


# ------------------------------------------------------------------ joining and file errors
def test_join_by_id_int_and_str_missing_extra(tmp_path):
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps([rec(1, "yes", "CLOSED"), rec("2", "no", "CLOSED"),
                                   rec(10, "no", "CLOSED")]))
    pred_path = write_jsonl(tmp_path / "p.jsonl", [
        {"question_id": "10", "text": "no"}, {"question_id": 1, "text": "yes"},
        {"question_id": 7, "text": "yes"}])
    joined = join_by_id(load_ground_truth(gt_path), load_predictions(pred_path))
    assert [t for _, t in joined.pairs] == ["yes", None, "no"]
    assert joined.missing_ids == ["2"] and joined.extra_ids == ["7"]
    res = score_vqa(joined)
    assert res["llava_med"]["yes/no accuracy"] == pytest.approx(200 / 3)  # missing = wrong


@pytest.mark.parametrize("line, message", [
    ('{"question_id": 1, "text": "a"', "malformed JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"text": "a"}', "no 'question_id'"),
    ('{"question_id": 1}', "no 'text'"),
    ('{"question_id": 0, "text": "dup"}', "duplicate question_id"),
])
def test_bad_prediction_lines_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "preds.jsonl"
    p.write_text('{"question_id": 0, "text": "ok"}\n\n' + line + "\n")
    with pytest.raises(MedAlignError, match=message) as e:
        load_predictions(p)
    assert f"{p}:3:" in str(e.value)


def test_duplicate_ground_truth_ids_are_refused(tmp_path):
    p = tmp_path / "gt.json"
    p.write_text(json.dumps([rec(1, "a"), rec("1", "b")]))
    with pytest.raises(MedAlignError, match="duplicate id '1'"):
        load_ground_truth(p)
