"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def vqa_rad_dir() -> Path:
    """The real VQA-RAD copy next to the checkout (../shared/data/vqa-rad); skips when absent."""
    path = SHARED_DATA / "vqa-rad"
    if not (path / "qa.json").is_file() or not (path / "images").is_dir():
        pytest.skip("../shared/data/vqa-rad is not present (only in the development workspace)")
    return path


@pytest.fixture(scope="session")
def llava_med_predictions_dir() -> Path:
    path = SHARED_DATA / "llava-med-predictions" / "vqa-rad"
    if not path.is_dir():
        pytest.skip("../shared/data/llava-med-predictions is not present")
    return path
