"""Report metrics on hand-computed cases; METEOR without WordNet; BERTScore with a tiny BERT."""

import math

import pytest
import torch

from evaluation.scoring.bertscore import BertScoreConfig, bertscore
from evaluation.scoring.join import Prediction, join_by_id
from evaluation.scoring import report
from evaluation.scoring.report import corpus_bleu_n, find_wordnet, meteor, rouge_l, score_reports, tokenize
from shared.errors import MedAlignError

VOCAB = ("[PAD] [UNK] [CLS] [SEP] [MASK] no acute findings the heart is normal size lungs are "
         "clear small left pleural effusion right").split()


class NoSynonyms:
    """WordNet stand-in: METEOR then matches exact words and Porter stems only."""

    def synsets(self, *args, **kwargs):
        return []


def joined_reports(pairs):
    gt = [{"id": i, "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                      {"from": "gpt", "value": ref}]} for i, (ref, _) in enumerate(pairs)]
    preds = {str(i): Prediction(str(i), hyp, i) for i, (_, hyp) in enumerate(pairs) if hyp is not None}
    return join_by_id(gt, preds)


def test_tokenize():
    assert tokenize("No acute findings. Heart: normal!") == ["no", "acute", "findings", "heart", "normal"]


def test_corpus_bleu_hand_computed():
    refs = [["a", "b", "c", "d"], ["a", "b", "c", "e", "f"]]
    hyps = [["a", "b", "c", "d"], ["a", "b", "x", "e", "f"]]
    # clipped n-gram matches summed over the corpus (4+4)/(4+5), (3+2)/(3+4), (2+0)/(2+3),
    # (1+0)/(1+2); lengths 9 vs 9, so no brevity penalty
    p = [8 / 9, 5 / 7, 2 / 5, 1 / 3]
    b = corpus_bleu_n(refs, hyps)
    for n in range(1, 5):
        assert b[f"bleu_{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n))


def test_rouge_l_hand_computed():
    # LCS("a b c d", "a c d") = 3: P = 1, R = 3/4, F = 6/7
    assert rouge_l(["a b c d"], ["a c d"]) == [pytest.approx(6 / 7)]


def test_meteor_with_stub_wordnet():
    # identical 4 words: P = R = 1, one chunk: penalty 0.5 * (1/4)^3
    assert meteor([["heart", "size", "is", "normal"]], [["heart", "size", "is", "normal"]],
                  NoSynonyms()) == [pytest.approx(1 - 0.5 * 0.25 ** 3)]


def test_missing_wordnet_gives_null_meteor_and_a_note(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(report, "SYSTEM_WORDNET_DIRS", ())
    assert find_wordnet(None) is None
    res = score_reports(joined_reports([("the heart is normal", "the heart is normal")]))
    assert res["report"]["meteor"] is None
    assert any("meteor not computed" in n and "--nltk-data" in n for n in res["notes"])
    assert res["report"]["bleu_1"] == pytest.approx(100.0)
    assert res["report"]["rouge_l"] == pytest.approx(100.0)
    assert res["report"]["bertscore_f1"] is None


def test_system_wordnet_is_copied_into_nltk_layout(tmp_path):
    src = tmp_path / "usr_share_wordnet"
    src.mkdir()
    for f in report._WORDNET_FILES:
        (src / f).write_text(f"content of {f}\n")
    assert report.system_wordnet_as_nltk_data(tmp_path / "none", sources=(tmp_path / "empty",)) is None
    root = report.system_wordnet_as_nltk_data(tmp_path / "cache", sources=(src,))
    dest = root / "corpora" / "wordnet"
    assert (dest / "data.noun").read_text() == "content of data.noun\n"
    lex = (dest / "lexnames").read_text().splitlines()
    assert len(lex) == 45
    assert lex[0] == "00\tadj.all\t3" and lex[3] == "03\tnoun.Tops\t1" and lex[44] == "44\tadj.ppl\t3"
    (src / "data.noun").write_text("changed")
    assert report.system_wordnet_as_nltk_data(tmp_path / "cache", sources=(src,)) == root  # reused
    assert (dest / "data.noun").read_text() == "content of data.noun\n"


@pytest.mark.skipif(not all((d / "index.sense").is_file() for d in report.SYSTEM_WORDNET_DIRS),
                    reason="system WordNet (Debian wordnet-base + wordnet-sense-index) not installed")
def test_meteor_with_real_wordnet_matches_synonyms(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    wn = find_wordnet(None)
    assert wn is not None
    ref, hyp = [["the", "patient", "is", "ill"]], [["the", "patient", "is", "sick"]]
    # nltk matches synonyms after stemming; "sick"/"ill" survive the Porter stemmer
    assert meteor(ref, hyp, wn) == [pytest.approx(1 - 0.5 * 0.25 ** 3)]      # 4 matches, 1 chunk
    assert meteor(ref, hyp, NoSynonyms()) == [pytest.approx(0.75 * (1 - 0.5 / 27))]  # 3 matches


def test_nltk_data_must_be_a_directory(tmp_path):
    with pytest.raises(MedAlignError, match="--nltk-data"):
        find_wordnet(tmp_path / "nope")


def test_score_reports_missing_prediction_counts_as_empty():
    res = score_reports(joined_reports([("heart normal", "heart normal"), ("lungs clear", None)]),
                        wordnet=NoSynonyms())
    assert res["num_reports"] == 2
    assert res["report"]["rouge_l"] == pytest.approx(50.0)
    assert res["report"]["meteor"] == pytest.approx(100 * (1 - 0.5 * 0.5 ** 3) / 2)


# ------------------------------------------------------------------ BERTScore
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(d)
    return d


def reference_bertscore(cand, ref, tok, model, layer):
    """Straightforward per-token loops over the hidden states, for comparison."""

    def vecs(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc, output_hidden_states=True).hidden_states[layer][0]
        return [h[i] / h[i].norm() for i in range(1, h.shape[0] - 1)]  # drop [CLS] and [SEP]

    c, r = vecs(cand), vecs(ref)
    p = sum(max(float(x @ y) for y in r) for x in c) / len(c)
    rr = sum(max(float(x @ y) for x in c) for y in r) / len(r)
    return 2 * p * rr / (p + rr)


def test_bertscore_matches_direct_computation(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    cands = ["the heart is normal size", "small left pleural effusion", "no acute findings"]
    refs = ["the heart is normal", "small right pleural effusion", "no acute findings"]
    for layer in (1, 2):
        res = bertscore(cands, refs, BertScoreConfig(model_dir=tiny_bert, layer=layer, batch_size=2))
        assert res["layer"] == layer
        for i, (c, r) in enumerate(zip(cands, refs)):
            assert res["per_pair_f1"][i] == pytest.approx(reference_bertscore(c, r, tok, model, layer), abs=1e-5)
        assert res["per_pair_f1"][2] == pytest.approx(1.0, abs=1e-6)  # identical texts
    assert bertscore(["x"], ["y"], BertScoreConfig(model_dir=tiny_bert))["layer"] == 2  # default: last


def test_bertscore_errors(tiny_bert, tmp_path):
    with pytest.raises(MedAlignError, match="out of range"):
        bertscore(["a"], ["b"], BertScoreConfig(model_dir=tiny_bert, layer=3))
    with pytest.raises(MedAlignError, match="not a directory"):
        bertscore(["a"], ["b"], BertScoreConfig(model_dir=tmp_path / "missing"))
    with pytest.raises(MedAlignError, match="cannot load"):
        bertscore(["a"], ["b"], BertScoreConfig(model_dir=tmp_path))
