"""Does null-text inversion survive bf16 autocast? Reconstruction error against float32.

The precision policy (docs/diffusion.md) allows NTI under bf16 autocast only if its
reconstruction error stays within 2x of float32. For each backbone and support image this
runs NTI twice from the same inputs, in float32 and under bf16 autocast (weights float32,
optimised embeddings float32, UNet calls in bf16), then samples both results back with CFG
in float32 and compares the MSE to z_0 (also plain DDIM inversion's, the no-NTI baseline).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nti_precision.py --backbone tiny tint-clipart \\
        --out benchmarks/results/nti_precision.json

On a GPU: add ``--device cuda`` (benchmarks/gpu_check.py runs it for sd15-random).
Random-weight models (tiny, sd15-random) need NTI lr 0.1 to show its effect (DESIGN.md);
trained ones use the paper's 1e-2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from tint.devices import autocast, device_name, resolve_device
from tint.diffusion.backbone import load_backbone
from tint.diffusion.ddim import ddim_sample
from tint.diffusion.null_text import NullTextConfig, null_text_inversion_batched
from tint.io import write_json

RANDOM_WEIGHTS = ("tiny", "tiny-pixel-v", "sd15-random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", nargs="+", default=["tiny", "tint-clipart"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--supports", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (paper: 50)")
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side (default: the model's; e.g. 256 for sd15-random on CPU)")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def support_images(count: int, side: int) -> torch.Tensor:
    from tint.data.datasets import load_dataset

    dataset = load_dataset("openclipart", resolution=side)
    name = dataset.classes("novel")[0]
    return dataset.load_tensor(dataset.items[name][:count])


def reconstruction_mse(backbone, results, cond, z0, config: NullTextConfig) -> list[float]:
    """Per support: MSE to z_0 after CFG sampling from z_T with its optimised u_t (fp32)."""
    out = []
    for k, result in enumerate(results):
        z = ddim_sample(backbone, result.z_T, cond, result.uncond_embeddings[:, None],
                        config.guidance, config.num_steps)
        out.append(float(((z.cpu() - z0[k:k + 1].cpu()) ** 2).mean()))
    return out


def plain_mse(backbone, results, cond, empty, z0, config: NullTextConfig) -> list[float]:
    z_T = torch.cat([r.z_T for r in results])
    z = ddim_sample(backbone, z_T, cond, empty, config.guidance, config.num_steps)
    return ((z.cpu() - z0.cpu()) ** 2).flatten(1).mean(1).tolist()


def measure(spec: str, args: argparse.Namespace, device: torch.device) -> dict:
    backbone = load_backbone(spec, device=device)
    if args.resolution:
        backbone.resolution = args.resolution
    z0 = backbone.encode_images(support_images(args.supports, backbone.resolution))
    cond = backbone.encode_prompt(["a photo of an object"])
    empty = backbone.encode_prompt([""])
    lr = 0.1 if spec in RANDOM_WEIGHTS else 1e-2
    schedule = "constant" if spec in RANDOM_WEIGHTS else "decay"
    config = NullTextConfig(num_steps=args.steps, inner_steps=args.inner_steps, lr=lr,
                            schedule=schedule)
    fp32 = null_text_inversion_batched(backbone, z0, cond, empty, config)
    with autocast(device, "bf16"):
        bf16 = null_text_inversion_batched(backbone, z0, cond, empty, config)
    err32 = reconstruction_mse(backbone, fp32, cond, z0, config)
    err16 = reconstruction_mse(backbone, bf16, cond, z0, config)
    ratios = [b / a for a, b in zip(err32, err16, strict=True)]
    return {
        "backbone": spec, "latent_shape": [z0.shape[1], z0.shape[2], z0.shape[3]],
        "lr": lr, "schedule": schedule,
        "plain_inversion_mse": plain_mse(backbone, fp32, cond, empty, z0, config),
        "fp32_mse": err32, "bf16_autocast_mse": err16, "bf16_over_fp32": ratios,
        "median_ratio": statistics.median(ratios), "within_2x": max(ratios) <= 2.0,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = [measure(spec, args, device) for spec in args.backbone]
    for row in rows:
        print(f"{row['backbone']:>14}: plain {statistics.median(row['plain_inversion_mse']):.2e}, "
              f"NTI fp32 {statistics.median(row['fp32_mse']):.2e}, bf16 "
              f"{statistics.median(row['bf16_autocast_mse']):.2e}, ratio per support "
              f"{', '.join(f'{r:.2f}' for r in row['bf16_over_fp32'])}")
    if args.out is not None:
        write_json(args.out, {
            "command": "python benchmarks/nti_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": device_name(device), "threads": args.threads,
            "settings": {k: v for k, v in vars(args).items() if k not in ("backbone", "out")},
            "results": rows,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
