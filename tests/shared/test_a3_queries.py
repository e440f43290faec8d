"""A3Tune's query texts against the authors' notebooks, written out literally here (Segment/seg_data_*.ipynb)."""

from __future__ import annotations

import hashlib

import pytest

from shared.a3_queries import DEFAULT_TOP_K, QUERY_TEMPLATES, query_sha256, query_text, question_key
from shared.errors import MedAlignError


def rec(question: str = "Is there a fracture?", **extra) -> dict:
    return {"id": 7, "image": "a.jpg", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                        {"from": "gpt", "value": "no"}], **extra}


@pytest.mark.parametrize("organ, expected", [
    # seg_data_vqa_rad.ipynb cell 11, the organ as stored (VQA-RAD's CHEST / ABD / HEAD), no space before the question
    ("CHEST", "Medical image of CHEST and lungs. Is there a fracture?"),
    ("ABD", "Medical imgaing of abdomen CT.Is there a fracture?"),
    ("HEAD", "Medical image of HEAD.Is there a fracture?"),
])
def test_vqa_rad_verbatim(organ, expected):
    assert query_text(rec(image_organ=organ), "vqa-rad") == expected


@pytest.mark.parametrize("location, expected", [
    # seg_data_slake.ipynb cell 11, on `location`
    ("Chest_lung", "Medical image of Chest_lung and lungs. Is there a fracture?"),
    ("Abdomen", "Medical imgaing of abdomen.Is there a fracture?"),
    ("Lung", "Medical image of Lung.Is there a fracture?"),
    ("Brain_Tissue", "Medical image of Brain_Tissue.Is there a fracture?"),
])
def test_slake_verbatim(location, expected):
    assert query_text(rec(location=location), "slake") == expected


def test_pathvqa_report_and_literal():
    assert query_text(rec(), "pathvqa") == "Medical image of pathology.Is there a fracture?"  # seg_data_pvqa.ipynb
    # seg_iu_rep.ipynb / seg_mimic.ipynb: a fixed text, the question not used
    assert query_text(rec("Describe the findings."), "report") == "Medical image of lungs and chest X-ray."
    assert query_text(rec(), "Chest X-ray of ") == "Chest X-ray of Is there a fracture?"
    assert DEFAULT_TOP_K == {"vqa-rad": 8, "slake": 8, "pathvqa": 8, "report": 4}
    assert QUERY_TEMPLATES == ("vqa-rad", "slake", "pathvqa", "report")


def test_errors_and_keys():
    with pytest.raises(MedAlignError, match="image_organ"):
        query_text(rec(), "vqa-rad")
    with pytest.raises(MedAlignError, match="literal query text must contain a space"):
        query_text(rec(), "vqa_rad")
    assert question_key({"id": 12}) == "12" and question_key({"id": "x-1"}) == "x-1"
    with pytest.raises(MedAlignError, match="without an 'id'"):
        question_key({"image": "a.jpg"})
    assert query_sha256("é") == hashlib.sha256(b"\xc3\xa9").hexdigest()
