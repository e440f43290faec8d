"""Report scoring: the authors' cleaning and pairing, the lexical metrics with their settings
(hand-computed), the NLTK data lookups, and the two blocks end to end without models."""

import math

import pytest

from evaluation.scoring import nltk_data
from evaluation.scoring.join import Prediction, join_by_id
from evaluation.scoring.lexical import lexical_scores, meteor, rouge, sentence_bleu4
from evaluation.scoring.nltk_data import (
    PUNKT_TRAINED,
    PUNKT_UNTRAINED,
    find_wordnet,
    word_tokenizer,
)
from evaluation.scoring.report import MEDHEVAL_KEYS, score_reports
from evaluation.scoring.report_pairs import (
    NO_REPORT,
    PairingError,
    line_pairs,
    medheval_strip,
    run_eval_clean,
    strict_clean,
    strict_pairs,
    study_id,
    study_id_pairs,
)
from shared.errors import MedAlignError


class NoSynonyms:
    """WordNet stand-in: METEOR then matches exact words and Porter stems only."""

    def synsets(self, *args, **kwargs):
        return []


def rec(i, report, **extra):
    return {"id": i, "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                       {"from": "gpt", "value": report}], **extra}


def preds_of(*pairs):
    return [Prediction(str(q), t, n + 1) for n, (q, t) in enumerate(pairs)]


def split(text):
    return text.split()


# ------------------------------------------------------------------ cleaning and pairing
def test_strip_assistant_strips_characters_not_a_prefix():
    assert medheval_strip("No acute effusion") == "No acute effusio"       # trailing n
    assert medheval_strip("Assistant: An opacity.") == " An opacity."      # stops at the space
    assert medheval_strip("An opacity.") == " opacity."                    # "A", "n" stripped
    assert strict_clean("Assistant: An opacity.") == "An opacity."
    assert strict_clean("  No acute effusion ") == "No acute effusion"
    assert strict_clean("Assistant:Assistant: x") == "Assistant: x"         # one prefix only


def test_run_eval_cleaning_rules():
    assert run_eval_clean("Atelectasis") == NO_REPORT        # strip leaves "elec" (< 10 chars)
    assert run_eval_clean("Normal.") == NO_REPORT
    assert run_eval_clean("Assistant:") == "Assistant:"      # empty after strip -> raw, 10 chars
    assert run_eval_clean("tasis") == NO_REPORT              # empty -> raw "tasis" -> < 10
    assert run_eval_clean("Heart size is normal.") == "Heart size is normal."


def test_study_id_is_int_with_the_train_fallback():
    assert study_id("12") == 12 and study_id(7) == 7 and study_id(" 3 ") == 3
    assert study_id("train34") == 34
    with pytest.raises(PairingError, match="not an integer"):
        study_id("CXR2384_IM-0942")


def test_study_id_pairs_keep_shared_ids_sorted_and_use_answer_field():
    records = [rec(3, "gpt three", answer="answer three"), rec(1, "gpt one", answer="answer one"),
               rec(2, "gpt two")]
    preds = preds_of((2, "Pred two is long enough"), (3, "Short"), (5, "Extra prediction text"))
    p = study_id_pairs(records, preds)
    assert p.ids == ["2", "3"]
    assert p.hyps == ["Pred two is long enough", NO_REPORT]
    assert p.refs == ["gpt two", "answer three"]   # 'answer' first, as run_eval.py reads it
    assert any("1 ground-truth records have no 'answer'" in n for n in p.notes)
    assert any("2 ids on one side only" in n for n in p.notes)
    with pytest.raises(PairingError, match="study id 1"):
        study_id_pairs([rec("1", "a"), rec("01", "b")], [])


def test_line_pairs_pair_by_order_and_note_mismatches():
    records = [rec(1, "ref one"), rec(2, "ref two"), rec(3, "ref three")]
    p = line_pairs(records, preds_of((2, "Assistant: hyp two"), (1, "hyp one")))
    assert p.hyps == [" hyp two", "hyp one"] and p.refs == ["ref one", "ref two"]
    assert any("2 prediction lines and 3 ground-truth records" in n for n in p.notes)
    assert any("2 of 2 pairs have different ids" in n for n in p.notes)


def test_strict_pairs_by_id_missing_is_empty():
    records = [rec(1, " ref one "), rec(2, "ref two")]
    joined = join_by_id(records, {"2": Prediction("2", "Assistant: hyp two", 1)})
    p = strict_pairs(joined)
    assert p.ids == ["1", "2"] and p.hyps == ["", "hyp two"] and p.refs == ["ref one", "ref two"]


# ------------------------------------------------------------------ lexical metrics
def test_sentence_bleu4_method4_hand_computed():
    ref, hyp = ["a", "b", "c", "x", "e"], ["a", "b", "c", "d", "e"]
    # clipped n-gram precisions 4/5, 2/4, 1/3, 0/2; method 4 replaces the zero by
    # 1 / (2^1 * 5 / ln 5) / 2; equal lengths, no brevity penalty
    p4 = 1 / (2 * 5 / math.log(5)) / 2
    expect = math.exp((math.log(4 / 5) + math.log(2 / 4) + math.log(1 / 3) + math.log(p4)) / 4)
    assert sentence_bleu4(ref, hyp) == pytest.approx(expect, rel=1e-12)
    assert sentence_bleu4(ref, ref) == pytest.approx(1.0)
    assert sentence_bleu4(ref, []) == 0.0
    assert sentence_bleu4(["Heart"], ["heart"]) == 0.0        # case-sensitive


def test_rouge_precision_and_recall_swapped_as_the_reference():
    hyp, ref = "a b c", "a b c d e"
    true = rouge([hyp], [ref], swapped=False)
    assert true["rouge_1_precision"] == [1.0] and true["rouge_1_recall"] == [pytest.approx(0.6)]
    med = rouge([hyp], [ref], swapped=True)
    assert med["rouge_1_precision"] == [pytest.approx(0.6)] and med["rouge_1_recall"] == [1.0]
    assert med["rouge_1_f1"] == true["rouge_1_f1"] == [pytest.approx(0.75)]
    # bigrams ab bc of 4 reference bigrams; LCS 3
    assert true["rouge_2_recall"] == [pytest.approx(2 / 4)] and true["rouge_l_recall"] == [pytest.approx(0.6)]
    # stemming: effusions ~ effusion
    assert rouge(["pleural effusions"], ["pleural effusion"], swapped=False)["rouge_1_f1"] == [1.0]


def test_meteor_with_stub_wordnet():
    # identical 4 words: P = R = 1, one chunk: penalty 0.5 * (1/4)^3
    assert meteor([["heart", "size", "is", "normal"]], [["heart", "size", "is", "normal"]],
                  NoSynonyms()) == [pytest.approx(1 - 0.5 * 0.25 ** 3)]


def test_lexical_scores_means_and_meteor_absent():
    res = lexical_scores(["a b c", "x"], ["a b c d e", "x"], tokenize=split, wordnet=None,
                         swapped_rouge=False)
    assert res["mean"]["meteor"] is None and "meteor" not in res["per_report"]
    assert res["mean"]["rouge_1_f1"] == pytest.approx((0.75 + 1.0) / 2)
    # one word: method 4 smooths only when len > 1, and nltk skips the zero precisions: 1.0
    assert res["per_report"]["bleu"][1] == 1.0


# ------------------------------------------------------------------ NLTK data
def test_word_tokenizer_uses_a_punkt_model_when_found(tmp_path, monkeypatch):
    import nltk
    from nltk.tokenize import _get_punkt_tokenizer

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    tok, name = word_tokenizer(None)
    assert name == PUNKT_UNTRAINED
    assert tok("Seen by Dr. Smith. No effusion.") == ["Seen", "by", "Dr", ".", "Smith", ".", "No",
                                                      "effusion", "."]
    eng = tmp_path / "data" / "tokenizers" / "punkt_tab" / "english"
    eng.mkdir(parents=True)
    for f in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (eng / f).write_text("")
    (eng / "abbrev_types.txt").write_text("dr\n")
    _get_punkt_tokenizer.cache_clear()
    try:
        tok, name = word_tokenizer(tmp_path / "data")
        assert name == PUNKT_TRAINED
        assert tok("Seen by Dr. Smith. No effusion.") == ["Seen", "by", "Dr.", "Smith", ".", "No",
                                                          "effusion", "."]
    finally:
        _get_punkt_tokenizer.cache_clear()


def test_missing_wordnet_is_none_and_bad_dir_is_an_error(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk_data, "SYSTEM_WORDNET_DIRS", ())
    assert find_wordnet(None) is None
    with pytest.raises(MedAlignError, match="--nltk-data"):
        find_wordnet(tmp_path / "nope")


def test_system_wordnet_is_copied_into_nltk_layout(tmp_path):
    src = tmp_path / "usr_share_wordnet"
    src.mkdir()
    for f in nltk_data._WORDNET_FILES:
        (src / f).write_text(f"content of {f}\n")
    assert nltk_data.system_wordnet_as_nltk_data(tmp_path / "none", sources=(tmp_path / "e",)) is None
    root = nltk_data.system_wordnet_as_nltk_data(tmp_path / "cache", sources=(src,))
    dest = root / "corpora" / "wordnet"
    assert (dest / "data.noun").read_text() == "content of data.noun\n"
    lex = (dest / "lexnames").read_text().splitlines()
    assert len(lex) == 45
    assert lex[0] == "00\tadj.all\t3" and lex[3] == "03\tnoun.Tops\t1" and lex[44] == "44\tadj.ppl\t3"
    (src / "data.noun").write_text("changed")
    assert nltk_data.system_wordnet_as_nltk_data(tmp_path / "cache", sources=(src,)) == root
    assert (dest / "data.noun").read_text() == "content of data.noun\n"


# ------------------------------------------------------------------ both blocks
def test_two_blocks_differ_where_the_quirks_bite():
    records = [rec(1, "No acute effusion"), rec(2, "Heart size is normal")]
    preds = preds_of((1, "Assistant: No acute effusion"), (2, "Heart size is normal"))
    joined = join_by_id(records, {p.qid: p for p in preds})
    res = score_reports(records, preds, joined, tokenize=split, wordnet=NoSynonyms())
    med, strict = res["medheval"], res["strict"]
    assert list(med) == list(MEDHEVAL_KEYS) and res["units"] == "fraction"
    # medheval pair 1: " No acute effusio" vs "No acute effusion": 2 of 3 unigrams
    assert med["rouge_1_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert strict["rouge_1_f1"] == pytest.approx(1.0)
    # identical 3 words: no 4-gram, smoothed to 1 / (2 * 5 / ln 3); identical 4 words: 1
    assert strict["bleu"] == pytest.approx(((math.log(3) / 10) ** 0.25 + 1) / 2)
    assert med["semb_score"] is None and strict["ratescore"] is None
    assert any("semb_score not computed: pass --chexbert" in n for n in res["notes"])
    assert res["num_reports"] == 2 and res["num_line_pairs"] == 2 and res["num_id_pairs"] == 2


def test_non_integer_ids_leave_run_eval_metrics_null():
    records = [rec("CXR1_IM-1", "Heart size is normal")]
    preds = preds_of(("CXR1_IM-1", "Heart size is normal"))
    joined = join_by_id(records, {p.qid: p for p in preds})
    res = score_reports(records, preds, joined, tokenize=split, wordnet=NoSynonyms())
    assert res["num_id_pairs"] is None and res["strict"]["bleu"] == pytest.approx(1.0)
    assert any("semb_score and radgraph_combined not computed" in n for n in res["notes"])


def test_no_reports_gives_nulls():
    res = score_reports([], [], join_by_id([], {}), tokenize=split, wordnet=NoSynonyms())
    assert all(v is None for v in res["medheval"].values())
    assert res["num_reports"] == 0
