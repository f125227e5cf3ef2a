"""`tint fid`: FID on 64-dim features between real and generated images.

Two modes, picked from the folders given:

* **per-class protocol** (paper section 5.1) when both sides are organised by class
  (a folder of class sub-folders, or a generator output folder with ``manifest.jsonl``):
  300 generated vs 300 real images per class, averaged over 5 episodes of 5 classes;
* **two flat sets** otherwise (folders or files of images): one FID between them.

The output always says which feature set produced the number.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tint.devices import add_device_arguments, resolve_device
from tint.errors import TintError
from tint.evaluation.fid import (
    FEATURE_DESCRIPTIONS,
    FEATURE_SETS,
    DatasetImage,
    create_extractor,
    fid_between,
    fid_protocol,
)
from tint.io import set_threads, write_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def classes_in(path: Path) -> dict[str, list[Path]] | None:
    """Images by class, or None when `path` is not organised by class.

    A generator output folder (``manifest.jsonl``) gives its manifest's classes; a folder
    whose sub-folders hold images gives one class per sub-folder.
    """
    if not path.is_dir():
        return None
    from tint.generators.base import MANIFEST_NAME, read_manifest

    if (path / MANIFEST_NAME).is_file():
        by_class: dict[str, list[Path]] = {}
        for row in sorted(read_manifest(path), key=lambda r: (r["class"], int(r["index"]))):
            if (path / row["file"]).is_file():
                by_class.setdefault(row["class"], []).append(path / row["file"])
        return by_class
    subdirs = {d.name: _images_in(d) for d in sorted(path.iterdir()) if d.is_dir()}
    subdirs = {name: images for name, images in subdirs.items() if images}
    return subdirs or None


def flat_images(paths: list[Path], option: str) -> list[Path]:
    """All images named by `paths` (files, or the images directly inside folders)."""
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            images += _images_in(path)
        elif path.is_file():
            images.append(path)
        else:
            raise TintError(f"{option} {path}: no such file or folder")
    if len(images) < 2:
        raise TintError(f"{option}: found {len(images)} image(s); FID needs at least 2 per set")
    return images


def real_classes(args: argparse.Namespace) -> dict | None:
    """Real images by class (None: a flat set) from --real or --real-dataset."""
    if args.real_dataset is None:
        return classes_in(args.real[0]) if len(args.real) == 1 else None
    from tint.data.datasets import load_dataset

    dataset = load_dataset(args.real_dataset, resolution=args.resolution)
    return {name: [DatasetImage(dataset, item) for item in items]
            for name, items in dataset.items.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    real = parser.add_mutually_exclusive_group(required=True)
    real.add_argument("--real", nargs="+", type=Path,
                      help="real images: a folder of class sub-folders, a flat folder, or files")
    real.add_argument("--real-dataset", metavar="SPEC",
                      help="real images from a dataset (e.g. openclipart, folder:ROOT), per class")
    parser.add_argument("--resolution", type=int, default=84,
                        help="with --real-dataset: load its images at this size (default 84)")
    parser.add_argument("--generated", nargs="+", type=Path, required=True,
                        help="generated images: a generator output folder (manifest.jsonl), "
                             "a folder of class sub-folders, a flat folder, or files")
    parser.add_argument("--features", choices=FEATURE_SETS, default="efficientnet-lite0-64",
                        help="feature set (inception-64 needs --inception-weights); "
                             "default: the offline substitute")
    parser.add_argument("--inception-weights", type=Path, default=None,
                        help="pytorch-fid weights file pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--per-class", type=int, default=300, help="images per class and side")
    parser.add_argument("--episodes", type=int, default=5, help="number of episodes")
    parser.add_argument("--n-way", type=int, default=5, help="classes per episode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=50)
    add_device_arguments(parser, precision=False)  # features stay float32 on any device
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.per_class < 2 or args.episodes < 1 or args.n_way < 1:
        raise TintError("--per-class must be >= 2, --episodes and --n-way >= 1")
    real = real_classes(args)
    generated = classes_in(args.generated[0]) if len(args.generated) == 1 else None
    device = resolve_device(args.device, option="--device")
    extractor = create_extractor(args.features, args.inception_weights, device)
    description = FEATURE_DESCRIPTIONS[args.features]

    if real is not None and generated is not None:
        common = sorted(set(real) & set(generated))
        if not common:
            where = args.real_dataset or args.real[0]
            raise TintError(f"real images ({where}) and --generated {args.generated[0]} share no "
                            f"class names (real: {sorted(real)[:5]}, generated: {sorted(generated)[:5]})")
        report = fid_protocol(
            {c: real[c] for c in common}, {c: generated[c] for c in common}, extractor,
            n_per_class=args.per_class, n_episodes=args.episodes, n_way=args.n_way,
            seed=args.seed, batch_size=args.batch_size,
        )
        result = report.to_dict()
        print(f"features: {args.features} ({description})")
        for e, (classes, value) in enumerate(zip(report.episodes, report.per_episode, strict=True)):
            print(f"episode {e}: FID {value:.3f}  classes {', '.join(classes)}")
        print(f"FID ({args.features}, mean of {len(report.per_episode)} episodes): {report.mean:.3f}")
    else:
        if args.real is None:
            raise TintError(f"--real-dataset needs --generated to be organised by class (a "
                            f"generator output folder or class sub-folders): {args.generated}")
        images_real = flat_images(args.real, "--real")
        images_gen = flat_images(args.generated, "--generated")
        value = fid_between(images_real, images_gen, extractor, args.batch_size)
        result = {"features": args.features, "feature_description": description, "fid": value,
                  "n_real": len(images_real), "n_generated": len(images_gen)}
        print(f"features: {args.features} ({description})")
        print(f"FID ({args.features}): {value:.3f}  ({len(images_real)} real vs "
              f"{len(images_gen)} generated images)")
    if args.out is not None:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0
