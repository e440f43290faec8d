"""RaTEScore by hand: the pair formula (0.5 rule, negation weight, type weights), the two IOB decoders
and the sentence splitter. No models: embeddings are written out so that the cosines are known."""

from __future__ import annotations

import random

import pytest
import torch

from evaluation.scoring.ratescore import TYPE_WEIGHTS, directional, pair_score
from evaluation.scoring.ratescore_text import (
    decode_package,
    decode_strict,
    keep_sentences,
    make_splitter,
    medspacy_available,
    split_rules,
)

ABN, NABN, DIS, NDIS, ANAT = "ABNORMALITY", "NON-ABNORMALITY", "DISEASE", "NON-DISEASE", "ANATOMY"
E = torch.tensor


@pytest.mark.parametrize("block", ["medheval", "strict"])
def test_no_entities_on_either_side_scores_one_half(block):
    one = E([[1.0, 0.0]])
    assert pair_score(None, [], one, [ABN], block=block) == 0.5
    assert pair_score(one, [ABN], None, [], block=block) == 0.5
    assert pair_score(None, [], None, [], block=block) == 0.5


def test_identical_entities_score_one():
    emb = E([[1.0, 2.0], [-3.0, 0.5]])
    assert pair_score(emb, [ABN, ANAT], emb.clone(), [ABN, ANAT]) == pytest.approx(1.0, abs=1e-6)


def test_negated_match_is_weighted_0_3612():
    # cos = 0.6 both ways; the type weight cancels (one entity), the negation weight stays.
    ref, hyp = E([[1.0, 0.0]]), E([[0.6, 0.8]])
    for a, b in [(ABN, NABN), (NABN, ABN), (DIS, NDIS), (NDIS, DIS), (ABN, NDIS), (NDIS, ABN),
                 (DIS, NABN), (NABN, DIS)]:
        assert pair_score(ref, [a], hyp, [b]) == pytest.approx(0.6 * 0.3612, abs=1e-7), (a, b)
    # Not a negation pair: no penalty.
    assert pair_score(ref, [ABN], hyp, [DIS]) == pytest.approx(0.6, abs=1e-7)
    assert pair_score(ref, [ANAT], hyp, [NABN]) == pytest.approx(0.6, abs=1e-7)


def test_type_weights_of_0_5_0_weigh_each_match():
    # ref: anatomy a = e1, disease d = e2; hyp: one anatomy c = e1.
    # ref -> hyp: a->c cos 1 weight W[ANATOMY, ANATOMY] = 0.2856134859160784,
    #             d->c cos 0 weight W[DISEASE, ANATOMY] = 0.9950209388542061
    # hyp -> ref: c->a cos 1 (weight cancels) = 1
    w_aa, w_da = 0.2856134859160784, 0.9950209388542061
    s = w_aa / (w_aa + w_da)
    ref, hyp = E([[1.0, 0.0], [0.0, 1.0]]), E([[2.0, 0.0]])
    assert directional(ref, [ANAT, DIS], hyp, [ANAT]) == pytest.approx(s, abs=1e-12)
    assert directional(hyp, [ANAT], ref, [ANAT, DIS]) == pytest.approx(1.0, abs=1e-12)
    assert pair_score(ref, [ANAT, DIS], hyp, [ANAT]) == pytest.approx(2 * s / (s + 1), abs=1e-12)


def test_matrix_is_the_0_5_0_one_and_not_symmetric():
    assert len(TYPE_WEIGHTS) == 25
    assert TYPE_WEIGHTS[(DIS, ANAT)] == 0.9950209388542061
    assert TYPE_WEIGHTS[(ANAT, DIS)] == 0.4592143222158069
    assert TYPE_WEIGHTS[(NABN, NABN)] == 0.0009357166071730684


def test_orthogonal_entities_score_zero():
    assert pair_score(E([[1.0, 0.0]]), [ANAT], E([[0.0, 1.0]]), [ANAT]) == 0


def test_ties_medheval_uses_topk_strict_the_first():
    # Two hypothesis entities with the same vector and different types: which one matches decides
    # the weight. strict takes the first; medheval whatever torch.topk returns (the package's choice).
    ref = E([[1.0, 0.0]])
    hyp = E([[1.0, 0.0]] * 5)
    types = [ABN, NABN, DIS, NDIS, ANAT]
    first = directional(ref, [ABN], hyp, types, block="strict")
    assert first == pytest.approx(1.0)  # ABN -> ABN, no negation
    idx = int(torch.topk(torch.matmul(hyp, ref[0]), 1).indices[0])
    expect = 0.3612 if types[idx] in (NABN, NDIS) else 1.0
    assert directional(ref, [ABN], hyp, types, block="medheval") == pytest.approx(expect)


# --- the IOB decoders -------------------------------------------------------------------------


def _tokens(n):
    return ["[CLS]"] + [f"t{i}" for i in range(1, n + 1)] + ["[SEP]"]


