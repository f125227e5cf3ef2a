"""Loaders for the on-disk layouts researchers already have.

- ``folder:<root>``: ``root/<class>/<images>``. Splits from ``root/splits/{base,val,novel}.txt``
  (one class per line, ``#`` comments; ``root/{base,val,novel}.txt`` also accepted) or
  ``root/splits.json`` (``{"base": [...], ...}``);
  without split files every class is novel.
- ``miniimagenet:<root>``: Ravi & Larochelle ``train.csv`` / ``val.csv`` / ``test.csv``
  (header ``filename,label``) -> base / val / novel; images in ``root/images/<filename>``
  (``root/images/<label>/<filename>`` also accepted).
- ``cub:<root>``: CUB-200-2011 ``root/images/<NNN.Class_name>/*.jpg``. Split from the same
  split files as ``folder`` when present; otherwise the split of Chen et al. (2019, "A
  Closer Look at Few-shot Classification"): classes sorted by folder name, index i with
  i % 2 == 0 -> base, i % 4 == 1 -> val, i % 4 == 3 -> novel (100 / 50 / 50 for CUB).
- ``cifar-fs:<root>``: CIFAR-100 python files ``train``, ``test``, ``meta`` (in ``root`` or
  ``root/cifar-100-python``) read by the restricted unpickler of `tint.data.arrays`, and
  Bertinetto et al.'s ``root/splits/bertinetto/{train,val,test}.txt`` -> base / val / novel.

Item ids are relative to the root; every error names the file at fault.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tint.data.arrays import get_key, safe_unpickle
from tint.data.base import SPLITS, FewShotDataset, check_unique, dataset_under
from tint.errors import TintError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise TintError(f"{path}: {what} not found (expected a folder)")
    return path


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def scan_class_folders(images_root: Path, root: Path) -> dict[str, list[str]]:
    """``images_root/<class>/<images>`` -> {class: [paths relative to root]}."""
    _require_dir(images_root, "image folder")
    items: dict[str, list[str]] = {}
    for folder in sorted(p for p in images_root.iterdir() if p.is_dir()):
        if folder.name.startswith(".") or (images_root == root and folder.name == "splits"):
            continue
        files = _image_files(folder)
        if not files:
            raise TintError(
                f"{folder}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        items[folder.name] = [f.relative_to(root).as_posix() for f in files]
    if not items:
        raise TintError(f"{images_root}: no class folders found (expected <root>/<class>/<images>)")
    check_unique(list(items), str(images_root))
    return items


def read_class_list(path: Path) -> list[str]:
    """One class name per line; blank lines and ``#`` comments ignored."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise TintError(f"{path}: cannot read split file ({err})") from err
    names = [line.split("#", 1)[0].strip() for line in lines]
    names = [n for n in names if n]
    check_unique(names, str(path))
    return names


