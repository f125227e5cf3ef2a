"""Inference speed of exported students: torch eager vs TorchScript vs onnxruntime.

Images per second for Conv4 and ResNet12 (random weights: speed does not depend on
them) at 84x84, batch 1 and 64, on this CPU. Each figure is the median over `--repeats`
timed runs after warm-up; a run at batch 1 makes `--calls-per-run` calls so the timer
is not dominated by noise. Ratios are against torch eager with the same thread count.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_latency.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tint.export import export_onnx, export_torchscript, onnx_session
from tint.students import create_student


def images_per_second(fn: Callable[[], object], images_per_call: int, calls: int,
                      repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(images_per_call * calls / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_arch(arch: str, resolution: int, batches: list[int], threads: int, repeats: int,
               calls_per_run: int, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    model = create_student(arch, 5, image_size=resolution).eval()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    scripted = torch.jit.load(str(export_torchscript(model, workdir / f"{arch}.pt", resolution)))
    session = onnx_session(export_onnx(model, workdir / f"{arch}.onnx", resolution), threads)
    rows = []
    for batch in batches:
        x = torch.rand(batch, 3, resolution, resolution)
        x_np = x.numpy()
        calls = calls_per_run if batch == 1 else 1
        x_cl = x.contiguous(memory_format=torch.channels_last)
        backends = {
            "torch eager": lambda x=x: model(x),
            "eager channels_last": lambda x=x_cl: model_cl(x),
            "torchscript": lambda x=x: scripted(x),
            "onnxruntime": lambda x_np=x_np: session.run(None, {"images": x_np}),
        }
        with torch.no_grad():
            rates = {name: images_per_second(fn, batch, calls, repeats)
                     for name, fn in backends.items()}
        for name, rate in rates.items():
            rows.append({"arch": arch, "batch": batch, "backend": name,
                         "images_per_s": round(rate, 1),
                         "vs_eager": round(rate / rates["torch eager"], 2)})
            print(f"{arch:9s} batch {batch:3d} {name:20s} {rate:9.1f} img/s "
                  f"({rate / rates['torch eager']:.2f}x eager)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=84)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--archs", nargs="+", default=["conv4", "resnet12"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls-per-run", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_latency.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} resolution={args.resolution} repeats={args.repeats} "
          f"cpu={platform.processor() or platform.machine()} torch={torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            rows += bench_arch(arch, args.resolution, args.batches, args.threads, args.repeats,
                               args.calls_per_run, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "resolution": args.resolution,
                                    "repeats": args.repeats, "torch": torch.__version__,
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
