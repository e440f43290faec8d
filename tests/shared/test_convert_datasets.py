"""``medalign-data convert``: each format on tiny synthetic inputs written in the source layout,
and VQA-RAD on real official rows: the committed test split (tests/assets, always) and the full
official file (../shared, development workspace only)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from student_train.convert.cli import main
from shared.convert.reports import DEFAULT_REPORT_PROMPT
from shared.records import answer_text, answer_type, question_text

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
VQA_RAD = SHARED / "data" / "vqa-rad" / "qa.json"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
#: committed: the 451 official test rows verbatim (tests/assets/vqa-rad/SOURCE.md)
VQA_RAD_TEST_ROWS = ASSETS / "vqa-rad" / "qa.json"
PREDICTIONS = ASSETS / "llava-med-predictions" / "vqa-rad" / "answer-file.jsonl"


def run_convert(fmt: str, inp: Path, out: Path, *extra: str):
    result = CliRunner().invoke(main, ["convert", "--format", fmt, "--input", str(inp), "--out", str(out), *extra])
    return result


def load(out: Path, split: str) -> list[dict]:
    return json.loads((out / f"{split}.json").read_text())


def stats(out: Path) -> dict:
    return json.loads((out / "convert_stats.json").read_text())


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def check_llava_shape(rec: dict) -> None:
    conv = rec["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt"]
    assert conv[0]["value"].startswith("<image>\n")
    assert isinstance(conv[1]["value"], str) and conv[1]["value"] == conv[1]["value"].strip()
    assert rec["answer_type"] in ("OPEN", "CLOSED")
    assert isinstance(rec["image"], str) and rec["image"]


# --- VQA-RAD on the real official file -------------------------------------------------------

@pytest.fixture(scope="module")
def vqa_rad_out(tmp_path_factory):
    if not VQA_RAD.is_file():
        pytest.skip(f"real VQA-RAD data not found at {VQA_RAD}")
    out = tmp_path_factory.mktemp("vqa-rad")
    result = run_convert("vqa-rad", VQA_RAD, out, "--image-root", str(VQA_RAD.parent / "images"))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_vqa_rad_real_counts_match_source_md(vqa_rad_out):
    out, printed = vqa_rad_out
    train, test = load(out, "train"), load(out, "test")
    assert len(train) == 1797 and len(test) == 451
    assert Counter(r["answer_type"] for r in train) == {"CLOSED": 1027, "OPEN": 770}
    assert Counter(r["answer_type"] for r in test) == {"CLOSED": 272, "OPEN": 179}
    assert len({r["image"] for r in train}) == 313 and len({r["image"] for r in test}) == 203
    assert not (out / "val.json").exists()
    assert "kept train: 1797 (CLOSED 1027, OPEN 770)" in printed and "kept test: 451 (CLOSED 272, OPEN 179)" in printed
    s = stats(out)
    assert s["kept"] == {"train": 1797, "test": 451} and s["skipped_total"] == 0
    assert s["fixed"]["answer is a number, cast to str"] == 5
    assert s["fixed"]["answer_type 'CLOSED ' normalised to 'CLOSED'"] == 2
    assert s["fixed"]["qid given as string, cast to int"] == 1


def check_matches_official_row(rec: dict, row: dict) -> None:
    """A converted VQA-RAD record has the LLaVA shape and its official row's image, question,
    answer, answer type and extra fields."""
    check_llava_shape(rec)
    assert rec["image"] == row["image_name"]
    assert question_text(rec) == row["question"].strip()
    assert answer_text(rec) == str(row["answer"]).strip()
    assert rec["answer_type"] == row["answer_type"].strip()
    assert (rec["image_organ"], rec["question_type"], rec["phrase_type"]) == (
        row["image_organ"], row["question_type"], row["phrase_type"])


def test_vqa_rad_real_records_follow_the_official_rows(vqa_rad_out):
    out, _ = vqa_rad_out
    rows = json.loads(VQA_RAD.read_text())
    by_qid = {int(r["qid"]): r for r in rows}
    recs = load(out, "train") + load(out, "test")
    assert all(isinstance(r["id"], int) for r in recs)
    assert sorted(r["id"] for r in recs) == sorted(by_qid)
    # the split is the official phrase_type split, which the copy also states in its `split` field
    assert {r["id"] for r in load(out, "test")} == {int(r["qid"]) for r in rows if r["split"] == "test"}
    for rec in recs:
        check_matches_official_row(rec, by_qid[rec["id"]])
    got = {r["id"]: r for r in recs}
    assert got[0]["conversations"][1]["value"] == "Yes"               # row 0: qid "0"
    assert got[1511]["conversations"][1]["value"] == "4"              # integer answers
    assert got[2234]["conversations"][1]["value"] == "12"
    assert got[2156]["answer_type"] == got[2157]["answer_type"] == "CLOSED"   # "CLOSED "
    assert 2036 in got and 2037 in got                                   # no question_rephrase


def test_vqa_rad_test_ids_are_the_prediction_question_ids(vqa_rad_out):
    out, _ = vqa_rad_out
    pred_ids = [json.loads(line)["question_id"] for line in PREDICTIONS.read_text().splitlines() if line.strip()]
    assert [r["id"] for r in load(out, "test")] == pred_ids


# --- VQA-RAD on the committed official test rows -----------------------------------------------

@pytest.fixture(scope="module")
def vqa_rad_test_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa-rad-test")
    result = run_convert("vqa-rad", VQA_RAD_TEST_ROWS, out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_vqa_rad_committed_test_rows_convert(vqa_rad_test_out):
    out, printed = vqa_rad_test_out
    test = load(out, "test")
    assert load(out, "train") == []
    assert len(test) == 451 and Counter(r["answer_type"] for r in test) == {"CLOSED": 272, "OPEN": 179}
    assert len({r["image"] for r in test}) == 203
    assert "kept test: 451 (CLOSED 272, OPEN 179)" in printed
    s = stats(out)
    assert s["kept"] == {"test": 451} and s["skipped_total"] == 0
    rows = json.loads(VQA_RAD_TEST_ROWS.read_text())
    assert [r["id"] for r in test] == [int(r["qid"]) for r in rows]  # official order
    for rec, row in zip(test, rows):
        check_matches_official_row(rec, row)
    pred_ids = [json.loads(line)["question_id"] for line in PREDICTIONS.read_text().splitlines() if line.strip()]
    assert [r["id"] for r in test] == pred_ids


def test_vqa_rad_image_root_drops_rows_without_their_image(tmp_path):
    """With --image-root on the 12 committed images, the 44 test rows whose image is there stay."""
    result = run_convert("vqa-rad", VQA_RAD_TEST_ROWS, tmp_path / "out", "--image-root",
                         str(VQA_RAD_TEST_ROWS.parent / "images"))
    assert result.exit_code == 0, result.output
    test = load(tmp_path / "out", "test")
    assert len(test) == 44 and Counter(r["answer_type"] for r in test) == {"CLOSED": 25, "OPEN": 19}
    assert stats(tmp_path / "out")["skipped"] == {"image file not found under --image-root": 407}


# --- VQA-RAD quirks on synthetic rows ---------------------------------------------------------

def vqa_rad_row(qid, **kw):
    row = {"qid": qid, "phrase_type": "freeform", "image_name": "synpic1.jpg", "image_organ": "HEAD",
           "question": "Is it normal?", "question_type": "PRES", "answer": "Yes", "answer_type": "CLOSED"}
    row.update(kw)
    return row


def test_vqa_rad_bad_rows_are_counted_not_fatal(tmp_path):
    rows = [vqa_rad_row("0"), vqa_rad_row(1, phrase_type="test_para", answer=3, answer_type="OPEN "),
            vqa_rad_row(2, image_name=None), vqa_rad_row(3, question="   "), vqa_rad_row(4, answer_type="MAYBE"),
            vqa_rad_row(0), "not a row", vqa_rad_row(5, phrase_type=None), vqa_rad_row(6, answer=None)]
    del rows[-1]["answer"]
    folder = tmp_path / "osf"
    write(folder / "VQA_RAD Dataset Public.json", rows)
    out = tmp_path / "out"
    result = run_convert("vqa-rad", folder, out)
    assert result.exit_code == 0, result.output
    train, test = load(out, "train"), load(out, "test")
    assert [r["id"] for r in train] == [0] and [r["id"] for r in test] == [1]
    assert test[0]["conversations"][1]["value"] == "3" and test[0]["answer_type"] == "OPEN"
    assert stats(out)["skipped"] == {"no image": 1, "empty question": 1, "unknown answer_type 'MAYBE'": 1,
                                     "duplicate id": 1, "row is not a JSON object": 1,
                                     "missing phrase_type": 1, "missing answer": 1}
    assert "skipped: 7" in result.output and "duplicate id: 1" in result.output


def test_malformed_json_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"qid": 1,\n   "question": "x" "answer": 2}\n]\n')
    result = run_convert("vqa-rad", bad, tmp_path / "out")
    assert result.exit_code == 2
    assert f"Error: {bad}:3:20: malformed JSON" in result.output
    jsonl = tmp_path / "pv" / "train.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text('{"question": "a", "answer": "yes", "image": "x.jpg"}\n{"question": oops}\n')
    result = run_convert("pathvqa", jsonl.parent, tmp_path / "out2")
    assert result.exit_code == 2 and f"{jsonl}:2:14: malformed JSON" in result.output


def test_image_root_drops_records_without_a_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "synpic1.jpg").write_bytes(b"x")
    src = write(tmp_path / "qa.json", [vqa_rad_row(1), vqa_rad_row(2, image_name="synpic2.jpg"),
                                       vqa_rad_row(3, image_name="../outside.jpg")])
    out = tmp_path / "out"
    result = run_convert("vqa-rad", src, out, "--image-root", str(tmp_path / "img"))
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in load(out, "train")] == [1]
    assert stats(out)["skipped"] == {"image file not found under --image-root": 1,
                                     "image path escapes --image-root": 1}


# --- SLAKE --------------------------------------------------------------------------------------

def slake_row(qid, lang="en", **kw):
    row = {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Lung",
           "q_lang": lang, "location": "Chest", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
           "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}
    row.update(kw)
    return row


def test_slake_english_rows_and_three_splits(tmp_path):
    folder = tmp_path / "Slake1.0"
    write(folder / "train.json", [slake_row(0), slake_row(1, "zh", question="哪个器官?"),
                                  slake_row(2, answer_type="CLOSED", answer="Yes"), slake_row(3, img_name="")])
    write(folder / "validation.json", [slake_row(10), slake_row(11, "zh")])
    write(folder / "test.json", [slake_row(20, answer=7, answer_type=" closed")])
    out = tmp_path / "out"
    result = run_convert("slake", folder, out)
    assert result.exit_code == 0, result.output
    train, val, test = load(out, "train"), load(out, "val"), load(out, "test")
    assert [r["id"] for r in train] == [0, 2] and [r["id"] for r in val] == [10] and [r["id"] for r in test] == [20]
    for rec in train + val + test:
        check_llava_shape(rec)
    assert train[0]["image"] == "xmlab1/source.jpg"
    assert (train[0]["modality"], train[0]["location"], train[0]["content_type"]) == ("CT", "Chest", "Organ")
    assert question_text(train[1]) == "Which organ is abnormal?" and answer_text(train[1]) == "Yes"
    assert answer_type(train[1]) == "CLOSED"
    assert test[0]["conversations"][1]["value"] == "7" and test[0]["answer_type"] == "CLOSED"
    assert stats(out)["skipped"] == {"q_lang is 'zh', not 'en'": 2, "no image": 1}
    # converting a source without a val split into the same folder removes the stale val.json
    (folder / "validation.json").unlink()
    assert run_convert("slake", folder, out).exit_code == 0
    assert not (out / "val.json").exists() and len(load(out, "train")) == 2


# --- PathVQA ------------------------------------------------------------------------------------

def test_pathvqa_json_jsonl_csv_folder(tmp_path):
    folder = tmp_path / "pathvqa"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"image": "train_0001", "question": "Is this a tumour?", "answer": "yes"},
        {"image": "train_0002", "question": "What organ is shown?", "answer": "liver "},
        {"image": "", "question": "x?", "answer": "no"},
    ]) + "\n")
    with open(folder / "val.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "question", "answer", "answer_type"])
        w.writeheader()
        w.writerow({"id": "17", "image": "val/val_0003.jpg", "question": "Where?", "answer": "no", "answer_type": "OPEN"})
    write(folder / "test.json", [{"qid": "t-1", "img_id": "test_0004", "question": "Is it benign?", "answer": "No"}])
    out = tmp_path / "out"
    result = run_convert("pathvqa", folder, out)
    assert result.exit_code == 0, result.output
    train, val, test = load(out, "train"), load(out, "val"), load(out, "test")
    assert [(r["id"], r["image"], r["answer_type"]) for r in train] == [
        ("train_0", "train/train_0001.jpg", "CLOSED"), ("train_1", "train/train_0002.jpg", "OPEN")]
    assert answer_text(train[1]) == "liver"
    assert [(r["id"], r["image"], r["answer_type"]) for r in val] == [(17, "val/val_0003.jpg", "OPEN")]
    assert [(r["id"], r["image"], r["answer_type"]) for r in test] == [("t-1", "test/test_0004.jpg", "CLOSED")]
    for rec in train + val + test:
        check_llava_shape(rec)
    s = stats(out)
    assert s["skipped"] == {"no image": 1}
    assert s["fixed"]["answer_type missing, inferred from the answer"] == 3


def test_pathvqa_refuses_pickle(tmp_path):
    pkl = tmp_path / "train_vqa.pkl"
    pkl.write_bytes(b"\x80\x04.")
    result = run_convert("pathvqa", pkl, tmp_path / "out")
    assert result.exit_code == 2 and "pickle" in result.output


# --- IU-Xray / MIMIC-CXR (R2Gen annotation.json) ------------------------------------------------

def r2gen_annotation() -> dict:
    return {
        "train": [{"id": "CXR1_1_IM-0001", "report": "The heart is normal in size. The lungs are clear.",
                   "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"], "split": "train"},
                  {"id": "CXR2", "report": "  ", "image_path": ["CXR2/0.png"], "split": "train"},
                  {"id": "CXR3", "report": "No acute disease.", "image_path": [], "split": "train"}],
        "val": [{"id": "CXR4", "report": "Normal chest.", "image_path": ["CXR4/0.png"], "split": "val"}],
        "test": [{"id": "CXR5", "report": "Mild cardiomegaly.", "image_path": ["CXR5/0.png", "CXR5/1.png"],
                  "split": "test", "study_id": 50414267, "subject_id": 10000032}],
    }


def test_iu_xray_reports(tmp_path):
    src = write(tmp_path / "iu_xray" / "annotation.json", r2gen_annotation())
    out = tmp_path / "out"
    result = run_convert("iu-xray", src.parent, out)
    assert result.exit_code == 0, result.output
    train, val, test = load(out, "train"), load(out, "val"), load(out, "test")
    assert [r["id"] for r in train] == ["CXR1_1_IM-0001"] and [r["id"] for r in val] == ["CXR4"]
    assert [r["id"] for r in test] == ["CXR5"]
    rec = train[0]
    check_llava_shape(rec)
    assert rec["image"] == "CXR1_1_IM-0001/0.png"
    assert rec["image_paths"] == ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"]
    assert rec["conversations"][0]["value"] == "<image>\n" + DEFAULT_REPORT_PROMPT
    assert answer_text(rec) == "The heart is normal in size. The lungs are clear."
    assert rec["answer_type"] == "OPEN" and rec["task"] == "report" and rec["dataset"] == "iu-xray"
    assert stats(out)["skipped"] == {"empty report": 1, "no image": 1}


def test_mimic_cxr_reports_with_custom_prompt(tmp_path):
    src = write(tmp_path / "annotation.json", r2gen_annotation())
    out = tmp_path / "out"
    result = run_convert("mimic-cxr", src, out, "--prompt", "Describe the findings.")
    assert result.exit_code == 0, result.output
    rec = load(out, "test")[0]
    assert rec["conversations"][0]["value"] == "<image>\nDescribe the findings."
    assert (rec["study_id"], rec["subject_id"], rec["dataset"]) == (50414267, 10000032, "mimic-cxr")
    assert rec["image"] == "CXR5/0.png"
    # --prompt is refused for VQA formats
    result = run_convert("slake", tmp_path, tmp_path / "o2", "--prompt", "x")
    assert result.exit_code == 2 and "--prompt" in result.output


# --- OmniMedVQA ---------------------------------------------------------------------------------

def omni_row(qid, **kw):
    row = {"dataset": "ACRIMA", "question_id": qid, "question_type": "Disease Diagnosis",
           "question": "What is the diagnosis?", "option_A": "glaucoma", "option_B": "normal",
           "gt_answer": "normal", "image_path": "Images/ACRIMA/Im001.png", "modality_type": "Fundus Photography"}
    row.update(kw)
    return row


def test_omnimedvqa_options(tmp_path):
    folder = tmp_path / "QA_information" / "Open-access"
    write(folder / "ACRIMA.json", [omni_row("1"), omni_row("2", option_C="cataract", option_D="AMD", gt_answer="amd"),
                                   omni_row("3", gt_answer="tumour")])
    write(folder / "sub" / "Other.json", [omni_row("4", option_B=None, gt_answer="glaucoma"),
                                          omni_row("5", option_B=12, gt_answer=12, image_path=None)])
    out = tmp_path / "out"
    result = run_convert("omnimedvqa", tmp_path / "QA_information", out)
    assert result.exit_code == 0, result.output
    assert load(out, "train") == []
    test = load(out, "test")
    assert [r["id"] for r in test] == [1, 2]
    first, second = test
    check_llava_shape(first)
    assert first["options"] == ["glaucoma", "normal"] and first["answer_letter"] == "B"
    assert first["conversations"][0]["value"] == "<image>\nWhat is the diagnosis?\nOptions:\nA. glaucoma\nB. normal"
    assert answer_text(first) == "normal" and first["answer_type"] == "CLOSED"
    assert (first["dataset"], first["modality_type"]) == ("ACRIMA", "Fundus Photography")
    assert second["options"] == ["glaucoma", "normal", "cataract", "AMD"]
    assert answer_text(second) == "AMD" and second["answer_letter"] == "D"
    assert stats(out)["skipped"] == {"gt_answer not among the options": 1, "fewer than two options": 1, "no image": 1}


def test_missing_input_and_unknown_format(tmp_path):
    result = run_convert("slake", tmp_path / "nope", tmp_path / "out")
    assert result.exit_code == 2 and "input not found" in result.output
    result = run_convert("vqa-med", tmp_path, tmp_path / "out")
    assert result.exit_code == 2 and "vqa-rad" in result.output