def read_split_files(
    root: Path, names: dict[str, str] | None = None
) -> tuple[dict[str, list[str]], str] | None:
    """Splits from ``root/splits.json``, ``root/splits/<stem>.txt`` or ``root/<stem>.txt``.

    None when there are none.

    `names` maps our split names to file stems (default: base/val/novel).
    Returns (splits, the file(s) read, for error messages).
    """
    names = names or {s: s for s in SPLITS}
    json_file = root / "splits.json"
    if json_file.is_file():
        try:
            data = json.loads(json_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise TintError(f"{json_file}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise TintError(f"{json_file}: expected an object with base/val/novel lists")
        unknown = sorted(set(data) - set(SPLITS) - {"how"})
        if unknown:
            raise TintError(f"{json_file}: unknown split(s) {unknown}; use base, val, novel")
        splits = {}
        for split in SPLITS:
            value = data.get(split, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TintError(f"{json_file}: {split!r} must be a list of class names")
            splits[split] = value
        return splits, str(json_file)
    for folder in (root / "splits", root):
        files = {split: folder / f"{stem}.txt" for split, stem in names.items()}
        present = {split: f for split, f in files.items() if f.is_file()}
        if present:
            break
    else:
        return None
    splits = {split: read_class_list(f) for split, f in present.items()}
    return splits, ", ".join(str(f) for f in present.values())


def _check_split_classes(
    splits: dict[str, list[str]], items: dict[str, list[str]], source: str
) -> None:
    for split, classes in splits.items():
        for name in classes:
            if name not in items:
                raise TintError(
                    f"{source}: split {split!r} names class {name!r}, which is not in the data"
                )


def load_folder(
    root: str | Path, resolution: int = 84, fit: str = "crop", crop_alpha: bool = False
) -> FewShotDataset:
    """``folder:<root>``: class folders plus optional split files (else all novel)."""
    root = _require_dir(Path(root), "dataset folder")
    items = scan_class_folders(root, root)
    found = read_split_files(root)
    if found is None:
        splits, source = {"base": [], "val": [], "novel": sorted(items)}, str(root)
    else:
        splits, source = found
        _check_split_classes(splits, items, source)
    return dataset_under(root, f"folder:{root.name}", items, splits, resolution, fit,
                         source=source, crop_alpha=crop_alpha)


def _read_csv_split(csv_file: Path, root: Path) -> dict[str, list[str]]:
    """One Ravi & Larochelle CSV -> {label: [image paths relative to root]}."""
    if not csv_file.is_file():
        raise TintError(f"{csv_file}: split CSV not found (miniImageNet needs train/val/test.csv)")
    items: dict[str, list[str]] = {}
    with open(csv_file, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["filename", "label"]:
            raise TintError(f"{csv_file}: expected the header 'filename,label', got {header}")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise TintError(f"{csv_file}:{line_no}: expected 'filename,label', got {row}")
            filename, label = row[0].strip(), row[1].strip()
            rel = _find_mini_image(root, filename, label, f"{csv_file}:{line_no}")
            items.setdefault(label, []).append(rel)
    if not items:
        raise TintError(f"{csv_file}: no rows below the header")
    return {label: sorted(paths) for label, paths in items.items()}


def _find_mini_image(root: Path, filename: str, label: str, where: str) -> str:
    for rel in (f"images/{filename}", f"images/{label}/{filename}"):
        if (root / rel).is_file():
            return rel
    raise TintError(f"{where}: image {filename} not found in {root / 'images'}")


def load_miniimagenet(root: str | Path, resolution: int = 84, fit: str = "crop") -> FewShotDataset:
    """``miniimagenet:<root>``: train/val/test.csv -> base/val/novel classes."""
    root = _require_dir(Path(root), "miniImageNet folder")
    _require_dir(root / "images", "miniImageNet images folder")
    items: dict[str, list[str]] = {}
    splits: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    for split, stem in zip(SPLITS, ("train", "val", "test"), strict=True):
        csv_file = root / f"{stem}.csv"
        part = _read_csv_split(csv_file, root)
        for label in part:
            if label in where:
                raise TintError(f"{csv_file}: class {label!r} is also in {where[label]}")
            where[label] = str(csv_file)
        items.update(part)
        splits[split] = sorted(part)
    return dataset_under(root, "miniimagenet", items, splits, resolution, fit)


def closer_look_split(classes: list[str]) -> dict[str, list[str]]:
    """Chen et al. 2019 CUB split by sorted index: even base, i%4==1 val, i%4==3 novel."""
    ordered = sorted(classes)
    return {
        "base": [c for i, c in enumerate(ordered) if i % 2 == 0],
        "val": [c for i, c in enumerate(ordered) if i % 4 == 1],
        "novel": [c for i, c in enumerate(ordered) if i % 4 == 3],
    }


def load_cub(root: str | Path, resolution: int = 84, fit: str = "crop") -> FewShotDataset:
    """``cub:<root>``: CUB-200-2011 image folders, split files or the Closer Look split."""
    root = _require_dir(Path(root), "CUB folder")
    items = scan_class_folders(root / "images", root)
    found = read_split_files(root)
    if found is None:
        splits, source = closer_look_split(list(items)), str(root / "images")
    else:
        splits, source = found
        _check_split_classes(splits, items, source)
    return dataset_under(root, "cub", items, splits, resolution, fit, source=source)


def _cifar_dir(root: Path) -> Path:
    for candidate in (root, root / "cifar-100-python"):
        if (candidate / "meta").is_file():
            return candidate
    raise TintError(
        f"{root}: CIFAR-100 python files not found (expected meta, train, test here or in cifar-100-python/)"
    )


def _as_text(name: object) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def load_cifar_fs(root: str | Path, resolution: int = 84, fit: str = "crop") -> FewShotDataset:
    """``cifar-fs:<root>``: CIFAR-100 pickles (read safely) + Bertinetto split files."""
    root = _require_dir(Path(root), "CIFAR-FS folder")
    data_dir = _cifar_dir(root)
    meta_file = data_dir / "meta"
    names = [_as_text(n) for n in get_key(safe_unpickle(meta_file), "fine_label_names", meta_file)]
    check_unique(names, str(meta_file))
    items: dict[str, list[str]] = {name: [] for name in names}
    for part in ("train", "test"):
        part_file = data_dir / part
        if not part_file.is_file():
            raise TintError(f"{part_file}: CIFAR-100 file not found")
        labels = list(get_key(safe_unpickle(part_file), "fine_labels", part_file))
        rel = part_file.relative_to(root).as_posix()
        for index, label in enumerate(labels):
            if not isinstance(label, int) or not 0 <= label < len(names):
                raise TintError(
                    f"{part_file}: label {label!r} at index {index} is not a class index"
                )
            items[names[label]].append(f"{rel}#{index}")
    split_dir = root / "splits" / "bertinetto"
    if not split_dir.is_dir():
        raise TintError(
            f"{split_dir}: CIFAR-FS split files (train.txt, val.txt, test.txt) not found"
        )
    splits = {}
    for split, stem in zip(SPLITS, ("train", "val", "test"), strict=True):
        split_file = split_dir / f"{stem}.txt"
        if not split_file.is_file():
            raise TintError(f"{split_file}: CIFAR-FS split file not found")
        splits[split] = read_class_list(split_file)
        _check_split_classes({split: splits[split]}, items, str(split_file))
    used = {c for classes in splits.values() for c in classes}
    items = {c: its for c, its in items.items() if c in used}  # CIFAR-FS uses its 100 classes
    return dataset_under(root, "cifar-fs", items, splits, resolution, fit, source=str(split_dir))
