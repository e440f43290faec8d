"""CheXbert: a tiny random ``chexbert.pth`` in the real layout (nn.DataParallel keys, epoch,
Adam state), loaded strictly through the real path; semb_score against a direct unbatched
computation, the f1chexbert labels and micro/macro F1 by hand, the loading errors."""

import math

import pytest
import torch
from torch import nn

from evaluation.scoring.chexbert import (
    CONDITIONS,
    CheXbertConfig,
    clean_report,
    f1_micro_macro,
    load_chexbert,
    rrg_labels,
)
from shared.errors import MedAlignError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "acute", "cardio", "##pulmonary", "process", "the", "heart", "is", "normal", "size", "lungs", "are", "clear", "small", "left", "right", "pleural", "effusion", "edema", ".", ","]
REPORTS = ["No acute cardiopulmonary process.", "Small left pleural effusion.",
           "The heart is normal size. Lungs are clear.", "Edema , right effusion .", ""]


def bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=1, intermediate_size=32, max_position_embeddings=520,
                      initializer_range=0.5, **kw)


class Labeler(nn.Module):
    """CheXbert's bert_labeler layout, built here independently of the implementation."""

    def __init__(self, cfg):
        from transformers import BertModel

        super().__init__()
        self.bert = BertModel(cfg)
        self.linear_heads = nn.ModuleList([nn.Linear(64, 4) for _ in range(13)] + [nn.Linear(64, 2)])
        for head in self.linear_heads:
            nn.init.normal_(head.weight, std=2.0)


def save_checkpoint(path, labeler, *, legacy=False, edit=None):
    dp = nn.DataParallel(labeler)
    opt = torch.optim.Adam(dp.parameters(), lr=1e-5)
    dp.module.linear_heads[0].weight.sum().backward()
    opt.step()
    sd = dict(dp.state_dict())
    sd["module.bert.embeddings.position_ids"] = torch.arange(520).unsqueeze(0)  # old transformers
    if edit:
        edit(sd)
    torch.save({"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict()},
               str(path), _use_new_zipfile_serialization=not legacy)


@pytest.fixture(scope="module")
def chexbert_files(tmp_path_factory):
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("chexbert")
    tok_dir = d / "bert-base-uncased"
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(tok_dir)
    bert_config().save_pretrained(tok_dir)
    torch.manual_seed(0)
    labeler = Labeler(bert_config()).eval()
    save_checkpoint(d / "chexbert.pth", labeler)
    return d / "chexbert.pth", tok_dir, labeler


def direct(labeler, tok, text):
    """One text, no batching: (CLS vector, head argmaxes)."""
    text = " ".join(text.strip().replace("\n", " ").split())
    pieces = tok.tokenize(text)
    ids = [tok.cls_token_id] + tok.convert_tokens_to_ids(pieces)[:510] + [tok.sep_token_id]
    with torch.no_grad():
        cls = labeler.bert(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)))[0][0, 0]
        heads = [int(h(cls).argmax()) for h in labeler.linear_heads]
    return cls.numpy(), heads


def test_clean_report_and_input_ids(chexbert_files):
    ckpt, tok_dir, _ = chexbert_files
    assert clean_report("  No acute\n\nprocess.\t ") == "No acute process."
    s = load_chexbert(CheXbertConfig(checkpoint=ckpt, tokenizer_dir=tok_dir))
    assert s.input_ids("") == [2, 3]
    long_ids = s.input_ids("heart " * 600)
    assert len(long_ids) == 512 and long_ids[0] == 2 and long_ids[-1] == 3 and long_ids[-2] == VOCAB.index("heart")
    assert s.input_ids("cardiopulmonary") == [2, VOCAB.index("cardio"), VOCAB.index("##pulmonary"), 3]


def test_semb_score_equals_direct_cosines(chexbert_files):
    from transformers import BertTokenizer

    ckpt, tok_dir, labeler = chexbert_files
    tok = BertTokenizer.from_pretrained(str(tok_dir))
    hyps, refs = REPORTS, REPORTS[1:] + REPORTS[:1]
    res = load_chexbert(CheXbertConfig(checkpoint=ckpt, tokenizer_dir=tok_dir, batch_size=2)).score(hyps, refs)
    expect = []
    for h, r in zip(hyps, refs):
        a, b = direct(labeler, tok, h)[0], direct(labeler, tok, r)[0]
        expect.append(float((a * b).sum() / (math.sqrt((a * a).sum()) * math.sqrt((b * b).sum()))))
    assert res["per_report"]["semb_score"] == pytest.approx(expect, abs=1e-5)
    assert len({round(e, 3) for e in expect}) == len(expect)          # the cosines differ
    assert res["mean"]["semb_score"] == pytest.approx(sum(expect) / len(expect), abs=1e-5)
    same = load_chexbert(CheXbertConfig(checkpoint=ckpt, tokenizer_dir=tok_dir)).score(refs, refs)
    assert same["per_report"]["semb_score"] == pytest.approx([1.0] * len(refs), abs=1e-5)
    # the F1s from the head labels of the same direct pass
    hl = [rrg_labels(direct(labeler, tok, h)[1]) for h in hyps]
    rl = [rrg_labels(direct(labeler, tok, r)[1]) for r in refs]
    mi, ma = f1_micro_macro(rl, hl, list(range(14)))
    assert res["mean"]["chexbert_micro_f1_14"] == pytest.approx(mi)
    assert res["mean"]["chexbert_macro_f1_14"] == pytest.approx(ma)
    assert next(iter(res["mean"])) == "semb_score"


