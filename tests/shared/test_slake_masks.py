"""``medalign-data regions --from slake``: a tiny fake SLAKE release (imgs/xmlab*/source.jpg + mask.png,
the release's mask.txt and question file) -> a regions folder keyed like the converted questions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from shared.convert.datasets import convert_dataset
from shared.convert.slake_masks import convert_slake_masks, parse_label_table
from shared.errors import MedAlignError
from shared.regions import read_regions
from student_train.convert.cli import main


@pytest.fixture()
def release(tmp_path):
    root = tmp_path / "Slake1.0"
    rng = np.random.default_rng(0)
    masks = {}
    for i, (w, h) in enumerate([(40, 30), (24, 36), (32, 32)]):
        d = root / "imgs" / f"xmlab{i}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / "source.jpg")
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[: h // 2, : w // 2] = 1
        mask[h // 2:, w // 2:] = 3 + i
        if i == 1:  # stored as RGB with equal channels
            Image.fromarray(mask[..., None].repeat(3, 2)).save(d / "mask.png")
        else:
            Image.fromarray(mask).save(d / "mask.png")
        (d / "detection.json").write_text(json.dumps([{"Liver": [0, 0, 5, 5]}]))
        (d / "question.json").write_text("[]")
        masks[f"xmlab{i}/source.jpg"] = mask.astype(np.int64)
    (root / "imgs" / "xmlab9").mkdir()  # a mask without an image
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "imgs" / "xmlab9" / "mask.png")
    (root / "imgs" / "xmlab8").mkdir()  # an image without a mask: not in the regions
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "imgs" / "xmlab8" / "source.jpg")
    (root / "mask.txt").write_text("# organ labels\nLiver: 1\n3: Spinal Cord\nHeart\t4\n\n")
    rows = [{"img_name": f"xmlab{i}/source.jpg", "question": "Where is the liver?", "answer": "Left",
             "answer_type": "OPEN", "q_lang": "en", "qid": i, "location": "Abdomen"} for i in range(3)]
    (root / "test.json").write_text(json.dumps(rows))
    return root, masks


def test_convert_release(release, tmp_path):
    root, masks = release
    res = CliRunner().invoke(main, ["regions", "--from", "slake", "--input", str(root), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "3 masks converted" in res.output and "xmlab9" in res.output
    reg = read_regions(tmp_path / "r")
    assert sorted(reg.masks) == sorted(masks)
    for rel, mask in masks.items():
        assert (reg.mask(rel) == mask).all()
    assert reg.labels == {1: "Liver", 3: "Spinal Cord", 4: "Heart"}
    assert reg.name(0) == "label_0" and reg.name(5) == "label_5"
    # the keys are the image paths of the converted question files (image root: imgs/)
    convert_dataset("slake", root, tmp_path / "q")
    test = json.loads((tmp_path / "q" / "test.json").read_text())
    assert all(reg.has(r["image"]) for r in test)
    assert (root / "imgs" / test[0]["image"]).is_file()


def test_imgs_folder_and_explicit_table(release, tmp_path):
    root, masks = release
    table = tmp_path / "labels.json"
    table.write_text(json.dumps({"Liver": 1, "5": "Kidney"}))
    stats = convert_slake_masks(root / "imgs", tmp_path / "r", table)
    assert stats.masks == 3 and stats.values == [0, 1, 3, 4, 5]
    assert read_regions(tmp_path / "r").labels == {1: "Liver", 5: "Kidney"}


def test_label_table_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("Liver: 1\nno value here\n")
    with pytest.raises(MedAlignError, match=r"bad.txt:2"):
        parse_label_table(bad)
    bad.write_text("1: Liver\n1: Heart\n")
    with pytest.raises(MedAlignError, match="named twice"):
        parse_label_table(bad)
    with pytest.raises(MedAlignError, match="no imgs"):
        convert_slake_masks(tmp_path, tmp_path / "out")
