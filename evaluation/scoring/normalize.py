"""Text normalisation of the LLaVA-Med VQA evaluator, reproduced with its quirks.

Source (read, then re-written): microsoft/LLaVA-Med, ``llava/eval/eval_metrics/glossary.py``
(``normalize_word``, ``contractions``, ``manual_map``, ``articles``, ``punct``) and
``llava/eval/eval_metrics/utils.py`` (``split_sentence``). These are the VQA-v2 evaluation
rules as adapted there. The behaviour reproduced here, including what looks like bugs:

* Punctuation: for each character of :data:`PUNCT` (note: no ``.``, ``:``, ``'``, ``%``, ``*``),
  if it occurs next to a space anywhere in the *original* text, or the text contains a
  digit-comma-digit group anywhere (``1,000``), every occurrence is deleted; otherwise every
  occurrence is replaced by a space. So ``"left/right"`` -> ``"left right"`` but
  ``"left/right or up /down"`` -> ``"leftright or up down"``.
* Periods: ``(?!<=\\d)(\\.)(?!\\d)`` (a mistyped look-behind that is really a look-ahead that
  always succeeds) removes every period not followed by a digit, so ``"3.5"`` keeps its period
  and ``"e.g."`` becomes ``"eg"``. The reference passes ``re.UNICODE`` (== 32) as the
  positional *count* argument of ``Pattern.sub``, so at most the first 32 such periods of a
  text are removed; the rest stay.
* Lower-casing, whitespace split, number words ``none/zero..ten`` -> ``0..10`` (so "none" becomes
  "0"), articles ``a/an/the`` dropped, then the contraction glossary (``dont`` -> ``don't``; its
  capitalised keys such as ``Im`` can never match lower-cased text; ``somebody'd`` maps to
  ``somebodyd``), then remaining commas removed.
"""

from __future__ import annotations

import re
from collections import Counter

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
"""The reference glossary's contraction map, key for key."""

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
PUNCT: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
                          "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_MAX_PERIODS = 32  # the reference's accidental count=re.UNICODE


def normalize_word(text: str) -> str:
    """Normalise an answer the way LLaVA-Med's ``normalize_word`` does (see module docstring).

    >>> normalize_word("Yes, there are two lesions.")
    'yes there are 2 lesions'
    """
    text = str(text)
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=_MAX_PERIODS)
    words = []
    for word in out.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    words = [CONTRACTIONS.get(w, w) for w in words]
    return " ".join(words).replace(",", "")


def normalize_answer(text: object) -> str:
    """What the evaluator compares: ``normalize_word(str(text).lower())``; None becomes ""."""
    return normalize_word("" if text is None else str(text).lower())


def word_counts(text: str) -> Counter[str]:
    """Unigram counts after lower-casing and whitespace split (the reference ``split_sentence(s, 1)``)."""
    return Counter(text.lower().split())
