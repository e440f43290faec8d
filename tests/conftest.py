"""Fixtures shared by every test package.

Real data comes from two places:

* ``tests/assets/`` (committed, always present): the 451 official VQA-RAD test rows, 12 of the
  images and the three real LLaVA-Med answer files (``tests/assets/vqa-rad/SOURCE.md``). Tests
  whose point survives on that subset use it, so they run in a plain clone and in CI.
* ``../shared/data/`` (the development workspace only): the full VQA-RAD copy, all 2,248 rows
  and 315 images. Tests that need all of it (every image, the official train/test counts) skip
  without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ASSETS = Path(__file__).resolve().parent / "assets"
#: committed subset: qa.json (451 test rows) + images/ (12 JPEGs)
VQA_RAD_SUBSET = ASSETS / "vqa-rad"
#: committed: the three LLaVA-Med answer files on the VQA-RAD test split
LLAVA_MED_PREDICTIONS = ASSETS / "llava-med-predictions" / "vqa-rad"


@pytest.fixture(scope="session")
def vqa_rad_dir() -> Path:
    """The full VQA-RAD copy next to the checkout (../shared/data/vqa-rad); skips when absent."""
    path = SHARED_DATA / "vqa-rad"
    if not (path / "qa.json").is_file() or not (path / "images").is_dir():
        pytest.skip("../shared/data/vqa-rad is not present (only in the development workspace)")
    return path


@pytest.fixture(scope="session")
def vqa_rad_subset_dir() -> Path:
    """The committed VQA-RAD subset (tests/assets/vqa-rad): the 451 test rows and 12 images."""
    assert (VQA_RAD_SUBSET / "qa.json").is_file(), VQA_RAD_SUBSET
    return VQA_RAD_SUBSET


@pytest.fixture(scope="session")
def llava_med_predictions_dir() -> Path:
    """The committed LLaVA-Med answer files on the VQA-RAD test split (tests/assets)."""
    assert (LLAVA_MED_PREDICTIONS / "answer-file.jsonl").is_file(), LLAVA_MED_PREDICTIONS
    return LLAVA_MED_PREDICTIONS