def test_rrg_labels_and_f1_by_hand():
    assert rrg_labels([0, 1, 2, 3, 1]) == [0, 1, 0, 1, 1]
    refs = [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    hyps = [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    # column 0: tp 1 fn 1 -> 2/3; column 1: tp 1 fp 1 -> 2/3; column 2 empty on both sides -> 0
    mi, ma = f1_micro_macro(refs, hyps, [0, 1, 2])
    assert mi == pytest.approx(4 / 6) and ma == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert f1_micro_macro([[0]], [[0]], [0]) == (0.0, 0.0)
    assert len(CONDITIONS) == 14 and CONDITIONS[-1] == "No Finding"


def test_legacy_format_and_config_from_shapes(tmp_path, chexbert_files):
    from transformers import BertTokenizer

    _, _, labeler = chexbert_files
    save_checkpoint(tmp_path / "old.pth", labeler, legacy=True)
    tok_dir = tmp_path / "tok"                       # a tokenizer directory without config.json
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(tok_dir)
    (tok_dir / "config.json").unlink(missing_ok=True)
    s = load_chexbert(CheXbertConfig(checkpoint=tmp_path / "old.pth", tokenizer_dir=tok_dir))
    tok = BertTokenizer.from_pretrained(str(tok_dir))
    a = s.encode(["Small left pleural effusion."])[0][0].numpy()
    assert a == pytest.approx(direct(labeler, tok, "Small left pleural effusion.")[0], abs=1e-5)


def _drop_head(sd):
    del sd["module.linear_heads.13.bias"]


def _extra_key(sd):
    sd["module.classifier.weight"] = torch.zeros(2, 2)


def _bad_shape(sd):
    sd["module.linear_heads.13.weight"] = torch.zeros(3, 64)


@pytest.mark.parametrize("edit, message", [
    (_drop_head, r"missing keys \['linear_heads.13.bias'\]"),
    (_extra_key, r"unexpected keys \['classifier.weight'\]"),
    (_bad_shape, "size mismatch"),
])
def test_strict_loading_names_the_problem(tmp_path, chexbert_files, edit, message):
    _, tok_dir, labeler = chexbert_files
    save_checkpoint(tmp_path / "bad.pth", labeler, edit=edit)
    with pytest.raises(MedAlignError, match=message):
        load_chexbert(CheXbertConfig(checkpoint=tmp_path / "bad.pth", tokenizer_dir=tok_dir))


def test_unreadable_checkpoints(tmp_path, chexbert_files):
    _, tok_dir, _ = chexbert_files
    with pytest.raises(MedAlignError, match="not a file"):
        load_chexbert(CheXbertConfig(checkpoint=tmp_path / "none.pth", tokenizer_dir=tok_dir))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MedAlignError, match="cannot read"):
        load_chexbert(CheXbertConfig(checkpoint=tmp_path / "junk.pth", tokenizer_dir=tok_dir))
    torch.save({"state_dict": {}}, str(tmp_path / "other.pth"))
    with pytest.raises(MedAlignError, match="no 'model_state_dict'"):
        load_chexbert(CheXbertConfig(checkpoint=tmp_path / "other.pth", tokenizer_dir=tok_dir))
    with pytest.raises(MedAlignError, match="--chexbert-tokenizer"):
        load_chexbert(CheXbertConfig(checkpoint=tmp_path / "other.pth", tokenizer_dir=tmp_path / "x"))


def test_cli_scores_chexbert_in_both_blocks(tmp_path, chexbert_files):
    import json

    from click.testing import CliRunner

    from evaluation.cli import main

    ckpt, tok_dir, _ = chexbert_files
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps([{"id": i, "conversations": [{"from": "human", "value": "<image>\nx"},
                                                          {"from": "gpt", "value": r}]}
                              for i, r in enumerate(REPORTS[:3])]))
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"question_id": i, "text": r}) + "\n"
                            for i, r in enumerate(REPORTS[:3])))
    r = CliRunner().invoke(main, ["score", "--pred", str(pred), "--gt", str(gt), "--task", "report",
                                  "--chexbert", str(ckpt), "--chexbert-tokenizer", str(tok_dir),
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["strict"]["semb_score"] == pytest.approx(1.0, abs=1e-5)      # identical reports
    assert m["medheval"]["semb_score"] == pytest.approx(1.0, abs=1e-5)    # no strip bites here
    assert m["strict"]["chexbert_micro_f1_14"] in (0.0, 1.0)
    assert "chexbert_micro_f1_14" not in m["medheval"]