def test_decoders_agree_on_a_plain_sentence():
    labels = ["O", "B-ABNORMALITY", "I-ABNORMALITY", "O", "B-ANATOMY", "I-DISEASE", "I-ANATOMY",
              "O", "I-DISEASE", "O", "O"]
    toks = _tokens(9)
    expect = [(1, 2, ABN), (4, 6, ANAT)]  # type from the B-; the I- without a B- is dropped
    assert decode_package(toks, labels) == expect
    assert decode_strict(labels, [t in ("[CLS]", "[SEP]") for t in toks]) == expect


def test_package_drops_the_last_entity_after_a_stale_end():
    # B-ABN I-ABN B-ANAT I-ANAT, [SEP] labelled I-: the I->B transition left `end` set, so 0.5.0
    # drops the ANATOMY entity that runs to the end; strict closes it at the last token.
    toks = _tokens(4)
    special = [True, False, False, False, False, True]
    labels = ["O", "B-ABNORMALITY", "I-ABNORMALITY", "B-ANATOMY", "I-ANATOMY", "I-ANATOMY"]
    assert decode_package(toks, labels) == [(1, 2, ABN)]
    assert decode_strict(labels, special) == [(1, 2, ABN), (3, 4, ANAT)]
    # Same labels with [SEP] labelled O: both close it.
    labels[-1] = "O"
    assert decode_package(toks, labels) == decode_strict(labels, special) == [(1, 2, ABN), (3, 4, ANAT)]
    # Without an earlier B-/I- -> B- transition the open entity is closed by the package too.
    labels = ["O", "O", "B-DISEASE", "I-DISEASE", "I-DISEASE", "I-DISEASE"]
    assert decode_package(toks, labels) == decode_strict(labels, special) == [(2, 4, DIS)]


def test_single_token_entities_and_adjacent_b_labels():
    toks = _tokens(3)
    labels = ["B-DISEASE", "B-ANATOMY", "B-ANATOMY", "B-DISEASE", "O"]
    expect = [(1, 1, ANAT), (2, 2, ANAT), (3, 3, DIS)]
    assert decode_package(toks, labels) == expect
    assert decode_strict(labels, [True, False, False, False, True]) == expect


def test_decoders_differ_only_by_the_stale_end_bug_on_random_labels():
    rng = random.Random(0)
    names = ["O", "B-ABNORMALITY", "I-ABNORMALITY", "B-ANATOMY", "I-ANATOMY", "I-DISEASE"]
    differ = 0
    for _ in range(3000):
        n = rng.randint(1, 8)
        toks = _tokens(n)
        labels = [rng.choice(names) for _ in toks]
        special = [i in (0, n + 1) for i in range(n + 2)]
        pkg, strict = decode_package(toks, labels), decode_strict(labels, special)
        if pkg != strict:
            differ += 1
            # strict has one more entity, the one reaching the last token, with [SEP] labelled I-.
            assert labels[-1].startswith("I-") and strict[:-1] == pkg and strict[-1][1] == n
    assert differ > 0


# --- sentences ------------------------------------------------------------------------------


def test_rule_splitter_on_report_text():
    text = ("No acute cardiopulmonary process. Heart size is normal.\nLungs are clear. "
            "1. No pneumothorax. 2. Mild effusion, e.g. small. Stable 3.5 cm nodule.The end")
    assert split_rules(text) == [
        "No acute cardiopulmonary process.", "Heart size is normal.", "Lungs are clear.",
        "1. No pneumothorax.", "2. Mild effusion, e.g. small.", "Stable 3.5 cm nodule.The end"]
    # Lower-case text (as PyRuSH splits it): not after a single letter, a number or e.g./dr.
    assert split_rules("limits. no consolidation. the l. lung. since 2010. there is dr. smith.") == [
        "limits.", "no consolidation.", "the l. lung.", "since 2010. there is dr. smith."]
    # Line breaks end a sentence before a capital; a period standing alone ends nothing.
    assert split_rules("FINDINGS:\nHeart normal\nLungs clear") == ["FINDINGS:", "Heart normal", "Lungs clear"]
    assert split_rules("no effusion\n\nno pneumothorax") == ["no effusion\n\nno pneumothorax"]
    assert split_rules("the heart is normal . the lungs are clear .") == [
        "the heart is normal . the lungs are clear ."]
    assert split_rules("? pneumonia. Left effusion (small). Right: clear.") == [
        "? pneumonia.", "Left effusion (small).", "Right: clear."]
    assert split_rules("") == [] and split_rules("   ") == []


@pytest.mark.skipif(not medspacy_available(), reason="medspacy not installed (optional extra)")
def test_medspacy_splitter_is_used_when_installed():
    name, split = make_splitter("auto")
    assert name == "medspacy"
    text = "No acute process. Heart size is normal.\nLungs are clear. 1. No pneumothorax."
    assert keep_sentences(split(text)) == keep_sentences(split_rules(text))


def test_sentence_filter_drops_wordless_and_short_sentences():
    assert keep_sentences(["  ok ", "\n", "abc", " . . ", "No."]) == ["abc", ". .", "No."]


def test_splitter_choice_is_named(monkeypatch):
    assert make_splitter("rules")[0] == "rules"
    import evaluation.scoring.ratescore_text as text

    monkeypatch.setattr(text, "medspacy_available", lambda: False)
    assert text.make_splitter("auto")[0] == "rules"
    with pytest.raises(Exception, match="splitter"):
        make_splitter("spacy")
