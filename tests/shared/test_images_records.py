"""Image decoding edge cases, geometry, and dataset-file errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shared.errors import BadImageError, MedAlignError
from shared.images import Preprocess, decode_image, expand2square, load_image, resolve_image_path
from shared.records import answer_text, answer_type, load_records, record_id


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_path_escaping_root_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    assert resolve_image_path(tmp_path / "root", "a/b.png") == (tmp_path / "root" / "a" / "b.png").resolve()
    for bad in ("../secret.png", "a/../../secret.png", str(tmp_path / "secret.png")):
        with pytest.raises(MedAlignError, match="escapes --image-root"):
            resolve_image_path(tmp_path / "root", bad)


def test_bad_files_name_the_file(tmp_path):
    good = _png(Image.new("RGB", (40, 30), (10, 20, 30)))
    cases = {"missing.png": None, "empty.png": b"", "garbage.png": b"not an image at all",
             "truncated.png": good[: len(good) // 2]}
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImageError) as e:
            load_image(tmp_path / name)
        assert name in str(e.value)


def test_decompression_bomb_refused_before_decoding():
    data = _png(Image.new("L", (400, 300)))
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(data, "bomb.png", max_pixels=400 * 300 - 1)
    assert decode_image(data, "ok.png", max_pixels=400 * 300).size == (400, 300)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "1"])
def test_modes_convert_to_rgb(mode):
    img = Image.new("RGB", (8, 6), (200, 100, 50)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (8, 6)


def test_sixteen_bit_is_min_max_scaled():
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = np.asarray(decode_image(_png(img)))
    np.testing.assert_array_equal(out[..., 0], np.round(arr / 4000 * 255).astype(np.uint8))


def test_pad_geometry_matches_llava_expand2square():
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    sq = expand2square(img, (1, 2, 3))
    assert sq.size == (30, 30)
    a = np.asarray(sq)
    assert tuple(a[0, 0]) == (1, 2, 3) and tuple(a[15, 15]) == (255, 0, 0) and tuple(a[29, 0]) == (1, 2, 3)
    assert (a[10:20] == (255, 0, 0)).all()  # pasted at offset (30-10)//2 = 10


def test_crop_vs_pad_differ_on_non_square():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    img = Image.fromarray(arr)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    pad = Preprocess(20, mean, std, "pad")(img)
    crop = Preprocess(20, mean, std, "crop")(img)
    assert pad.shape == crop.shape == (3, 20, 20)
    # pad keeps the whole width: top rows are the mean colour (0 after normalisation, up to 1/255)
    assert abs(pad[:, 0].mean()) < 0.01
    # crop keeps the centre 20 columns: left half white, right half black
    assert crop[:, :, 2].mean() > 0.9 and crop[:, :, -3].mean() < -0.9


def test_malformed_json_names_line_and_column(tmp_path):
    p = tmp_path / "train.json"
    p.write_text('[\n  {"id": 1, "image": "a.png"},\n  {"id": 2 "image": "b.png"}\n]')
    with pytest.raises(MedAlignError, match=r"train.json:3:\d+: malformed JSON"):
        load_records(p)


def test_record_accessors_accept_real_mess():
    rec = {"id": 5, "answer_type": "CLOSED ", "conversations": [{"from": "human", "value": "q"},
                                                                 {"from": "gpt", "value": 12}]}
    assert record_id(rec) == "5" and answer_type(rec) == "CLOSED" and answer_text(rec) == "12"
