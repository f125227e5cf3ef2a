"""The openclipart few-shot set, built from Debian's ``openclipart-png`` package.

Layout of ``/usr/share/openclipart/png``: 22 top-level folders (``animals``, ``food``,
...) with nested sub-folders (``animals/birds``, ``food/fruit``, ...); about 1,200 of the
~8,100 entries are symlinks to files elsewhere in the tree. Decisions made here:

- **Category = one folder's own files**, named by its path relative to the root with
  ``/`` replaced by ``.`` (``animals/birds`` -> ``"animals.birds"``), so a class name is
  always one safe path component. A folder's files do not include its sub-folders'
  files, so ``"animals"`` holds the animals not sorted further (frogs, lizards, ...). Top-level
  folders are too broad to be classes (``food`` would swallow ``food/fruit``).
- **Distinct real files only**: symlinks are dropped, and byte-identical files (same
  SHA-256) are kept once, at the first path in sorted order. Lists are sorted, so the
  scan is deterministic. Files over PIL's decompression-bomb limit (15 of them, up to
  21k x 30k pixels) are dropped too: `skipped_files` lists them with the reason.
- **Abstract categories are dropped** (``ABSTRACT_CATEGORIES``): icons, buttons, shapes,
  stars, arrows, gradients, patterns, decorations, logos, flags, pictograms, card decks
  and the unsorted catch-all. They are designs, not objects.
- **Loading**: `load_openclipart` (``load_dataset("openclipart")``) crops each image to
  its visible pixels, composites it over white and pads it to a square.
- **Split**: categories with at least ``MIN_IMAGES`` (20) distinct images are split into
  base / val / novel classes by a seeded permutation (see ``make_split``); the result is
  committed as ``tint/data/splits/openclipart.json`` and read by ``load_split``.

Typical use (e.g. pretraining a generator on everything except val/novel classes)::

    from tint.data.openclipart import load_split, pretraining_pool, crop_to_alpha
    pool = pretraining_pool(load_split())       # {category: [absolute png paths]}
    img = crop_to_alpha(PIL.Image.open(pool["food.fruit"][0]))   # RGB on white

The root can be moved with the environment variable ``TINT_OPENCLIPART_ROOT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from tint.data.base import FewShotDataset
from tint.data.images import to_rgb
from tint.errors import TintError

DEFAULT_ROOT = Path(os.environ.get("TINT_OPENCLIPART_ROOT", "/usr/share/openclipart/png"))
SPLIT_FILE = Path(__file__).parent / "splits" / "openclipart.json"
MIN_IMAGES = 20
SPLIT_SEED = 0
IMAGE_SUFFIXES = (".png",)
SEP = "."  # "animals/birds" folder -> "animals.birds" class: a class name is one path component


def category_name(folder: str) -> str:
    """Folder path relative to the root -> category name ("food/fruit" -> "food.fruit")."""
    return folder.replace("/", SEP)


def category_folder(category: str) -> str:
    """Category name -> folder path relative to the root."""
    return category.replace(SEP, "/")


# A prefix drops the folder and every folder below it; EXACT drops only that folder
# (its sub-folders may hold real objects, e.g. "computer/hardware").
ABSTRACT_CATEGORIES: dict[str, str] = {
    "buttons": "GUI buttons",
    "computer.buttons": "GUI buttons",
    "computer.icons": "desktop icon themes",
    "computer.folders": "folder icons",
    "computer.diagrams": "network diagrams",
    "computer.network": "network icons",
    "decorations": "ornaments and borders",
    "logos": "logos",
    "recreation.games.cards": "card decks: one folder per printing style of the same 54 cards",
    "shapes": "geometric shapes, stars, arrows, callouts, flowcharts, jigsaw pieces",
    "signs_and_symbols.awards": "symbols",
    "signs_and_symbols.disability": "symbols",
    "signs_and_symbols.flags": "flags (flat designs)",
    "signs_and_symbols.hazard": "hazard symbols",
    "signs_and_symbols.led": "LED buttons",
    "signs_and_symbols.map_symbols": "map pictograms",
    "signs_and_symbols.money": "currency symbols",
    "special": "gradients, patterns, templates",
    "transportation.aiga-symbols": "pictograms",
    "unsorted": "unsorted catch-all",
}
ABSTRACT_EXACT: dict[str, str] = {
    "computer": "mixed icons and arrows (its sub-folder hardware is kept)",
    "signs_and_symbols": "mixed signs and symbols (clocks and weather are kept)",
}


def is_abstract(category: str) -> bool:
    """True when a category is a design rather than an object class (see the lists above)."""
    if category in ABSTRACT_EXACT:
        return True
    return any(category == p or category.startswith(p + SEP) for p in ABSTRACT_CATEGORIES)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unloadable(path: Path) -> str | None:
    """Why a file cannot be used (header unreadable, or over PIL's bomb limit), else None.

    Reads only the header: a handful of openclipart PNGs are 10k-30k pixels wide
    (up to 623 million pixels, gigabytes once decoded) and would stop any loader.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels"
    except (OSError, SyntaxError, ValueError) as err:
        return f"unreadable ({err})"
    return "zero-size" if width * height == 0 else None


Scan = tuple[tuple[tuple[str, tuple[str, ...]], ...], tuple[tuple[str, str], ...]]


@lru_cache(maxsize=4)
def _scan_cached(root: str, pixel_limit: int | None) -> Scan:
    base = Path(root)
    if not base.is_dir():
        raise TintError(
            f"{base}: openclipart not found; install the Debian package openclipart-png "
            "or set TINT_OPENCLIPART_ROOT"
        )
    folders: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames.sort()
        rel = Path(dirpath).relative_to(base).as_posix()
        if rel == ".":
            continue  # the root holds only category folders
        files = [Path(dirpath) / name for name in sorted(filenames)]
        folders[category_name(rel)] = [
            f for f in files if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_symlink()
        ]
    seen: set[str] = set()
    result, skipped = [], []
    for category in sorted(folders):
        kept = []
        for path in folders[category]:  # sorted walk: first path in sorted order wins
            digest = _sha256(path)
            if digest in seen:
                skipped.append((str(path), "byte-identical duplicate"))
                continue
            seen.add(digest)
            reason = _unloadable(path)
            if reason:
                skipped.append((str(path), reason))
            else:
                kept.append(str(path))
        result.append((category, tuple(kept)))
    return tuple(result), tuple(skipped)


def _scan(root: str | Path) -> Scan:
    return _scan_cached(str(Path(root).resolve()), Image.MAX_IMAGE_PIXELS)


def scan_openclipart(root: str | Path = DEFAULT_ROOT) -> dict[str, list[str]]:
    """Every category (abstract and small ones included) -> its distinct usable files.

    Paths are absolute strings, sorted; categories are sorted. Symlinks, byte-identical
    duplicates and files too large to decode safely (see `skipped_files`) are left out;
    folders with only symlinks map to an empty list. Cached per root (~2-4 s the first
    time: every file is hashed and its header read).
    """
    return {cat: list(files) for cat, files in _scan(root)[0]}


def skipped_files(root: str | Path = DEFAULT_ROOT) -> dict[str, str]:
    """Real (non-symlink) files the scan left out -> why (duplicate, too large, unreadable)."""
    return dict(_scan(root)[1])


def usable_categories(root: str | Path = DEFAULT_ROOT) -> dict[str, list[str]]:
    """Non-abstract, non-empty categories -> files."""
    return {c: f for c, f in scan_openclipart(root).items() if f and not is_abstract(c)}


def eligible_categories(root: str | Path = DEFAULT_ROOT, min_images: int = MIN_IMAGES) -> list[str]:
    """Usable categories with at least `min_images` distinct images: the few-shot classes."""
    return sorted(c for c, f in usable_categories(root).items() if len(f) >= min_images)


SPLIT_HOW = (
    "Categories = folders of /usr/share/openclipart/png (own files only, named by the path "
    "relative to the root with / replaced by .), symlinks and byte-identical duplicates "
    "(SHA-256) and files over PIL's decompression-bomb limit removed, abstract categories removed (tint.data.openclipart.ABSTRACT_CATEGORIES / ABSTRACT_EXACT). "
    "Eligible: >= {min_images} distinct images. Split: names sorted, permuted with "
    "numpy.random.default_rng({seed}).permutation; the first n_novel = max(5, round(0.2 n)) "
    "are novel, the next n_val = max(5, round(0.2 n)) val, the rest base; each list sorted. "
    "Reproduce with tint.data.openclipart.make_split()."
)


def make_split(
    categories: list[str], seed: int = SPLIT_SEED, min_images: int = MIN_IMAGES
) -> dict[str, object]:
    """Seeded ~60/20/20 base/val/novel split of class names (at least 5 val and 5 novel)."""
    names = sorted(categories)
    n_novel = n_val = max(5, round(0.2 * len(names)))
    if len(names) < n_novel + n_val + 5:
        raise TintError(f"only {len(names)} eligible openclipart categories; need >= 15")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    return {
        "base": sorted(order[n_novel + n_val :]),
        "val": sorted(order[n_novel : n_novel + n_val]),
        "novel": sorted(order[:n_novel]),
        "how": SPLIT_HOW.format(min_images=min_images, seed=seed),
        "seed": seed,
        "min_images": min_images,
    }


def load_split(path: str | Path = SPLIT_FILE) -> dict[str, list[str]]:
    """The committed base/val/novel class lists."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TintError(f"{path}: cannot read the openclipart split file ({err})") from err
    missing = [k for k in ("base", "val", "novel") if not isinstance(data.get(k), list)]
    if missing:
        raise TintError(f"{path}: split file lacks the list(s) {', '.join(missing)}")
    return {k: list(data[k]) for k in ("base", "val", "novel")}


def _held_out(category: str, held: set[str], base: set[str]) -> bool:
    """A val/novel class, or a small sub-folder of one (penguins are birds).

    Base classes are never held out, even below a val/novel catch-all folder.
    """
    if category in base:
        return False
    return any(category == h or category.startswith(h + SEP) for h in held)


def pretraining_pool(
    split: dict[str, list[str]] | None = None,
    root: str | Path = DEFAULT_ROOT,
    include_abstract: bool = False,
) -> dict[str, list[str]]:
    """All usable images of every category that is not a val/novel class (or below one).

    Sub-folders of a val/novel class are held out with it unless they are base classes
    themselves (``buildings.homes`` is base although ``buildings`` may be novel).

    Small categories are included; abstract ones are not unless `include_abstract`
    (about 1.5k images without them, about 6.2k with them: icons and shapes still teach
    the clip-art drawing style). This is what a generator may be pretrained on without
    seeing the classes it will be evaluated on.
    """
    split = load_split() if split is None else split
    held = set(split.get("val", [])) | set(split.get("novel", []))
    base = set(split.get("base", []))
    pool = scan_openclipart(root) if include_abstract else usable_categories(root)
    return {c: f for c, f in pool.items() if f and not _held_out(c, held, base)}


def crop_to_alpha(img: Image.Image) -> Image.Image:
    """Crop to the bounding box of visible pixels, then composite over white (RGB).

    Many objects are small on big transparent canvases; without the crop they shrink
    to a few pixels at 84x84. Images without transparency are only converted to RGB.
    """
    return to_rgb(img, crop_alpha=True)


def load_openclipart(
    root: str | Path = DEFAULT_ROOT,
    resolution: int = 84,
    split_file: str | Path = SPLIT_FILE,
    fit: str = "pad",
) -> FewShotDataset:
    """The few-shot dataset: eligible categories, committed split, ids relative to root.

    Images are cropped to their visible pixels and padded with white to a square
    (``fit="pad"``), so long objects are never cut.
    """
    root = Path(root)
    split = load_split(split_file)
    usable = usable_categories(root)
    base = root.resolve()
    classes = [c for names in split.values() for c in names]
    items = {}
    for name in classes:
        if name not in usable:
            raise TintError(
                f"{split_file}: class {name!r} is not a usable openclipart category under {root}"
            )
        items[name] = [Path(f).relative_to(base).as_posix() for f in usable[name]]
    return FewShotDataset(
        name="openclipart",
        items=items,
        splits=split,
        resolution=resolution,
        root=str(base),
        crop_alpha=True,
        fit=fit,
        source=str(split_file),
    )
