"""BERTScore as bert_score computes it: tiny random BERT and RoBERTa directories, a direct
per-token computation of the package's formula, and a cross-check with the package itself."""

import pytest
import torch

from evaluation.scoring.bertscore import BertScoreConfig, load_bertscore
from shared.errors import MedAlignError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "acute", "findings", "the", "heart", "is", "normal", "size", "lungs", "are", "clear", "small", "left", "pleural", "effusion", "right"]
CANDS = ["the heart is normal size", "small left pleural effusion", "no acute findings", ""]
REFS = ["the heart is normal", "small right pleural effusion", "no acute findings", "lungs are clear"]
CORPUS = ["The heart is normal in size.", "Small left pleural effusion.", "No acute findings.",
          "Lungs are clear, no pneumothorax.", "Mild cardiomegaly; no edema."] * 4


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=3,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, model_max_length=64).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A RoBERTa with a byte-level BPE vocabulary trained here (vocab.json + merges.txt)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    d = tmp_path_factory.mktemp("tiny_roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(d))
    tok = RobertaTokenizer.from_pretrained(str(d), model_max_length=60)
    tok.save_pretrained(d)
    torch.manual_seed(1)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=3,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    RobertaModel(cfg).save_pretrained(d)
    return d


def direct_bertscore(cand, ref, tok, model, layer, prefix_space):
    """bert_score's formula written out per token: greedy max over every token (special tokens
    included), averaged with weight 0 on [CLS]/[SEP]; empty side -> 0."""
    from transformers import AutoModel

    full = AutoModel.from_pretrained(model).eval() if isinstance(model, str) else model

    def vecs(text):
        text = text.strip()
        if not text:
            return None
        ids = tok.encode(" " + text if prefix_space else text, add_special_tokens=True)
        with torch.no_grad():
            h = full(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
        w = [0.0 if i in (tok.cls_token_id, tok.sep_token_id) else 1.0 for i in ids]
        return [h[i] / h[i].norm() for i in range(len(ids))], w

    c, r = vecs(cand), vecs(ref)
    if c is None or r is None:
        return 0.0, 0.0, 0.0
    (cv, cw), (rv, rw) = c, r
    p = sum(w * max(float(x @ y) for y in rv) for x, w in zip(cv, cw)) / sum(cw)
    rr = sum(w * max(float(x @ y) for y in cv) for x, w in zip(rv, rw)) / sum(rw)
    return p, rr, 2 * p * rr / (p + rr)


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_roberta"])
def test_bertscore_matches_the_formula_per_token(which, request):
    from transformers import AutoModel, AutoTokenizer

    d = request.getfixturevalue(which)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModel.from_pretrained(str(d)).eval()
    for layer in (1, 3):
        s = load_bertscore(BertScoreConfig(model_dir=d, layer=layer, batch_size=3))
        res = s.score(CANDS, REFS)
        for i, (c, r) in enumerate(zip(CANDS, REFS)):
            p, rr, f = direct_bertscore(c, r, tok, model, layer, which == "tiny_roberta")
            assert res["per_report"]["bertscore_precision"][i] == pytest.approx(p, abs=1e-5)
            assert res["per_report"]["bertscore_recall"][i] == pytest.approx(rr, abs=1e-5)
            assert res["per_report"]["bertscore_f1"][i] == pytest.approx(f, abs=1e-5)
        assert res["per_report"]["bertscore_f1"][2] == pytest.approx(1.0, abs=1e-6)  # identical
        assert res["per_report"]["bertscore_f1"][3] == 0.0                          # empty candidate
        assert res["info"]["layer"] == layer and "not roberta-large" in res["info"]["note"]


def test_bertscore_batch_size_does_not_change_scores(tiny_roberta):
    a = load_bertscore(BertScoreConfig(model_dir=tiny_roberta, layer=2, batch_size=1)).score(CANDS, REFS)
    b = load_bertscore(BertScoreConfig(model_dir=tiny_roberta, layer=2, batch_size=16)).score(CANDS, REFS)
    for k, v in a["per_report"].items():
        assert v == pytest.approx(b["per_report"][k], abs=1e-6)


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_roberta"])
def test_bertscore_equals_the_bert_score_package(which, request, monkeypatch):
    """bert_score.score on the same local model and layer, one pair per batch (so its zero-padded
    similarity matrix has no padding), to 1e-6. Test-only patch for transformers 5: the
    tokenizer's ``encode`` honours ``add_prefix_space=True`` again (a space before the text, as
    the transformers 3/4 RoBERTa tokenizer did), which transformers 5 silently ignores."""
    bert_score = pytest.importorskip("bert_score")
    import sys

    d = request.getfixturevalue(which)
    mod = sys.modules["bert_score.score"]
    original = mod.get_tokenizer

    def get_tokenizer(*args, **kwargs):
        tok = original(*args, **kwargs)
        encode = tok.encode

        def encode_with_prefix(text, *a, add_prefix_space=False, **kw):
            return encode(" " + text if add_prefix_space and not text[:1].isspace() else text, *a, **kw)

        tok.encode = encode_with_prefix
        return tok

    monkeypatch.setattr(mod, "get_tokenizer", get_tokenizer)
    cands, refs = CANDS[:3], REFS[:3]
    P, R, F = bert_score.score(cands, refs, model_type=str(d), num_layers=2, batch_size=1,
                               device="cpu")
    res = load_bertscore(BertScoreConfig(model_dir=d, layer=2)).score(cands, refs)
    assert res["per_report"]["bertscore_precision"] == pytest.approx(P.tolist(), abs=1e-6)
    assert res["per_report"]["bertscore_recall"] == pytest.approx(R.tolist(), abs=1e-6)
    assert res["per_report"]["bertscore_f1"] == pytest.approx(F.tolist(), abs=1e-6)


def test_bertscore_errors(tiny_bert, tmp_path):
    with pytest.raises(MedAlignError, match="out of range"):
        load_bertscore(BertScoreConfig(model_dir=tiny_bert, layer=4))
    with pytest.raises(MedAlignError, match="not a directory"):
        load_bertscore(BertScoreConfig(model_dir=tmp_path / "missing"))
    with pytest.raises(MedAlignError, match="cannot load"):
        load_bertscore(BertScoreConfig(model_dir=tmp_path))
    with pytest.raises(MedAlignError, match="batch size"):
        BertScoreConfig(model_dir=tiny_bert, batch_size=0)
