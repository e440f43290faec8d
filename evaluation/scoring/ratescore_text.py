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

#: A run of whitespace: the candidate sentence boundaries.
_GAP = re.compile(r"\s+")
#: Sentence-final punctuation attached to a word, then closing quotes/brackets, at the end.
_END = re.compile(r"(\S*?)[.!?]+[\"')\]]*$")
#: Abbreviations after which a lower-case word continues the sentence ("e.g. none", "dr. smith").
_ABBREVIATIONS = frozenset({"e.g", "i.e", "dr", "mr", "mrs", "ms"})
#: A list marker ("1.", "2)") is the start of the sentence that follows it, not a sentence.
_LIST_MARKER = re.compile(r"\d{1,2}[.)]")


def _ends_sentence(before: str, gap: str, after: str) -> bool:
    if not after:
        return False
    if "\n" in gap and (after.isupper() or after.isdigit()):
        return True
    last = before.rsplit(None, 1)[-1] if before.strip() else ""
    m = _END.fullmatch(last)
    if m is None or not m.group(1):  # no final punctuation, or punctuation alone (" . ", "? x")
        return False
    if after.isupper() or after.isdigit() or after in "([\"'":
        return True
    word = m.group(1).lower()
    return after.islower() and not (len(word) == 1 or word.isdigit() or word in _ABBREVIATIONS)


def split_rules(text: str) -> list[str]:
    """Sentences of ``text`` by punctuation rules (the fallback when medspacy is absent), written to
    agree with PyRuSH on report text. A sentence ends at whitespace that follows ``.``, ``!`` or
    ``?`` attached to a word (closing quotes/brackets may follow) when the next character is
    - a capital, a digit or an opening bracket/quote, or
    - a lower-case letter, unless the word before the period is a single letter ("l. lung"), a
      number ("since 2010. there") or one of e.g., i.e., dr., mr., mrs., ms.;
    and at a line break followed by a capital or a digit. No whitespace, no boundary ("3.5 cm",
    "size.The"); a period standing alone (" . ", R2Gen-style text) ends nothing; a bare list marker
    ("1.") is joined to the sentence after it. Known differences from PyRuSH: it keeps some
    "?"/"!" sentences together, and splits or keeps a few abbreviations and numbers differently."""
    out: list[str] = []
    carry = ""
    start = 0
    for gap in _GAP.finditer(text):
        if not _ends_sentence(text[:gap.start()], gap.group(), text[gap.end():gap.end() + 1]):
            continue
        piece = text[start:gap.start()].strip()
        start = gap.end()
        piece = f"{carry} {piece}" if carry else piece
        carry = ""
        if _LIST_MARKER.fullmatch(piece):
            carry = piece
        elif piece:
            out.append(piece)
    piece = text[start:].strip()
    piece = f"{carry} {piece}".strip() if carry else piece
    if piece:
        out.append(piece)
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
