"""The committed test data (tests/assets) is what its SOURCE.md files say it is.

Every file is listed there with its sha256; when the development workspace's full copy
(../shared/data) is present, the subset is also checked against it (the official test rows,
byte-identical images and answer files).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent / "assets"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOURCES = [ASSETS / "vqa-rad" / "SOURCE.md", ASSETS / "llava-med-predictions" / "vqa-rad" / "SOURCE.md"]


def listed_sha256() -> dict[Path, str]:
    """``{path: sha256}`` from the markdown table rows ``| name | ... | <64 hex> |`` of each SOURCE.md."""
    out = {}
    for source in SOURCES:
        for line in source.read_text().splitlines():
            m = re.match(r"\|\s*(\S+\.(?:jpg|json|jsonl))\s*\|.*\|\s*([0-9a-f]{64})\s*\|$", line)
            if m:
                folder = source.parent / ("images" if m.group(1).endswith(".jpg") else "")
                out[folder / m.group(1)] = m.group(2)
    return out


def test_every_committed_file_is_listed_with_its_sha256():
    listed = listed_sha256()
    on_disk = {p for p in ASSETS.rglob("*") if p.is_file() and p.name != "SOURCE.md"}
    assert set(listed) == on_disk
    for path, digest in listed.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path


def test_subset_is_the_official_test_split_of_the_full_copy():
    full = SHARED_DATA / "vqa-rad" / "qa.json"
    if not full.is_file():
        pytest.skip("../shared/data/vqa-rad is not present (only in the development workspace)")
    rows = json.loads(full.read_text())
    assert json.loads((ASSETS / "vqa-rad" / "qa.json").read_text()) == [r for r in rows if r["split"] == "test"]
    for path in (ASSETS / "vqa-rad" / "images").iterdir():
        assert path.read_bytes() == (SHARED_DATA / "vqa-rad" / "images" / path.name).read_bytes(), path.name
    for path in (ASSETS / "llava-med-predictions" / "vqa-rad").glob("*.jsonl"):
        assert path.read_bytes() == (SHARED_DATA / "llava-med-predictions" / "vqa-rad" / path.name).read_bytes()
