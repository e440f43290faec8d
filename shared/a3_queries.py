"""A3Tune's query texts: what BiomedCLIP's text tower embeds to rank a question's SAM masks.

The named templates reproduce the authors' notebooks verbatim (github.com/Aofei-Chang/A3Tune at
a22e930, ``Segment/seg_data_*.ipynb``), typos and missing spaces included; the question is
appended with no separator:

- ``vqa-rad`` (``seg_data_vqa_rad.ipynb``), on the record's ``image_organ`` as stored (``CHEST``,
  ``ABD``, ``HEAD``: not lower-cased, not mapped): ``"chest"`` in it (case-insensitive) ->
  ``f"Medical image of {organ} and lungs. "``; else ``"abd"`` in it -> ``"Medical imgaing of
  abdomen CT."``; else ``f"Medical image of {organ}."``.
- ``slake`` (``seg_data_slake.ipynb``), the same branches on ``location``; abdomen ->
  ``"Medical imgaing of abdomen."``.
- ``pathvqa`` (``seg_data_pvqa.ipynb``): ``"Medical image of pathology."``.
- ``report`` (``seg_iu_rep.ipynb``, ``seg_mimic.ipynb``): the fixed ``"Medical image of lungs and
  chest X-ray."`` without the question, so every question of an image gets the same masks.

Any other ``--query-template`` value is literal text, the question appended (it must contain a
space, so a misspelt template name is an error instead of a query). The question is the record's
first human turn without ``<image>``, trimmed (:func:`shared.records.question_text`).
"""

from __future__ import annotations

import hashlib
import re

from shared.errors import MedAlignError
from shared.records import question_text, record_id

QUERY_TEMPLATES = ("vqa-rad", "slake", "pathvqa", "report")
#: the record field each organ-dependent template reads
ORGAN_FIELDS = {"vqa-rad": "image_organ", "slake": "location"}
REPORT_QUERY = "Medical image of lungs and chest X-ray."
PATHVQA_PREFIX = "Medical image of pathology."
#: the default top-k per template (the notebooks' ``topk=8`` for VQA, 4 for reports)
DEFAULT_TOP_K = {"vqa-rad": 8, "slake": 8, "pathvqa": 8, "report": 4}
_NAME_LIKE = re.compile(r"[A-Za-z0-9_.-]+")


def check_template(template: str) -> str:
    """``template`` itself when it is a named template or usable literal text, else a MedAlignError."""
    if template in QUERY_TEMPLATES:
        return template
    if not isinstance(template, str) or not template.strip() or _NAME_LIKE.fullmatch(template):
        raise MedAlignError(f"--query-template {template!r}: not one of {', '.join(QUERY_TEMPLATES)}, and literal "
                            "query text must contain a space")
    return template


def _organ_prefix(organ: str, abdomen: str) -> str:
    low = organ.lower()
    if "chest" in low:
        return f"Medical image of {organ} and lungs. "
    if "abd" in low:
        return abdomen
    return f"Medical image of {organ}."


def query_text(record: dict, template: str) -> str:
    """The text BiomedCLIP embeds for ``record`` under ``template`` (module docstring)."""
    check_template(template)
    if template == "report":
        return REPORT_QUERY
    question = question_text(record)
    if template == "pathvqa":
        return PATHVQA_PREFIX + question
    if template in ORGAN_FIELDS:
        field = ORGAN_FIELDS[template]
        organ = record.get(field)
        if organ is None or str(organ) == "":
            raise MedAlignError(f"record {record_id(record)!r} has no {field!r} field, which --query-template "
                                f"{template} needs (convert the dataset with medalign-data, which keeps it)")
        abdomen = "Medical imgaing of abdomen CT." if template == "vqa-rad" else "Medical imgaing of abdomen."
        return _organ_prefix(str(organ), abdomen) + question
    return template + question


def query_sha256(text: str) -> str:
    """sha256 hex of a query text's UTF-8 bytes (stored per question in the cache)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def question_key(record: dict) -> str:
    """A question's key in the A3 cache: the record's ``id`` as a string (a record without one is an error)."""
    key = record_id(record)
    if key == "":
        raise MedAlignError(f"a record without an 'id' (image {record.get('image')!r}); every question of an A3Tune "
                            "cache needs one")
    return key


__all__ = ["DEFAULT_TOP_K", "QUERY_TEMPLATES", "check_template", "query_sha256", "query_text", "question_key"]
