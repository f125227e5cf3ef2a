"""The few-shot dataset interface every loader returns (`tint.data.datasets` builds one by name).

A `FewShotDataset` is only names: class -> item ids, split -> class names, and how to
load an item. Item ids are paths *relative to the dataset root* when the dataset has a
root (so episode files stay valid when the data moves), absolute paths otherwise, or
``"<file>#<index>"`` references into array files (Fashion-MNIST, CIFAR-FS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from tint.data.images import load_image, split_ref, to_tensor
from tint.errors import TintError
from tint.imaging import FITS

SPLITS = ("base", "val", "novel")


@dataclass
class FewShotDataset:
    """Class names, the items of each class, the split of classes, and the resolution."""

    name: str
    items: dict[str, list[str]]  # class name -> item ids (see module docstring)
    splits: dict[str, list[str]]  # "base" / "val" / "novel" -> class names
    resolution: int = 84
    root: str | None = None  # relative item ids are resolved against it
    spec: str | None = None  # what load_dataset() was called with (stored in episode files)
    crop_alpha: bool = False  # crop transparent margins (clip-art)
    fit: str = "crop"  # "crop" | "pad" | "stretch", see tint.data.images
    source: str = field(default="", repr=False)  # file named in validation errors

    def __post_init__(self) -> None:
        validate_dataset(self)

    def classes(self, split: str) -> list[str]:
        """Class names of one split ("base", "val", "novel") or "all"."""
        if split == "all":
            return sorted(self.items)
        if split not in SPLITS:
            raise TintError(f"split {split!r}: choose one of base, val, novel, all")
        return list(self.splits.get(split, []))

    def resolve(self, item: str) -> str:
        """The absolute path (or ``file#index`` reference) of an item id."""
        file, index = split_ref(item)
        if self.root is not None and not file.is_absolute():
            file = Path(self.root) / file
        return str(file) if index is None else f"{file}#{index}"

    def load(self, item: str) -> Image.Image:
        """One item as an RGB PIL image at self.resolution."""
        return load_image(
            self.resolve(item), self.resolution, crop_alpha=self.crop_alpha, fit=self.fit
        )

    def load_tensor(self, items: list[str]) -> torch.Tensor:
        """Items as float32 [B, 3, R, R] in [0, 1]."""
        if not items:
            return torch.zeros(0, 3, self.resolution, self.resolution)
        return to_tensor([self.load(item) for item in items])

    def class_of(self, item: str) -> str:
        """The class an item id belongs to (index built on first use)."""
        if not hasattr(self, "_class_of"):
            self._class_of = {i: c for c, its in self.items.items() for i in its}
        try:
            return self._class_of[item]
        except KeyError as err:
            raise TintError(f"{item}: not an item of dataset {self.name}") from err

    def summary(self) -> str:
        parts = [f"{s} {len(self.splits.get(s, []))}" for s in SPLITS]
        n = sum(len(v) for v in self.items.values())
        return f"{self.name}: {len(self.items)} classes, {n} images ({', '.join(parts)})"


def check_unique(names: list[str], source: str, what: str = "class name") -> None:
    """Refuse duplicates, including names that differ only in case or outer spaces."""
    seen: dict[str, str] = {}
    for name in names:
        key = name.strip().casefold()
        if key in seen:
            same = seen[key] == name
            detail = f"{name!r} twice" if same else f"{seen[key]!r} and {name!r}"
            raise TintError(f"{source}: duplicate {what} {detail}; rename or remove one")
        seen[key] = name


def validate_dataset(ds: FewShotDataset) -> None:
    """Structural checks every loader relies on; errors name ds.source."""
    source = ds.source or ds.name
    if ds.fit not in FITS:
        raise TintError(f"{source}: fit={ds.fit!r}; choose one of {', '.join(FITS)}")
    if ds.resolution is not None and ds.resolution < 1:
        raise TintError(f"{source}: resolution must be positive, got {ds.resolution}")
    check_unique(list(ds.items), source)
    for name, items in ds.items.items():
        if not name.strip() or "/" in name or "\\" in name or name in (".", ".."):
            raise TintError(
                f"{source}: class name {name!r} is not usable as a folder name; rename it"
            )
        if not items:
            raise TintError(f"{source}: class {name!r} has no images; add images or remove it")
    owner: dict[str, str] = {}
    for split, names in ds.splits.items():
        if split not in SPLITS:
            raise TintError(f"{source}: unknown split {split!r}; use base, val, novel")
        check_unique(names, source, f"class in split {split!r}")
        for name in names:
            if name not in ds.items:
                raise TintError(
                    f"{source}: split {split!r} names class {name!r}, which does not exist "
                    f"in the data ({len(ds.items)} classes found)"
                )
            if name in owner:
                raise TintError(
                    f"{source}: class {name!r} is in both split {owner[name]!r} and {split!r}"
                )
            owner[name] = split


def dataset_under(root: Path, name: str, items: dict[str, list[str]],
                  splits: dict[str, list[str]], resolution: int, fit: str,
                  source: str | Path | None = None, **extra: object) -> FewShotDataset:
    """A dataset whose item ids are relative to `root` (so episode files survive a move);
    validation errors name `source` (default: the root)."""
    return FewShotDataset(name=name, items=items, splits=splits, resolution=resolution,
                          root=str(Path(root).resolve()), fit=fit,
                          source=str(root if source is None else source), **extra)
