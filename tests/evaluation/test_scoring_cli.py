"""`medalign-eval score` and `medalign-eval compare` through click's CliRunner."""

import json

import pytest
from click.testing import CliRunner

from evaluation.cli import main


def rec(rid, answer, atype):
    return {"id": rid, "conversations": [{"from": "human", "value": "<image>\nq?"},
                                         {"from": "gpt", "value": answer}], "answer_type": atype}


@pytest.fixture
def vqa_files(tmp_path):
    gt = tmp_path / "test.json"
    gt.write_text(json.dumps([rec(1, "no", "CLOSED"), rec(2, "yes", "CLOSED"),
                              rec(3, "left lung", "OPEN"), rec(4, "no", "CLOSED")]))
    pred = tmp_path / "preds.jsonl"
    pred.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 3, "text": "The left lung."},
        {"question_id": "1", "text": "Normal."},        # llava_med hit, strict miss
        {"question_id": 2, "text": "Yes"},
        {"question_id": 99, "text": "extra"},
    ]) + "\n")
    return gt, pred


def test_score_vqa_writes_json_and_markdown(tmp_path, vqa_files):
    gt, pred = vqa_files
    out = tmp_path / "run" / "metrics.json"
    r = CliRunner().invoke(main, ["score", "--pred", str(pred), "--gt", str(gt), "--task", "vqa",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["missing_ids"] == ["4"] and m["extra_ids"] == ["99"]
    assert "1 ground-truth ids have no prediction" in r.stderr and ": 4" in r.stderr
    assert "prediction ids are not in the ground truth" in r.stderr and "99" in r.stderr
    lm = m["llava_med"]
    assert set(lm) == {"exact match score", "f1 score", "precision", "recall", "bleu_score",
                       "bleu_score_1", "bleu_score_2", "bleu_score_3", "yes/no accuracy",
                       "num_open", "num_close"}
    assert (lm["num_open"], lm["num_close"]) == (1, 3)
    assert lm["yes/no accuracy"] == pytest.approx(200 / 3)       # q1 (normal~no), q2; q4 missing
    assert m["strict"]["yes/no accuracy"] == pytest.approx(100 / 3)
    assert lm["recall"] == pytest.approx(100.0) and lm["bleu_score_2"] == pytest.approx(100.0)
    md = (tmp_path / "run" / "metrics.md").read_text()
    assert "| yes/no accuracy | 66.67 |" in md and "| strict yes/no accuracy | 33.33 |" in md
    assert "| yes/no accuracy | 66.67 |" in r.stdout


def test_score_without_out_prints_json(vqa_files):
    gt, pred = vqa_files
    r = CliRunner().invoke(main, ["score", "--pred", str(pred), "--gt", str(gt), "--task", "vqa"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["llava_med"]["num_close"] == 3


def test_malformed_jsonl_is_a_clean_error(tmp_path, vqa_files):
    gt, _ = vqa_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "no"}\n{"question_id": 2, "text": \n')
    r = CliRunner().invoke(main, ["score", "--pred", str(bad), "--gt", str(gt), "--task", "vqa"])
    assert r.exit_code == 2
    assert f"Error: {bad}:2:28: malformed JSON" in r.stderr
    assert "Traceback" not in r.output


def test_score_report_task_without_wordnet_or_models(tmp_path, monkeypatch):
    import nltk

    from evaluation.scoring import nltk_data

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk_data, "SYSTEM_WORDNET_DIRS", ())
    gt = tmp_path / "reports.json"
    gt.write_text(json.dumps([rec(1, "The heart is normal. Lungs are clear.", None)]))
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"question_id": 1, "text": "The heart is normal. Lungs are clear."}) + "\n")
    out = tmp_path / "m.json"
    r = CliRunner().invoke(main, ["score", "--pred", str(pred), "--gt", str(gt), "--task", "report",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["units"] == "fraction"
    for block in ("medheval", "strict"):
        assert m[block]["bleu"] == pytest.approx(1.0) and m[block]["rouge_l_f1"] == pytest.approx(1.0)
        assert m[block]["meteor"] is None and m[block]["bertscore_f1"] is None
        assert m[block]["semb_score"] is None
    assert "Warning: meteor not computed" in r.stderr
    assert "Warning: semb_score not computed: pass --chexbert" in r.stderr
    md = (tmp_path / "m.md").read_text()
    assert "| meteor | - |" in md and "| strict rouge_l_f1 | 100.00 |" in md   # shown x100


def test_report_flags_come_in_pairs(tmp_path, vqa_files):
    gt, pred = vqa_files
    base = ["score", "--pred", str(pred), "--gt", str(gt), "--task", "report"]
    r = CliRunner().invoke(main, base + ["--chexbert-tokenizer", str(tmp_path)])
    assert r.exit_code == 2 and "--chexbert-tokenizer needs --chexbert" in r.stderr
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"")
    r = CliRunner().invoke(main, base + ["--chexbert", str(ckpt)])
    assert r.exit_code == 2 and "--chexbert needs --chexbert-tokenizer" in r.stderr
    r = CliRunner().invoke(main, base + ["--device", "tpu", "--chexbert", str(ckpt),
                                         "--chexbert-tokenizer", str(tmp_path)])
    assert r.exit_code == 2 and "--device must be" in r.stderr


def test_bad_nltk_data_dir_exits_2(tmp_path, vqa_files):
    gt, pred = vqa_files
    r = CliRunner().invoke(main, ["score", "--pred", str(pred), "--gt", str(gt), "--task", "report",
                                  "--nltk-data", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "--nltk-data: not a directory" in r.stderr


def _metrics(path, yes_no, recall):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"task": "vqa", "llava_med": {"recall": recall, "yes/no accuracy": yes_no,
                                                             "num_open": 10, "num_close": 20},
                                "strict": {"recall": recall - 1, "yes/no accuracy": yes_no - 5}}))
    return path


