"""Image files: safe path resolution, robust decoding, content hashing and square geometry.

Both stages see images through this module so the teacher and the student agree on pixels:
``expand2square`` is LLaVA's ``image_aspect_ratio=pad`` (paste centred on a square canvas of the
processor's mean colour), which the teacher's ``pad`` geometry reproduces.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.errors import BadImageError, MedAlignError

#: Images above this many pixels are refused as possible decompression bombs (PIL's own default
#: warning threshold, ~9500 x 9500). The largest VQA-RAD image is 2321 x 1500.
MAX_PIXELS = 89_478_485


def resolve_image_path(image_root: str | Path, rel: str) -> Path:
    """Join a dataset-relative image path to ``image_root``, refusing paths that escape it."""
    root = Path(image_root).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise MedAlignError(f"image path {rel!r} escapes --image-root {root}; refusing to read it")
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_image_bytes(path: str | Path) -> bytes:
    """Read an image file's bytes; a missing or zero-byte file raises :class:`BadImageError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except IsADirectoryError:
        raise BadImageError(path, "is a directory") from None
    except OSError as e:
        raise BadImageError(path, f"cannot read ({e})") from None
    if not data:
        raise BadImageError(path, "empty file (0 bytes)")
    return data


def decode_image(data: bytes, path: str | Path = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes fully into an 8-bit RGB image.

    Refuses truncated or corrupt files and images over ``max_pixels`` (before decoding them).
    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit / float images are converted; 16-bit
    and float images are min-max scaled to 0..255 per image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImageError(path, f"{w}x{h} pixels exceeds the limit of {max_pixels} (decompression bomb?)")
            img.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(path, f"decompression bomb refused ({e})") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not a recognised image format (corrupt?)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(path, f"corrupt or truncated image ({e})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str]:
    """Read, hash and decode one image file. Returns (RGB image, sha256 hex of the file bytes)."""
    data = read_image_bytes(path)
    return decode_image(data, path, max_pixels), sha256_bytes(data)


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's pad-to-square: the image centred on a square canvas of ``background`` colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_colour(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """The processor mean (0..1 floats) as the 0..255 background colour LLaVA pads with."""
    return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a normalised square tensor.

    ``geometry='pad'`` pads to a square with the mean colour, then resizes (the student's view);
    ``'crop'`` resizes the short side and centre-crops, pixel for pixel what open_clip's stock
    evaluation transform ``image_transform(size, is_train=False)`` (torchvision ``Resize(size)`` +
    ``CenterCrop(size)``) gives (docs/design.md 1, "Geometry"). Resizing is bicubic with PIL (always
    antialiased), as both CLIP and LLaVA processors do.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    geometry: str = "pad"
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.geometry not in ("pad", "crop"):
            raise MedAlignError(f"unknown geometry {self.geometry!r}; choose 'pad' or 'crop'")

    def to_pil(self, img: Image.Image) -> Image.Image:
        s = self.image_size
        resample = Image.Resampling.BICUBIC
        if self.geometry == "pad":
            return expand2square(img, mean_colour(self.mean)).resize((s, s), resample)
        # torchvision Resize(s) on a PIL image (open_clip's eval transform, resize_mode 'shortest'):
        # the short side becomes s, the long side int(s * long / short), truncated; no resize at all
        # when the size already matches. Then CenterCrop(s): offsets int(round((side - s) / 2.0)).
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        nw, nh = (s, new_long) if w <= h else (new_long, s)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample)
        left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
        return img.crop((left, top, left + s, top + s))

    def __call__(self, img: Image.Image) -> np.ndarray:
        """(3, S, S) float32 array, normalised."""
        arr = np.asarray(self.to_pil(img), dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def to_json(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "geometry": self.geometry, "interpolation": self.interpolation}
