"""LLaVA-Med answer normalisation, checked against hand-worked examples of its rules."""

import pytest

from evaluation.scoring.normalize import normalize_answer, normalize_word, word_counts


@pytest.mark.parametrize("text, expected", [
    ("yes, there are two lesions.", "yes there are 2 lesions"),     # comma next to a space: deleted
    ("left/right", "left right"),                                   # no space next to '/': -> space
    ("left/right or up /down", "leftright or up down"),             # one ' /' anywhere: all '/' deleted
    ("1,000 cells (approx)", "1000 cells approx"),                  # digit,digit: every punct deleted
    ("e.g. 3.5 mm.", "eg 3.5 mm"),                                  # period kept only before a digit
    ("ratio: 2", "ratio: 2"),                                       # ':' is not in the punct list
    ("the patient's an apple", "patient's apple"),                  # articles dropped, "'" kept
    ("none zero one ten eleven", "0 0 1 10 eleven"),                # number words
    ("dont isnt", "don't isn't"),                                   # contractions
    ("im", "im"),                                                   # glossary key is "Im": never matches
    ("somebody'd", "somebodyd"),                                    # glossary quirk kept
    ("a-b_c", "b c"),                                               # '-', '_' -> space, then "a" dropped
    ("", ""),
])
def test_normalize_word_rules(text, expected):
    assert normalize_word(text) == expected


def test_only_first_32_periods_are_removed():
    # the reference passes re.UNICODE (32) as Pattern.sub's count
    text = " ".join(["w."] * 40)
    assert normalize_word(text).split() == ["w"] * 32 + ["w."] * 8


def test_normalize_answer_lowercases_and_casts():
    assert normalize_answer("The Heart.") == "heart"
    assert normalize_answer(12) == "12"
    assert normalize_answer(None) == ""
    # number words are mapped only after lower-casing
    assert normalize_answer("Two") == "2"


def test_word_counts():
    assert word_counts(" Left left  lung ") == {"left": 2, "lung": 1}
