"""Image loading: any file a user may have -> an RGB PIL image at the dataset resolution.

Every failure becomes a `TintError` naming the file: missing, unreadable, not an image,
truncated/corrupt, zero-size, or so large it trips PIL's decompression-bomb limit
(`Image.MAX_IMAGE_PIXELS`; PIL only *warns* between 1x and 2x the limit, we refuse both).

Colour handling: grayscale, 16-bit, CMYK, palette -> RGB; anything with transparency
(RGBA, LA, palette with a transparent index) is composited over white, optionally after
cropping to the visible pixels (clip-art objects are often small on large canvases).

Resizing to a square `resolution` (`fit`):
- ``"crop"`` (default, photos): scale the short side to `resolution`, centre-crop;
- ``"pad"`` (clip-art): scale the long side to `resolution`, pad with white, so a long
  object (a boat, a sword) is never cut;
- ``"stretch"``: resize both sides, ignoring aspect ratio.

Item references ``"<file>#<index>"`` name one image inside an array file (Fashion-MNIST
idx, CIFAR python pickle, read safely by `tint.data.arrays`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError

from tint.errors import TintError
from tint.io import atomic_path

FITS = ("crop", "pad", "stretch")
NEARLY_CONSTANT_STD = 1.0  # pixel std below one grey level (1/255 of the range): warn
LOGGER = logging.getLogger("tint")
_WARNED: set[str] = set()  # files already warned about in this process
RESAMPLE = Image.Resampling.BICUBIC


def split_ref(path_or_ref: str | Path) -> tuple[Path, int | None]:
    """``"file#12"`` -> (file, 12); a plain path -> (path, None).

    A path that exists as written wins, so file names containing '#' still work.
    """
    text = str(path_or_ref)
    if "#" in text and not Path(text).exists():
        file, _, index = text.rpartition("#")
        if index.isdigit():
            return Path(file), int(index)
    return Path(text), None


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a TintError."""
    path = Path(path)
    if not path.exists():
        raise TintError(f"{path}: image file not found")
    if not path.is_file():
        raise TintError(f"{path}: not a file (expected an image)")
    if path.stat().st_size == 0:
        raise TintError(f"{path}: empty file (0 bytes); delete or replace it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: truncated files fail here, not later
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
    return img


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


def load_image(
    path_or_ref: str | Path,
    resolution: int | None = 84,
    *,
    crop_alpha: bool = False,
    fit: str = "crop",
) -> Image.Image:
    """Load a file or ``"file#index"`` reference as RGB at `resolution` (None: keep size)."""
    file, index = split_ref(path_or_ref)
    if index is None:
        img = open_image(file)
    else:
        from tint.data.arrays import read_array_image

        img = read_array_image(file, index)
    img = to_rgb(img, crop_alpha=crop_alpha)
    img = img if resolution is None else fit_square(img, resolution, fit)
    warn_if_nearly_constant(img, path_or_ref)
    return img


def warn_if_nearly_constant(img: Image.Image, name: str | Path) -> bool:
    """Log a warning (once per file) for an image with almost no contrast.

    A JPEG whose data is damaged can decode without error to a flat grey or black
    image; trained on or scored as a real example it silently poisons a run. The
    std of every channel is below one grey level (1/255 of the range) only for such
    images or deliberately blank ones, so this never fires on real photos or clip-art.
    """
    stats = ImageStat.Stat(img)  # from the histogram: cheap even for large images
    std = max(stats.stddev)
    if std >= NEARLY_CONSTANT_STD:
        return False
    key = str(name)
    if key not in _WARNED:
        _WARNED.add(key)
        LOGGER.warning("%s: image is nearly constant (pixel std %.2f of 255, mean %.0f); a "
                       "damaged or blank file? check it or remove it from the data", key, std,
                       sum(stats.mean) / len(stats.mean))
    return True


def to_tensor(images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
    """PIL image(s) of one size -> float32 [B, 3, H, W] in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        return torch.zeros(0, 3, 0, 0)
    sizes = {img.size for img in images}
    if len(sizes) > 1:
        raise TintError(f"to_tensor: images differ in size {sorted(sizes)}; resize them first")
    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """[3, H, W] or [1, 3, H, W] in [0, 1] -> RGB PIL image (values clipped)."""
    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
        raise TintError(f"save_image: expected [3,H,W] or [1,3,H,W], got {list(tensor.shape)}")
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    arr = tensor.detach().float().cpu().clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")


def save_image(path: str | Path, tensor: torch.Tensor) -> Path:
    """Write one image tensor as PNG, atomically (a killed run leaves no half file)."""
    path = Path(path)
    img = to_pil(tensor)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
