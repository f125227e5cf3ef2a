"""Time textual inversion (per step) and null-text inversion (per image, full run).

Paper figures per image on an A40 with SD 1.5 (Sec. 5.5 / A.4): TI 0.30 s, NTI 0.05 s
(TI's 5000 steps per class divided over the images). This script measures our code on the
tiny random model here (or SD 1.5's architecture with random weights on a GPU):

    OMP_NUM_THREADS=1 python benchmarks/bench_inversion.py --backbone tiny --threads 1
    python benchmarks/bench_inversion.py --backbone sd15-random --device cuda

Reported: median over `--repeats` of seconds per TI optimizer step, of one full NTI
(`--nti-steps` DDIM steps x 10 inner Adam steps, the paper's default schedule), and, for
reference, one guidance-1 DDIM inversion and one CFG sampling run. Random weights rarely
trigger NTI's early stop, so the NTI time is near the 10-inner-step worst case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from tint.diffusion.backbone import load_backbone
from tint.diffusion.ddim import ddim_invert, ddim_sample
from tint.diffusion.null_text import NullTextConfig, null_text_inversion
from tint.diffusion.textual_inversion import TextualInversionConfig, textual_inversion

BUILT_SPECS = ("tiny", "tiny-pixel-v", "sd15-random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tiny",
                        help="tiny | tiny-pixel-v | sd15-random | model folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ti-steps", type=int, default=20, help="TI steps per timed run")
    parser.add_argument("--nti-steps", type=int, default=50, help="DDIM steps of one NTI")
    parser.add_argument("--nti-repeats", type=int, default=3)
    parser.add_argument("--shots", type=int, default=5, help="support images for TI")
    return parser.parse_args(argv)


def median_seconds(run: Callable[[], object], repeats: int, sync: Callable[[], None]) -> list[float]:
    """Wall-clock seconds of `repeats` runs after one untimed warm-up run."""
    run()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return times


def support_images(k: int, side: int) -> torch.Tensor:
    coarse = torch.rand(k, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        return benchmark(args, workdir)


def benchmark(args: argparse.Namespace, workdir: str) -> int:
    kwargs: dict = {"workdir": workdir} if args.backbone in BUILT_SPECS else {}
    if args.backbone == "sd15-random":
        kwargs["device"] = args.device
    backbone = load_backbone(args.backbone, **kwargs)
    backbone.unet.to(args.device)
    backbone.vae.to(args.device)
    backbone.text_encoder.to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    images = support_images(args.shots, backbone.resolution)
    counter = iter(range(10**6))

    def ti_run() -> None:  # a fresh placeholder per run (each run adds a token)
        config = TextualInversionConfig(placeholder=f"<bench-{next(counter)}>",
                                        steps=args.ti_steps, log_every=0)
        textual_inversion(backbone, images, config, progress=False)

    ti_times = median_seconds(ti_run, args.repeats, sync)
    z0 = backbone.encode_images(images[:1])
    cond = backbone.encode_prompt(["a photo of an object"])
    uncond = backbone.encode_prompt([""])
    nti_config = NullTextConfig(num_steps=args.nti_steps)
    inner_used: list[int] = []

    def nti_run() -> None:
        result = null_text_inversion(backbone, z0, cond, uncond, nti_config)
        inner_used.extend(result.inner_steps_used)

    nti_times = median_seconds(nti_run, args.nti_repeats, sync)
    invert_times = median_seconds(
        lambda: ddim_invert(backbone, z0, cond, num_steps=args.nti_steps), args.repeats, sync)
    sample_times = median_seconds(
        lambda: ddim_sample(backbone, torch.randn_like(z0), cond, uncond, guidance=7.5,
                            num_steps=args.nti_steps), args.repeats, sync)
    params = sum(p.numel() for p in backbone.unet.parameters())
    report = {
        "backbone": args.backbone,
        "unet_params": params,
        "latent_shape": list(backbone.latent_shape),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "ti_seconds_per_step": statistics.median(ti_times) / args.ti_steps,
        "nti_seconds_per_image": statistics.median(nti_times),
        "nti_mean_inner_steps": sum(inner_used) / max(len(inner_used), 1),
        "ddim_invert_seconds": statistics.median(invert_times),
        "ddim_sample_cfg_seconds": statistics.median(sample_times),
        "nti_ddim_steps": args.nti_steps,
        "repeats": {"ti": args.repeats, "nti": args.nti_repeats},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
