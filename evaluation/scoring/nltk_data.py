"""NLTK data that the report metrics need and nltk does not ship: WordNet (METEOR) and Punkt
(``word_tokenize``, for BLEU and METEOR), looked up locally, never downloaded.

* WordNet: looked up in ``--nltk-data DIR`` first, then ``$NLTK_DATA`` and nltk's default folders
  (``~/nltk_data``, ``<venv>/nltk_data``, ``/usr/share/nltk_data``, ...). Offline fallback:
  Debian/Ubuntu's ``wordnet-base`` + ``wordnet-sense-index`` packages install the same WordNet 3.0
  database in ``/usr/share/wordnet``; when present it is copied once into nltk's layout under
  ``$XDG_CACHE_HOME/medalign/nltk_data`` (default ``~/.cache/...``; nltk refuses symlinks out of
  its data folders) with the standard 45-line ``lexnames`` file that Debian does not ship.
* Punkt: ``nltk.word_tokenize`` first splits sentences with the trained English Punkt model
  (``tokenizers/punkt_tab/english``), then runs the Treebank word tokenizer on each sentence (so
  every sentence-final period becomes a token). When the model is not found,
  :func:`word_tokenizer` returns the same two steps with an *untrained* Punkt splitter (no English
  abbreviation list, so "e.g." or "Dr." may end a sentence where the trained model would not),
  and says so; the metrics record which one was used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from shared.errors import MedAlignError

WORDNET_HELP = ("provide it with --nltk-data DIR (a folder holding corpora/wordnet.zip or "
                "corpora/wordnet/) or the NLTK_DATA environment variable; on a machine with "
                "internet access: python -m nltk.downloader -d DIR wordnet")
PUNKT_HELP = ("put tokenizers/punkt_tab/english/ under --nltk-data DIR or NLTK_DATA (on a machine "
              "with internet access: python -m nltk.downloader -d DIR punkt_tab)")
PUNKT_TRAINED = "nltk word_tokenize (Punkt english model)"
PUNKT_UNTRAINED = "nltk Treebank words in untrained-Punkt sentences (approximation)"


def add_nltk_data(nltk_data: str | Path | None) -> None:
    """Put ``nltk_data`` (must be an existing folder) first on nltk's search path."""
    import nltk

    if nltk_data is None:
        return
    d = Path(nltk_data)
    if not d.is_dir():
        raise MedAlignError(f"--nltk-data: not a directory: {d}")
    if str(d) not in nltk.data.path:
        nltk.data.path.insert(0, str(d))


def word_tokenizer(nltk_data: str | Path | None = None) -> tuple[Callable[[str], list[str]], str]:
    """``(tokenize, name)``: nltk's ``word_tokenize`` when the English Punkt model is found, else
    the untrained-Punkt approximation (see the module docstring). ``name`` is one of
    :data:`PUNKT_TRAINED` / :data:`PUNKT_UNTRAINED`."""
    import nltk
    from nltk.tokenize import NLTKWordTokenizer, PunktSentenceTokenizer

    add_nltk_data(nltk_data)
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        sents, words = PunktSentenceTokenizer(), NLTKWordTokenizer()

        def approx(text: str) -> list[str]:
            return [t for s in sents.tokenize(text) for t in words.tokenize(s)]

        return approx, PUNKT_UNTRAINED
    return nltk.word_tokenize, PUNKT_TRAINED


SYSTEM_WORDNET_DIRS: tuple[Path, ...] = (Path("/usr/share/wordnet"),)
"""Where Debian/Ubuntu's ``wordnet-base`` and ``wordnet-sense-index`` put the WordNet 3.0 files."""
_WORDNET_FILES = ("cntlist.rev", "index.sense", "index.adj", "index.adv", "index.noun",
                  "index.verb", "data.adj", "data.adv", "data.noun", "data.verb", "adj.exc",
                  "adv.exc", "noun.exc", "verb.exc")
_LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",)
_LEX_POS = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def default_wordnet_cache() -> Path:
    """``$XDG_CACHE_HOME/medalign/nltk_data`` (``~/.cache/medalign/nltk_data`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medalign" / "nltk_data"


def system_wordnet_as_nltk_data(cache_root: Path | None = None,
                                sources: tuple[Path, ...] | None = None) -> Path | None:
    """Copy a system WordNet 3.0 database into nltk's layout (``ROOT/corpora/wordnet``), once.

    Returns the nltk data root to search, or None when no source folder holds every file nltk
    needs. The copy is made in a temporary folder and renamed into place, so an interrupted
    copy is never used.
    """
    sources = SYSTEM_WORDNET_DIRS if sources is None else sources
    src = next((d for d in sources if all((d / f).is_file() for f in _WORDNET_FILES)), None)
    if src is None:
        return None
    root = Path(cache_root) if cache_root is not None else default_wordnet_cache()
    dest = root / "corpora" / "wordnet"
    if (dest / "lexnames").is_file():
        return root
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=dest.parent))
        for f in _WORDNET_FILES:
            shutil.copyfile(src / f, tmp / f)
        (tmp / "lexnames").write_text("".join(
            f"{i:02d}\t{name}\t{_LEX_POS[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES)))
        (tmp / "SOURCE.txt").write_text(f"WordNet 3.0 database copied from {src}\n")
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return None
    return root if (dest / "lexnames").is_file() else None


def _nltk_has_wordnet() -> bool:
    import nltk

    for resource in ("corpora/wordnet.zip", "corpora/wordnet"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            continue
    return False


def find_wordnet(nltk_data: str | Path | None = None, *, system_fallback: bool = True):
    """Return nltk's WordNet reader, or None when the corpus is not found.

    Search order: ``nltk_data`` (must be an existing folder), ``$NLTK_DATA`` and nltk's default
    folders, then (``system_fallback``) a system copy, see :func:`system_wordnet_as_nltk_data`.
    """
    import nltk

    add_nltk_data(nltk_data)
    if not _nltk_has_wordnet():
        root = system_wordnet_as_nltk_data() if system_fallback else None
        if root is None:
            return None
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
        if not _nltk_has_wordnet():
            return None
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except (LookupError, OSError):
        return None
    return wordnet
