"""Writers for tiny datasets in every on-disk format tint reads (used by the data tests).

Each writer builds the real layout in a temporary folder: image-folder trees,
miniImageNet CSVs, CUB-200-2011 folders, CIFAR-100 python pickles with the CIFAR-FS
split files, and Fashion-MNIST idx.gz files.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_png(path: Path, seed: int, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> Path:
    """A small random image; the colour depends on the seed so classes differ."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_folder_tree(root: Path, classes: dict[str, int], suffix: str = ".png") -> Path:
    """``root/<class>/<n images>``."""
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            write_png(root / name / f"img_{i:03d}{suffix}", seed=100 * c + i)
    return root


def write_miniimagenet(root: Path, per_split: dict[str, list[str]], n_images: int = 6) -> Path:
    """Ravi & Larochelle layout: images/<file>.jpg and train/val/test.csv."""
    for c, (stem, labels) in enumerate(per_split.items()):
        rows = ["filename,label"]
        for k, label in enumerate(labels):
            for i in range(n_images):
                name = f"{label}{i:08d}.jpg"
                write_png(root / "images" / name, seed=1000 * c + 10 * k + i)
                rows.append(f"{name},{label}")
        (root / f"{stem}.csv").write_text("\n".join(rows) + "\n")
    return root


def write_cub(root: Path, n_classes: int = 8, n_images: int = 4) -> Path:
    """CUB-200-2011 layout: images/<NNN.Name>/*.jpg."""
    for c in range(n_classes):
        folder = root / "images" / f"{c + 1:03d}.Bird_{c}"
        for i in range(n_images):
            write_png(folder / f"Bird_{c}_{i:04d}_{c}.jpg", seed=10 * c + i)
    return root


def write_cifar_fs(
    root: Path, names: list[str], per_class: int = 3, protocol: int = 2, splits: dict | None = None
) -> Path:
    """CIFAR-100 python pickles (bytes keys, as the real files) + Bertinetto split files."""
    data_dir = root / "cifar-100-python"
    data_dir.mkdir(parents=True, exist_ok=True)
    meta = {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"x"]}
    (data_dir / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    rng = np.random.default_rng(0)
    for part, count in (("train", per_class), ("test", 1)):
        labels = [label for label in range(len(names)) for _ in range(count)]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        obj = {b"fine_labels": labels, b"coarse_labels": [0] * len(labels), b"data": data}
        (data_dir / part).write_bytes(pickle.dumps(obj, protocol=protocol))
    split_dir = root / "splits" / "bertinetto"
    split_dir.mkdir(parents=True, exist_ok=True)
    third = len(names) // 3
    splits = splits or {
        "train": names[:third],
        "val": names[third : 2 * third],
        "test": names[2 * third :],
    }
    for stem, listed in splits.items():
        (split_dir / f"{stem}.txt").write_text("\n".join(listed) + "\n")
    return root


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fashion_mnist(root: Path, per_class: int = 3) -> Path:
    """Fashion-MNIST idx.gz files (train and t10k), labels 0..9, 28x28 images."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", per_class), ("t10k", 1)):
        labels = np.array([label for label in range(10) for _ in range(count)], dtype=np.uint8)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(len(labels))  # a fingerprint per index
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    return root
