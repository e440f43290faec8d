"""SLAKE's per-image organ masks -> a regions folder (:mod:`shared.regions`), ``medalign-data regions --from slake``.

The SLAKE release keeps one folder per image, ``imgs/xmlab<N>/``, holding the image (``source.jpg``,
the path the question files name as ``img_name``: ``xmlab<N>/source.jpg``), its segmentation
``mask.png`` (one integer label per pixel), ``detection.json`` (boxes) and ``question.json``; the
label values are named by the release's ``mask.txt``. Each ``mask.png`` becomes a mask of the
regions folder under the key ``xmlab<N>/<image file>`` (so ``--image-root`` is the ``imgs`` folder,
as for the converted question files), and the label table its ``labels``.

The label table (``--labels``, default the release's ``mask.txt``): one label per line, an integer
value and a name in either order, separated by ``:``, ``=``, a tab, a comma or spaces
(``1: Liver``, ``Liver 1``, ...), or a JSON object mapping names to values or values to names.
Blank lines and lines starting with ``#`` are ignored. A mask value the table does not name is
called ``label_<v>``; without a table every value is. The table's exact layout in the release was
not at hand when this was written: anything the parser does not understand is an error naming the
line, never a silent guess.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shared.errors import MedAlignError
from shared.regions import read_mask, write_regions

MASK_NAME = "mask.png"
LABEL_TABLE = "mask.txt"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_SPLIT = re.compile(r"\s*[:=\t,]\s*|\s+")


@dataclass
class MaskStats:
    """What :func:`convert_slake_masks` did."""

    masks: int = 0
    labels: dict[int, str] = field(default_factory=dict)
    values: list[int] = field(default_factory=list)
    no_image: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        named = ", ".join(f"{v}={self.labels.get(v, f'label_{v}')}" for v in self.values)
        lines = [f"{self.masks} masks converted; label values present: {named or 'none'}"]
        for what, items in (("folders with a mask but no image (skipped)", self.no_image),
                            ("masks whose size differs from their image (kept; tsne skips them)", self.size_mismatch)):
            if items:
                lines.append(f"{len(items)} {what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        return lines


def parse_label_table(path: str | Path) -> dict[int, str]:
    """``{value: name}`` from a label table (module docstring); errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise MedAlignError(f"--labels {path}: cannot read it ({e})") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MedAlignError(f"--labels {path}: not valid JSON ({e})") from None
        out = {}
        for k, v in data.items():
            if str(k).strip().lstrip("-").isdigit():
                out[int(k)] = str(v)
            elif isinstance(v, int) or str(v).strip().isdigit():
                out[int(v)] = str(k)
            else:
                raise MedAlignError(f"--labels {path}: entry {k!r}: {v!r} has no integer value")
        return out
    out: dict[int, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p for p in _SPLIT.split(line) if p]
        ints = [i for i, p in enumerate(parts) if p.isdigit()]
        if len(ints) != 1 or ints[0] not in (0, len(parts) - 1) or len(parts) < 2:
            raise MedAlignError(f"--labels {path}:{n}: expected an integer value and a name, got {line!r}")
        value = int(parts.pop(ints[0]))
        name = " ".join(parts)
        if value in out and out[value] != name:
            raise MedAlignError(f"--labels {path}:{n}: value {value} named twice ({out[value]!r}, {name!r})")
        out[value] = name
    if not out:
        raise MedAlignError(f"--labels {path}: no labels in it")
    return out


def _imgs_dir(release: Path) -> Path:
    if (release / "imgs").is_dir():
        return release / "imgs"
    if any(release.glob(f"*/{MASK_NAME}")):
        return release
    raise MedAlignError(f"--input {release}: no imgs/*/{MASK_NAME} (the SLAKE release folder) there")


def _image_of(folder: Path) -> Path | None:
    candidates = sorted(p for p in folder.iterdir()
                        if p.suffix.lower() in _IMAGE_SUFFIXES and p.name != MASK_NAME and "mask" not in p.stem.lower())
    named = [p for p in candidates if p.stem.lower().startswith("source")]
    return (named or candidates or [None])[0]


def convert_slake_masks(release: str | Path, out_dir: str | Path, labels: str | Path | None = None) -> MaskStats:
    """Write ``out_dir/regions.json`` and the masks from a SLAKE release folder (or its ``imgs``)."""
    release = Path(release)
    if not release.is_dir():
        raise MedAlignError(f"--input {release} is not a folder")
    imgs = _imgs_dir(release)
    if labels is None:
        table = next((p for p in (release / LABEL_TABLE, imgs.parent / LABEL_TABLE) if p.is_file()), None)
    else:
        table = Path(labels)
        if not table.is_file():
            raise MedAlignError(f"--labels {table} not found")
    stats = MaskStats(labels=parse_label_table(table) if table is not None else {})
    values: set[int] = set()

    def masks():  # one mask in memory at a time
        for mask_path in sorted(imgs.glob(f"*/{MASK_NAME}")):
            folder = mask_path.parent
            image = _image_of(folder)
            if image is None:
                stats.no_image.append(folder.name)
                continue
            mask = read_mask(mask_path)
            with Image.open(image) as im:
                if im.size != (mask.shape[1], mask.shape[0]):
                    stats.size_mismatch.append(f"{folder.name} (mask {mask.shape[1]}x{mask.shape[0]}, image "
                                               f"{im.size[0]}x{im.size[1]})")
            values.update(int(v) for v in np.unique(mask))
            stats.masks += 1
            yield f"{folder.name}/{image.name}", mask

    if not any(_image_of(p.parent) for p in imgs.glob(f"*/{MASK_NAME}")):
        raise MedAlignError(f"--input {release}: no mask with an image next to it under {imgs}")
    write_regions(out_dir, masks(), stats.labels)
    stats.values = sorted(values)
    return stats

__all__ = ["MASK_NAME", "LABEL_TABLE", "MaskStats", "parse_label_table", "convert_slake_masks"]
