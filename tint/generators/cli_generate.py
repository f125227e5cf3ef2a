"""`tint generate`: synthetic images from the specialisation artifacts of `tint specialize`.

Images go to ``--out/<class>/NNNNNN.png`` at the dataset's resolution, with one manifest row
each in ``--out/manifest.jsonl``. Re-running makes only the images that are missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tint.devices import add_device_arguments, device_and_precision, sampling_dtype
from tint.diffusion.backbone import compile_unet
from tint.errors import TintError
from tint.generators import create_generator
from tint.generators.base import MANIFEST_NAME, list_artifacts, load_artifact, settings_from
from tint.generators.cli import RUN_FILE, load_backbone_on
from tint.io import read_json, set_threads

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", type=Path, required=True,
                        help="folder written by `tint specialize`")
    parser.add_argument("--out", type=Path, required=True, help="image folder (+ manifest.jsonl)")
    parser.add_argument("--n-per-class", type=int, default=100, help="images per class")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="noise blend (Eq. 3): 0 = the support's inversion, 1 = pure noise")
    parser.add_argument("--alpha-range", type=float, nargs=2, metavar=("LO", "HI"),
                        help="draw alpha uniformly in [LO, HI] per image (overrides --alpha)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per UNet call (memory only: it never changes an image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", nargs="+", help="only these classes (default: all)")
    parser.add_argument("--resolution", type=int,
                        help="output size (default: the dataset resolution in the artifact)")
    parser.add_argument("--backbone", help="default: the one the artifacts were made with")
    add_device_arguments(parser)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="UNet/VAE weights for sampling (default: from --precision: "
                             "float32 on the CPU, bfloat16 on CUDA)")
    parser.add_argument("--vae-slicing", type=int, default=None, metavar="N",
                        help="decode N images at a time (memory of big batches at 512px)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet (pays off only for thousands of images)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    artifacts = list_artifacts(args.artifacts)
    if not artifacts:
        raise TintError(f"{args.artifacts}: no artifacts (*.safetensors); run `tint specialize`")
    metas = {path: load_artifact(path)[1] for path in artifacts}
    if args.classes:
        wanted = set(args.classes)
        unknown = wanted - {m["class"] for m in metas.values()}
        if unknown:
            raise TintError(f"--classes: no artifact for {sorted(unknown)} in {args.artifacts}")
        metas = {p: m for p, m in metas.items() if m["class"] in wanted}
    names = sorted({m["generator"] for m in metas.values()})
    settings_by_generator = {name: _settings(create_generator(name), args) for name in names}
    backbone_spec = args.backbone or _recorded_backbone(args.artifacts, metas)
    device, precision = device_and_precision(args)
    dtype = DTYPES[args.dtype] if args.dtype else sampling_dtype(precision)
    backbone = load_backbone_on(backbone_spec, device, dtype, vae_slice_size=args.vae_slicing)
    if args.compile:
        compile_unet(backbone)
    made = 0
    for path, meta in tqdm(list(metas.items()), desc="generate", unit="class"):
        generator = create_generator(meta["generator"])
        settings = settings_by_generator[meta["generator"]]
        paths = generator.generate(backbone, path, args.n_per_class, args.out, args.seed, settings)
        made += len(paths)
    print(f"tint generate: {made} images for {len(metas)} classes in {args.out} "
          f"(manifest: {args.out / MANIFEST_NAME})")
    return 0


def _settings(generator, args: argparse.Namespace):
    """The generator's GenerateSettings from the flags it has, checked before any image."""
    values = {"alpha": args.alpha, "alpha_range": args.alpha_range, "batch_size": args.batch_size,
              "resolution": args.resolution}
    cls = generator.GenerateSettings
    known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__ and v is not None}
    return settings_from(cls, known, "")


def _recorded_backbone(folder: Path, metas: dict) -> str:
    specs = {m.get("backbone") for m in metas.values()} - {None}
    if not specs and (folder / RUN_FILE).is_file():
        specs = {read_json(folder / RUN_FILE).get("backbone")} - {None}
    if len(specs) != 1:
        raise TintError(f"{folder}: cannot tell which backbone made the artifacts "
                        f"({sorted(specs) or 'none recorded'}); pass --backbone")
    return specs.pop()
