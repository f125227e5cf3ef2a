"""Batched null-text inversion against one support at a time: images per second.

The K supports of a class are inverted in one batched optimisation (one UNet call per inner
step for all K still optimising) or one after the other. Both compute the same thing up to
rounding (tests/test_ddim_nti.py); this measures the speed. The supports are real clip-art
images of one class, resized to the model's resolution.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_nti_batched.py \\
        --backbone tiny tint-clipart --threads 1 --out benchmarks/results/nti_batched.json

Reported per backbone: the median seconds over `--repeats` runs (after one untimed warm-up
run of each) of inverting the K supports, images/s, the ratio batched / one-at-a-time, the
mean inner steps used (early stops), and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tint.devices import device_name, resolve_device, synchronize
from tint.diffusion.backbone import load_backbone
from tint.diffusion.null_text import (
    NullTextConfig,
    null_text_inversion,
    null_text_inversion_batched,
)
from tint.io import write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", nargs="+", default=["tiny", "tint-clipart"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--supports", type=int, default=5, help="K: supports of one class")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (paper: 50)")
    parser.add_argument("--inner-steps", type=int, default=10, help="Adam steps per DDIM step")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--schedule", default="decay", choices=("decay", "constant"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args(argv)


def support_images(count: int, side: int) -> torch.Tensor:
    """The first `count` images of the first novel clip-art class (Debian openclipart-png),
    [K,3,side,side] in [0,1]."""
    from tint.data.datasets import load_dataset

    dataset = load_dataset("openclipart", resolution=side)
    name = dataset.classes("novel")[0]
    return dataset.load_tensor(dataset.items[name][:count])


def timed(run, repeats: int, device: torch.device) -> tuple[list[float], object]:
    result = run()  # warm-up (and the result to compare)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, result


def bench_backbone(spec: str, args: argparse.Namespace, device: torch.device) -> dict:
    backbone = load_backbone(spec, device=device)
    images = support_images(args.supports, backbone.resolution)
    z0 = backbone.encode_images(images)
    cond = backbone.encode_prompt(["a photo of an object"])
    empty = backbone.encode_prompt([""])
    config = NullTextConfig(num_steps=args.steps, inner_steps=args.inner_steps, lr=args.lr,
                            schedule=args.schedule)

    def one_at_a_time():
        return [null_text_inversion(backbone, z0[k:k + 1], cond, empty, config)
                for k in range(args.supports)]

    def batched():
        return null_text_inversion_batched(backbone, z0, cond, empty, config)

    single_times, single = timed(one_at_a_time, args.repeats, device)
    batched_times, many = timed(batched, args.repeats, device)
    single_s, batched_s = statistics.median(single_times), statistics.median(batched_times)
    used = [sum(r.inner_steps_used) / len(r.inner_steps_used) for r in single]
    return {
        "backbone": spec,
        "unet_parameters": sum(p.numel() for p in backbone.unet.parameters()),
        "latent_shape": list(backbone.latent_shape),
        "one_at_a_time_s": single_times, "batched_s": batched_times,
        "one_at_a_time_images_per_s": args.supports / single_s,
        "batched_images_per_s": args.supports / batched_s,
        "speedup": single_s / batched_s,
        "mean_inner_steps": statistics.mean(used),
        "max_abs_diff_z_T": max(float((a.z_T - b.z_T).abs().max()) for a, b in zip(single, many, strict=True)),
        "max_abs_diff_uncond": max(float((a.uncond_embeddings - b.uncond_embeddings).abs().max())
                                   for a, b in zip(single, many, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = [bench_backbone(spec, args, device) for spec in args.backbone]
    report = {
        "command": "python benchmarks/bench_nti_batched.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"device": device_name(device), "cpu": platform.processor() or platform.machine(),
                    "threads": args.threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("backbone", "out")},
        "results": rows,
    }
    for row in rows:
        print(f"{row['backbone']:>14}: one at a time {row['one_at_a_time_images_per_s']:.3f} img/s, "
              f"batched {row['batched_images_per_s']:.3f} img/s, x{row['speedup']:.2f} "
              f"(mean inner steps {row['mean_inner_steps']:.2f}, max |dz_T| {row['max_abs_diff_z_T']:.1e})")
    if args.out is not None:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
