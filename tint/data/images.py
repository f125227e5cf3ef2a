"""Image loading: any file a user may have -> an RGB PIL image at the dataset resolution,
and PIL <-> tensor conversions.

Decoding, colour handling and squaring (`fit`: "crop" for photos, "pad" for clip-art, so
a long object is never cut, "stretch") live in `tint.imaging` (PIL and numpy only), which
`tint predict` shares, so training and prediction see the same pixels; every failure is a
`TintError` naming the file.

Item references ``"<file>#<index>"`` name one image inside an array file (Fashion-MNIST
idx, CIFAR python pickle, read safely by `tint.data.arrays`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageStat

from tint.errors import TintError
from tint.imaging import fit_square, open_image, to_rgb
from tint.io import atomic_path

NEARLY_CONSTANT_STD = 1.0  # pixel std below one grey level (1/255 of the range): warn
LOGGER = logging.getLogger("tint")
_WARNED: set[str] = set()  # files already warned about in this process


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