def test_compare_table_bolds_the_best(tmp_path):
    a = _metrics(tmp_path / "lora" / "metrics.json", 80.0, 30.0)
    b = _metrics(tmp_path / "medalign" / "metrics.json", 84.5, 29.0)
    r = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "| metric | lora | medalign |"
    assert "| recall | **30.00** | 29.00 |" in lines
    assert "| yes/no accuracy | 80.00 | **84.50** |" in lines
    assert "| num_open | 10 | 10 |" in lines                  # counts never bold
    assert "| strict yes/no accuracy | 75.00 | **79.50** |" in lines
    r = CliRunner().invoke(main, ["compare", str(a), str(b), "--names", "A,B", "--out", str(tmp_path / "t.md")])
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == "| metric | A | B |"
    assert (tmp_path / "t.md").read_text() == r.stdout


def test_compare_errors(tmp_path):
    a = _metrics(tmp_path / "a.json", 1.0, 1.0)
    r = CliRunner().invoke(main, ["compare", str(a), "--names", "x,y"])
    assert r.exit_code == 2 and "--names gives 2 names for 1 files" in r.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    r = CliRunner().invoke(main, ["compare", str(junk)])
    assert r.exit_code == 2 and "not a metrics file" in r.stderr


def test_score_report_with_bertscore_model(tmp_path, monkeypatch):
    import nltk
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from evaluation.scoring import nltk_data

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk_data, "SYSTEM_WORDNET_DIRS", ())
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] the heart is normal lungs are clear".split()
    model_dir = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=32)).save_pretrained(model_dir)
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(model_dir)
    gt = tmp_path / "reports.json"
    gt.write_text(json.dumps([rec(1, "The heart is normal", None), rec(2, "Lungs are clear", None)]))
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"question_id": 1, "text": "the heart is normal"}) + "\n"
                    + json.dumps({"question_id": 2, "text": "lungs are clear"}) + "\n")
    r = CliRunner().invoke(main, ["score", "--pred", str(pred), "--gt", str(gt), "--task", "report",
                                  "--bertscore-model", str(model_dir), "--bertscore-layer", "1",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    # same wordpieces after lower-casing; the medheval strip turns "the" into "he"
    assert m["strict"]["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    assert m["medheval"]["bertscore_f1"] < 0.99
    assert m["report_info"]["bertscore"]["layer"] == 1 and m["report_info"]["bertscore"]["idf"] is False
    assert "not roberta-large" in m["report_info"]["bertscore"]["note"]
    r = CliRunner().invoke(main, ["score", "--pred", str(pred), "--gt", str(gt), "--task", "report",
                                  "--bertscore-model", str(model_dir)])
    assert r.exit_code == 2 and "layer 17 out of range 0..1" in r.stderr
