"""RaTEScore's text side: the sentence splitter and the IOB decoders that turn NER labels into entities.

RaTEScore 0.5.0 (``RaTEScore/utils.py``) splits each report into sentences with medspacy's PyRuSH
sentencizer, keeps a sentence (``str(sent).strip()``) unless it has no words or is shorter than 3
characters, runs the NER per sentence and decodes its IOB labels with ``post_process``. Here:

- :func:`make_splitter` gives medspacy's PyRuSH splitter when medspacy is installed (an optional
  extra: it pulls in spaCy) and otherwise :func:`split_rules`, a small documented rule-based splitter;
  the name of the one used is recorded in the scorer's output.
- :func:`decode_package` is ``post_process``'s state machine as 0.5.0 runs it (the ``medheval``
  block); :func:`decode_strict` is the same reading of the labels without its bug (the ``strict``
  block). They differ in one case only, see :func:`decode_package`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from shared.errors import MedAlignError

#: End of a sentence: a run of . ! ? (with closing quotes/brackets), whitespace, then a capital,
#: a digit or an opening bracket/quote. A lower-case word after the period ("e.g. none",
#: "L. lung") continues the sentence, as no whitespace does ("3.5 cm", "size.The").
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9(\[\"'])")
#: A list marker ("1.", "2)") is the start of the sentence that follows it, not a sentence.
_LIST_MARKER = re.compile(r"\d{1,2}[.)]")


def split_rules(text: str) -> list[str]:
    """Sentences of ``text`` by punctuation rules (the fallback when medspacy is absent).

    A sentence ends after ``.``, ``!`` or ``?`` followed by whitespace and a capital letter, a
    digit or an opening bracket/quote; a bare list marker ("1.") is joined to the sentence after it.
    Line breaks alone do not end a sentence (PyRuSH keeps "no effusion\\n\\nno pneumothorax"
    together too). Where PyRuSH differs: it also ends sentences at some line breaks and section
    headers by its own rules, and both split "Dr. Smith"."""
    pieces = [p.strip() for p in _BOUNDARY.split(text)]
    out: list[str] = []
    carry = ""
    for piece in pieces:
        if not piece:
            continue
        piece = f"{carry} {piece}" if carry else piece
        carry = ""
        if _LIST_MARKER.fullmatch(piece):
            carry = piece
            continue
        out.append(piece)
    if carry:
        out.append(carry)
    return out


def keep_sentences(sentences: list[str]) -> list[str]:
    """RaTEScore's filter: strip each sentence; drop it if it has no words or < 3 characters."""
    kept = []
    for sent in sentences:
        sent = str(sent).strip()
        if len(sent.split()) == 0 or len(sent) < 3:
            continue
        kept.append(sent)
    return kept


def medspacy_available() -> bool:
    """Whether medspacy can be imported (then ``splitter="auto"`` uses it)."""
    import importlib.util

    return importlib.util.find_spec("medspacy") is not None


def make_splitter(kind: str = "auto") -> tuple[str, Callable[[str], list[str]]]:
    """``(name, split)`` for ``kind`` = ``"auto"`` (medspacy when installed, else rules),
    ``"medspacy"`` or ``"rules"``; ``split(text)`` returns the raw sentences (not yet filtered).

    The medspacy pipeline is the package's: ``medspacy.load`` with PyRuSH enabled (0.5.0's
    ``utils.py`` also asks for "medspacy_conte", a misspelt name medspacy ignores; ConText does not
    change sentence boundaries)."""
    if kind not in ("auto", "medspacy", "rules"):
        raise MedAlignError(f"RaTEScore splitter must be auto, medspacy or rules, got {kind!r}")
    if kind == "rules" or (kind == "auto" and not medspacy_available()):
        return "rules", split_rules
    try:
        import medspacy
    except ImportError as e:
        raise MedAlignError(f"RaTEScore splitter 'medspacy' asked for but medspacy cannot be "
                            f"imported ({e}); install it or use the rule-based splitter") from None
    nlp = medspacy.load(medspacy_enable=["medspacy_pyrush"])

    def split_medspacy(text: str) -> list[str]:
        return [str(s) for s in nlp(text).sents]

    return "medspacy", split_medspacy


Span = tuple[int, int, str]
"""An entity: first and last token index (inclusive) and its type (the label without B-/I-)."""


def decode_package(tokens: list[str], labels: list[str]) -> list[Span]:
    """Entities as RaTEScore 0.5.0's ``post_process`` finds them (the ``medheval`` block).

    ``tokens`` are one sentence's tokens with ``[CLS]``/``[SEP]``, ``labels`` the argmax label of
    each. Each token's action depends on the next token's label, the last word's on the label the
    model gives ``[SEP]``. An entity starts at ``B-T`` (type T), runs over ``I-*`` and ends before
    ``O`` or ``B-``; ``I-`` without a ``B-`` is dropped. The bug: a ``B-`` followed by ``B-``, or an
    ``I-`` followed by ``B-``, leaves ``end`` set, and an entity still open at the end of the
    sentence (``[SEP]`` labelled ``I-``) is then dropped instead of closed at the last token."""
    spans: list[Span] = []
    start = end = None
    etype = None
    n = len(labels)
    for i, (token, label) in enumerate(zip(tokens, labels[:len(tokens)])):
        if token in ("[CLS]", "[SEP]"):
            continue
        if label == "O" or i >= n - 1:
            continue
        nxt = labels[i + 1]
        if label.startswith("B-") and nxt.startswith("I-"):
            start, etype = i, label[2:]
        elif label.startswith("B-") and nxt.startswith("B-"):
            start = end = i
            spans.append((start, end, label[2:]))
            start, etype = i, label[2:]
        elif label.startswith("B-") and nxt.startswith("O"):
            spans.append((i, i, label[2:]))
            start = end = etype = None
        elif label.startswith("I-") and nxt.startswith("B-"):
            end = i
            if start is not None:
                spans.append((start, end, etype))
            start, etype = i, label[2:]
        elif label.startswith("I-") and nxt.startswith("O"):
            end = i
            if start is not None:
                spans.append((start, end, etype))
            start = end = etype = None
    if start is not None and end is None:
        spans.append((start, len(tokens) - 2, etype))
    return spans


def decode_strict(labels: list[str], special: list[bool]) -> list[Span]:
    """Entities with the package's reading of the labels and without its bug (``strict`` block).

    Special tokens (``special[i]``) are skipped and their labels ignored. An entity starts at
    ``B-T`` (type T), runs over the ``I-*`` tokens after it and ends before ``O``, ``B-``, a special
    token or the end; ``I-`` without a ``B-`` before it is dropped, as in the package."""
    spans: list[Span] = []
    start: int | None = None
    etype = ""
    last = -1
    for i, (label, is_special) in enumerate(zip(labels, special)):
        cont = not is_special and label.startswith("I-")
        if start is not None and not cont:
            spans.append((start, last, etype))
            start = None
        if is_special:
            continue
        if label.startswith("B-"):
            start, etype = i, label[2:]
        last = i
    if start is not None:
        spans.append((start, last, etype))
    return spans
