"""Datasets by name: a registry of loaders, each returning a `FewShotDataset` (tint.data.base).

A `FewShotDataset` is only names: class -> item ids, split -> class names, and how to
load an item (see `tint.data.base`).

Specs understood by `load_dataset` (details in docs/datasets.md):

=====================  =====================================================
``openclipart``        Debian openclipart-png, committed base/val/novel split
``fashion-mnist``      Debian dataset-fashion-mnist, base 5 / novel 5 classes
``folder:<root>``      ``root/<class>/<images>`` (+ optional split files)
``miniimagenet:<root>`` Ravi & Larochelle CSVs + ``images/``
``cub:<root>``         CUB-200-2011 ``images/<class>/``, 100/50/50 split
``cifar-fs:<root>``    CIFAR-100 python pickles + Bertinetto split files
=====================  =====================================================
"""

from __future__ import annotations

from collections.abc import Callable

from tint.data.base import SPLITS, FewShotDataset, check_unique, validate_dataset
from tint.errors import TintError
from tint.registry import Registry

# kind -> loader(resolution=..., root=..., **kw). The loaders import this package's
# `base`, never this module: the registry names them, so there is no import circle.
DATASETS = Registry("dataset", {
    "openclipart": "tint.data.openclipart:load_openclipart",
    "fashion-mnist": "tint.data.fashion_mnist:load_fashion_mnist",
    "folder": "tint.data.formats:load_folder",
    "miniimagenet": "tint.data.formats:load_miniimagenet",
    "cub": "tint.data.formats:load_cub",
    "cifar-fs": "tint.data.formats:load_cifar_fs",
})

Loader = Callable[..., FewShotDataset]


def available_datasets() -> list[str]:
    return DATASETS.names()


def load_dataset(spec: str, resolution: int = 84, **kw) -> FewShotDataset:
    """Build a dataset from ``"name"`` or ``"name:<root>"`` (see the module docstring)."""
    name, _, root = spec.partition(":")
    if name not in DATASETS:
        raise TintError(
            f"dataset {spec!r}: unknown kind {name!r}; choose one of {', '.join(DATASETS)}"
        )
    if root:
        kw["root"] = root
    dataset = DATASETS.load(name)(resolution=resolution, **kw)
    dataset.spec = spec
    return dataset


create_dataset = load_dataset

__all__ = ["DATASETS", "SPLITS", "FewShotDataset", "available_datasets", "check_unique",
           "create_dataset", "load_dataset", "validate_dataset"]
