"""Decoding and squaring images with PIL and numpy only (no torch).

Shared by the training path (`tint.data.images`, which adds tensors) and `tint predict`
(`tint.predict`, which must start without importing torch), so that both see exactly the
same pixels. Every failure becomes a `TintError` naming the file: missing, unreadable, not
an image, truncated/corrupt, zero-size, or so large it trips PIL's decompression-bomb limit
(`Image.MAX_IMAGE_PIXELS`; PIL only *warns* between 1x and 2x the limit, we refuse both).

Colour: grayscale, 16-bit, CMYK, palette -> RGB; anything with transparency (RGBA, LA,
palette with a transparent index) is composited over white, optionally after cropping to
the visible pixels. Squaring (`fit`): "crop" scales the short side and centre-crops,
"pad" scales the long side and pads with white, "stretch" ignores the aspect ratio.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tint.errors import TintError
from tint.jpeg_check import MAX_BLOCKS, jpeg_problem

FITS = ("crop", "pad", "stretch")
RESAMPLE = Image.Resampling.BICUBIC
LOGGER = logging.getLogger("tint")
_WARNED: set[str] = set()  # files already warned about in this process


def open_image(path: str | Path, jpeg_blocks: int = MAX_BLOCKS) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a TintError.

    Damage PIL decodes through (a JPEG's, found by tint.jpeg_check up to `jpeg_blocks` 8x8
    blocks; 0: its markers only) and PIL's own warnings are logged once per file, naming it."""
    path = Path(path)
    if not path.exists():
        raise TintError(f"{path}: image file not found")
    if not path.is_file():
        raise TintError(f"{path}: not a file (expected an image)")
    if path.stat().st_size == 0:
        raise TintError(f"{path}: empty file (0 bytes); delete or replace it")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: truncated files fail here, not later
                problem = checked_jpeg(path, jpeg_blocks) if img.format == "JPEG" else None
                img = ImageOps.exif_transpose(img) or img
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TintError(
            f"{path}: image too large ({err}); it trips the decompression-bomb limit "
            f"of {Image.MAX_IMAGE_PIXELS} pixels. Downscale it or remove it"
        ) from err
    except UnidentifiedImageError as err:
        raise TintError(f"{path}: not an image PIL can read (wrong extension or corrupt)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise TintError(f"{path}: unreadable or corrupt image ({err})") from err
    if img.width == 0 or img.height == 0:
        raise TintError(f"{path}: zero-size image ({img.width}x{img.height})")
    for message in [problem, *(str(w.message) for w in caught)]:
        if message:
            warn_once(path, f"{message}; the image decoded, but parts of it may be garbled: "
                            "check it, or replace or remove it")
    return img


_JPEG_CHECKED: dict[tuple[str, int, int, int], str | None] = {}


def checked_jpeg(path: Path, max_blocks: int) -> str | None:
    """jpeg_problem, once per file version and process: training loads an image many times."""
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns, max_blocks)
    if memo not in _JPEG_CHECKED:
        _JPEG_CHECKED[memo] = jpeg_problem(path, max_blocks)
    return _JPEG_CHECKED[memo]


def warn_once(path: str | Path, message: str) -> None:
    """A warning naming the file, once per file and process (PIL itself says nothing about
    most damage it decodes through, and what it does say names no file)."""
    key = str(path)
    if key not in _WARNED:
        _WARNED.add(key)
        LOGGER.warning("%s: %s", key, message)



def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale -> 8-bit 'L' (PIL's own convert clips)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
    else:
        scale = 1.0 / 257.0 if arr.max(initial=0) > 255 else 1.0
    return Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8), "L")


def visible_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box of pixels with alpha above a faint-shadow threshold."""
    return img.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()


def to_rgb(img: Image.Image, crop_alpha: bool = False) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited over white (after cropping, if asked)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if not has_alpha:
        return img.convert("RGB")
    img = img.convert("RGBA")
    if crop_alpha:
        box = visible_box(img)
        if box is not None:
            img = img.crop(box)
    canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
    canvas.alpha_composite(img)
    return canvas.convert("RGB")


def fit_square(img: Image.Image, resolution: int, fit: str = "crop") -> Image.Image:
    """Resize an RGB image to resolution x resolution (see the module docstring for `fit`)."""
    if fit not in FITS:
        raise TintError(f"fit={fit!r}: choose one of {', '.join(FITS)}")
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    if fit == "stretch":
        return img.resize((resolution, resolution), RESAMPLE)
    if fit == "crop":
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), RESAMPLE)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        return img.crop((left, top, left + resolution, top + resolution))
    scale = resolution / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (resolution, resolution), (255, 255, 255))
    canvas.paste(img.resize((nw, nh), RESAMPLE), ((resolution - nw) // 2, (resolution - nh) // 2))
    return canvas
