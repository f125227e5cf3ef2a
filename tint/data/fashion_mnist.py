"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (idx files, 28x28 grayscale).

All 70,000 images (train and t10k files together: 7,000 per class) are items, named
``"<idx file>#<index>"`` relative to the root, e.g. ``"train-images-idx3-ubyte.gz#17"``.

Class split (fixed; 5-way episodes need at least 5 classes in a split, and 10 classes
do not allow three splits of 5): base = labels 0-4 (T-shirt-top, Trouser, Pullover,
Dress, Coat), novel = labels 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot), val = none.
The novel split mixes easy classes (footwear, bags: unlike anything in base) with a
hard one (Shirt, close to T-shirt/Pullover/Coat). Images are upscaled (bicubic) from
28x28 to the requested resolution (84 by default; use 28 or 32 for small students).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tint.data.arrays import read_idx
from tint.data.base import FewShotDataset, dataset_under
from tint.errors import TintError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt-top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SPLIT_LABELS = {"base": (0, 1, 2, 3, 4), "val": (), "novel": (5, 6, 7, 8, 9)}
PARTS = (
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)


def _find(root: Path, name: str) -> Path:
    """The .gz file, or its uncompressed twin."""
    for candidate in (root / name, root / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise TintError(
        f"{root / name}: Fashion-MNIST file not found; install the Debian package "
        "dataset-fashion-mnist or pass root=<folder with the idx files>"
    )


def load_fashion_mnist(
    root: str | Path = DEFAULT_ROOT, resolution: int = 84, fit: str = "stretch"
) -> FewShotDataset:
    """Fashion-MNIST as a few-shot dataset (base 5 / val 0 / novel 5 classes)."""
    root = Path(root)
    items: dict[str, list[str]] = {name: [] for name in CLASS_NAMES}
    for images_name, labels_name in PARTS:
        images_file, labels_file = _find(root, images_name), _find(root, labels_name)
        labels = read_idx(labels_file)
        n_images = read_idx(images_file).shape[0]
        if labels.ndim != 1 or len(labels) != n_images:
            raise TintError(
                f"{labels_file}: {labels.shape} labels do not match {n_images} images in {images_file}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
            raise TintError(f"{labels_file}: labels outside 0..9")
        rel = images_file.relative_to(root).as_posix()
        for label in range(len(CLASS_NAMES)):
            indices = np.flatnonzero(labels == label)
            items[CLASS_NAMES[label]].extend(f"{rel}#{i}" for i in indices)
    splits = {s: [CLASS_NAMES[i] for i in labels] for s, labels in SPLIT_LABELS.items()}
    return dataset_under(root, "fashion-mnist", items, splits, resolution, fit)
