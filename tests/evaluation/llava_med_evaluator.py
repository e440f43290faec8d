"""Test oracle: a literal transcription of the LLaVA-Med VQA evaluator as MedAlign ships it.

Followed line by line (the logic, not the I/O) from Aofei-Chang/MedAlign at commit fbefd17
("add eval metrics and transformers"):

* ``llava-med-1.5/llava/eval/run_eval.py``: ``evaluate(gt, pred, candidate, criterion=None)`` and
  the ``__main__`` block's id check (``assert gt_ids == pred_ids``);
* ``llava-med-1.5/llava/eval/eval_metrics/evaluate_metrics.py``: ``calculate_exactmatch``,
  ``calculate_f1score`` (the only helpers ``evaluate`` calls; ``bleu`` and
  ``calculate_appearance_with_normalization`` are imported there but unused);
* ``llava-med-1.5/llava/eval/eval_metrics/utils.py``: ``split_sentence``;
* ``llava-med-1.5/llava/eval/eval_metrics/glossary.py``: ``normalize_word`` with ``contractions``,
  ``manual_map``, ``articles``, ``period_strip``, ``comma_strip``, ``punct``;
* BLEU is nltk's ``sentence_bleu``, called exactly as ``evaluate`` calls it.

This is MedAlign's variant of ``run_eval.py``, the one our ``llava_med`` block claims: every CLOSED
question appends a 1 or a 0 to ``closed_scores['hit']`` (a 0 also when the prediction has
"yes"/"no" but not the answer),
``num_open``/``num_close`` are counted per answer type (the line that swapped them is commented
out there), and there is no candidate-set "open accuracy". Upstream microsoft/LLaVA-Med
(``llava/eval/run_eval.py`` at ad758b6) differs: its closed branch appends a 1 when the prediction
contains "yes"/"no" and the answer, a 0 when it contains neither "yes" nor "no", and *nothing*
when it contains "yes"/"no" but not the answer, so those misses leave the denominator; it also
sets ``num_open, num_close = len(closed hits), len(open hits)`` (swapped) and needs a candidate file.

Differences from the reference file, all outside the arithmetic:

* ``evaluate`` returns a dict of the printed rows (``tabulate`` is not used; the values are the
  same ``x * 100`` floats) plus ``num_open``/``num_close``, instead of a formatted table.
* The reference mutates the ground-truth records (``gt_item['answer_type'] = 'CLOSED'`` when it
  is missing); the transcription does the same on a shallow copy so callers' lists stay intact.
* ``except KeyError`` where the reference has a bare ``except:`` around ``gt_item['conversations']``.
* nltk's warnings are silenced with ``warnings.catch_warnings`` instead of the reference's global
  ``warnings.simplefilter('ignore')``.

Independent of the scorer under test (``evaluation.scoring``): nothing is imported from it.
"""

from __future__ import annotations

import collections
import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

from nltk.translate.bleu_score import sentence_bleu

# --------------------------------------------------------------------------- glossary.py
contractions = {
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

manual_map = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
articles = ["a", "an", "the"]
period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)")
comma_strip = re.compile(r"(\d)(\,)(\d)")
punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!"]


def normalize_word(token):
    _token = token
    for p in punct:
        if (p + " " in token or " " + p in token) or (
            re.search(comma_strip, token) != None  # noqa: E711 (as in the reference)
        ):
            _token = _token.replace(p, "")
        else:
            _token = _token.replace(p, " ")
    # the reference passes re.UNICODE as the positional *count* argument; kept as written
    token = period_strip.sub("", _token, re.UNICODE)

    _token = []
    temp = token.lower().split()
    for word in temp:
        # setdefault inserts word -> word into manual_map: an identity entry, so lookups of
        # later words are unchanged (as in the reference)
        word = manual_map.setdefault(word, word)
        if word not in articles:
            _token.append(word)
    for i, word in enumerate(_token):
        if word in contractions:
            _token[i] = contractions[word]
    token = " ".join(_token)
    token = token.replace(",", "")
    return token


# --------------------------------------------------------------------------- utils.py
def split_sentence(sentence, n):
    words = defaultdict(int)
    # tmp_sentence = re.sub("[^a-zA-Z ]", "", sentence)
    tmp_sentence = sentence
    tmp_sentence = tmp_sentence.lower()
    tmp_sentence = tmp_sentence.strip().split()
    length = len(tmp_sentence)
    for i in range(length - n + 1):
        tmp_words = " ".join(tmp_sentence[i: i + n])
        if tmp_words:
            words[tmp_words] += 1
    return words


# --------------------------------------------------------------------------- evaluate_metrics.py
def calculate_exactmatch(candidate, reference):

    candidate = normalize_word(candidate)
    reference = normalize_word(reference)

    candidate_words = split_sentence(candidate, 1)
    reference_words = split_sentence(reference, 1)
    count = 0
    total = 0
    for word in reference_words:
        if word in candidate_words:
            count += 1
    for word in candidate_words:
        total += candidate_words[word]

    if total == 0:
        return 0  # "0 (warning: length of candidate's words is 0)"
    else:
        return count / total


def calculate_f1score(candidate, reference):

    candidate = normalize_word(candidate)
    reference = normalize_word(reference)

    candidate_words = split_sentence(candidate, 1)
    reference_words = split_sentence(reference, 1)
    word_set = set()
    for word in candidate_words:
        word_set.add(word)
    for word in reference_words:
        word_set.add(word)

    tp = 0
    fp = 0
    fn = 0
    for word in word_set:
        if word in candidate_words and word in reference_words:
            tp += candidate_words[word]
        elif word in candidate_words and word not in reference_words:
            fp += candidate_words[word]
        elif word not in candidate_words and word in reference_words:
            fn += reference_words[word]

    if len(candidate_words) == 0:
        return 0, 0, 0  # "0 (warning: length of candidate's words is 0)"
    elif len(reference_words) == 0:
        return 0, 0, 0
    else:
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        if tp == 0:
            return 0, 0, 0
        else:
            return 2 * precision * recall / (precision + recall), precision, recall


# --------------------------------------------------------------------------- run_eval.py
def load_jsonl(path):
    data = []
    with open(path, "r", encoding="utf-8") as reader:
        for line in reader:
            data.append(json.loads(line))
    return data


def evaluate(gt, pred, candidate=None, criterion=None):
    closed_scores = collections.defaultdict(list)
    bleu_scores = collections.defaultdict(list)
    exact_scores = collections.defaultdict(list)
    f1_scores = collections.defaultdict(list)
    num_close, num_open = 0, 0
    for gt_item, pred_item in zip(gt, pred):
        gt_item = dict(gt_item)  # the reference mutates the caller's record; this copy does not
        try:
            gt_results = gt_item["conversations"]
        except KeyError:
            gt_results = gt_item["conversatons"]
        gt_value = gt_results[1]["value"].lower()
        pred_value = pred_item["text"].lower()

        gt_value = normalize_word(gt_value)
        pred_value = normalize_word(pred_value)

        if gt_item.get("answer_type") is None:
            # for open-ended question
            gt_item["answer_type"] = "CLOSED"

        if gt_item["answer_type"] == "OPEN":
            num_open += 1

            exact_scores["hit"].append(calculate_exactmatch(pred_value, gt_value))
            exact_scores["q_id"].append(pred_item["question_id"])

            f1_score, precision, recall = calculate_f1score(pred_value, gt_value)
            f1_scores["f1"].append(f1_score)
            f1_scores["precision"].append(precision)
            f1_scores["recall"].append(recall)
            f1_scores["q_id"].append(pred_item["question_id"])

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b_score = sentence_bleu(references=[str(gt_value).lower().split()],
                                        hypothesis=str(pred_value).lower().split())
                b_score_1 = sentence_bleu(references=[str(gt_value).lower().split()],
                                          hypothesis=str(pred_value).lower().split(), weights=(1, 0, 0, 0))
                b_score_2 = sentence_bleu(references=[str(gt_value).lower().split()],
                                          hypothesis=str(pred_value).lower().split(), weights=(0, 1, 0, 0))
                b_score_3 = sentence_bleu(references=[str(gt_value).lower().split()],
                                          hypothesis=str(pred_value).lower().split(), weights=(0, 0, 1, 0))

            bleu_scores["q_id"].append(pred_item["question_id"])
            bleu_scores["bleu_score"].append(b_score)
            bleu_scores["bleu_score_1"].append(b_score_1)
            bleu_scores["bleu_score_2"].append(b_score_2)
            bleu_scores["bleu_score_3"].append(b_score_3)

        elif gt_item["answer_type"] == "CLOSED":
            # for close-ended question (Yes/No)
            num_close += 1
            closed_scores["q_id"].append(pred_item["question_id"])
            if "yes" in pred_value or "no" in pred_value:
                if gt_value in pred_value:
                    closed_scores["hit"].append(1)
                else:
                    closed_scores["hit"].append(0)
            else:
                closed_scores["hit"].append(0)

    exact_score, f1_score, precision, recall, bleu_score, bleu_score_1, bleu_score_2, bleu_score_3 = [0] * 8
    if num_open != 0:
        exact_score = sum(exact_scores["hit"]) / len(exact_scores["hit"])
        f1_score = sum(f1_scores["f1"]) / len(f1_scores["f1"])
        precision = sum(f1_scores["precision"]) / len(f1_scores["precision"])
        recall = sum(f1_scores["recall"]) / len(f1_scores["recall"])

        bleu_score = sum(bleu_scores["bleu_score"]) / len(bleu_scores["bleu_score"])
        bleu_score_1 = sum(bleu_scores["bleu_score_1"]) / len(bleu_scores["bleu_score_1"])
        bleu_score_2 = sum(bleu_scores["bleu_score_2"]) / len(bleu_scores["bleu_score_2"])
        bleu_score_3 = sum(bleu_scores["bleu_score_3"]) / len(bleu_scores["bleu_score_3"])

    closed_score = sum(closed_scores["hit"]) / len(closed_scores["hit"]) if len(closed_scores["hit"]) != 0 else 0.0

    # the reference prints these two and then tabulates the rows below (each value * 100)
    return {
        "exact match score": exact_score * 100,
        "f1 score": f1_score * 100,
        "precision": precision * 100,
        "recall": recall * 100,
        "bleu_score": bleu_score * 100,
        "bleu_score_1": bleu_score_1 * 100,
        "bleu_score_2": bleu_score_2 * 100,
        "bleu_score_3": bleu_score_3 * 100,
        "yes/no accuracy": closed_score * 100,
        "num_open": num_open,
        "num_close": num_close,
    }


def evaluate_files(gt_path: str | Path, pred_path: str | Path) -> dict:
    """The reference's ``__main__`` for the non-MC case: load, require the same id order, evaluate."""
    gt = json.load(open(gt_path, "r"))
    pred = load_jsonl(pred_path)
    gt_ids = [item["id"] for item in gt]
    pred_ids = [item["question_id"] for item in pred]
    assert gt_ids == pred_ids, "please make sure pred and gt are exactly matched"
    return evaluate(gt, pred, candidate=None)
