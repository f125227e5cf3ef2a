"""`tint predict` start-up time and images per second on CPU (onnxruntime, no torch).

Start-up: wall time of the whole command `tint predict MODEL_DIR one.png` in a fresh
process (median of `--startup-repeats`), against `python -c pass` and
`python -c "import torch"` measured in the same run, so the figure reads as "so many
times an empty interpreter" on whatever machine runs it.

Throughput: images per second of `tint.Predictor` at batch 1 and 64 for Conv4 and
ResNet12 (random weights: speed does not depend on them) at `--size`, both for the
model call alone on preprocessed arrays and end to end from PNG files on disk
(decode + resize + model). Median of `--repeats` timed runs after warm-up.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/predict_latency.py --threads 1 \
        --out benchmarks/results/predict_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from export_latency import images_per_second  # the same timing loop (benchmarks/ is on sys.path)
from PIL import Image

CLASSES = ["a", "b", "c", "d", "e"]


def make_model_dir(arch: str, size: int, folder: Path) -> Path:
    """An exported student + labels.json, as `tint fit` writes them (torch used here only)."""
    import torch

    from tint.export import export_onnx
    from tint.io import write_json
    from tint.predict import LABELS_FILE, file_sha256, labels_document
    from tint.students import create_student

    torch.manual_seed(0)
    model = create_student(arch, len(CLASSES), image_size=size).eval()
    export_onnx(model, folder / "model.onnx", size)
    write_json(folder / LABELS_FILE, labels_document(CLASSES, size, arch=arch,
                                                     model_sha256=file_sha256(folder / "model.onnx")))
    return folder


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-sized PNGs of mixed sizes, so the end-to-end rate includes a real resize."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def wall_time(cmd: list[str], repeats: int, env: dict) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def startup(model_dir: Path, image: Path, repeats: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    tint_bin = shutil.which("tint", path=str(Path(sys.executable).parent)) or "tint"
    figures = {
        "python -c pass": wall_time([sys.executable, "-c", "pass"], repeats, env),
        "python -c 'import torch'": wall_time([sys.executable, "-c", "import torch"], repeats, env),
        "tint predict MODEL one.png": wall_time(
            [tint_bin, "predict", str(model_dir), str(image), "--threads", str(threads)], repeats, env),
    }
    base = figures["python -c pass"]
    return {"seconds": figures, "ratio_vs_python_pass": {k: v / base for k, v in figures.items()}}


def throughput(arch: str, model_dir: Path, images: list[Path], batches: list[int], threads: int,
               repeats: int, calls_per_run: int) -> list[dict]:
    from tint.predict import Predictor, preprocess

    predictor = Predictor(model_dir, threads=threads)
    arrays = np.stack([preprocess(p, predictor.spec) for p in images])
    rows = []
    for batch in batches:
        x = np.ascontiguousarray(arrays[:batch])
        files = images[:batch]
        calls = calls_per_run if batch == 1 else 1
        model_only = images_per_second(lambda x=x: predictor.logits(x), batch, calls, repeats)
        end_to_end = images_per_second(
            lambda files=files, b=batch: predictor.predict(files, batch_size=b), batch,
            max(1, calls // 4), repeats)
        rows.append({"arch": arch, "batch": batch, "model_images_per_s": round(model_only, 1),
                     "end_to_end_images_per_s": round(end_to_end, 1)})
        print(f"{arch:9s} batch {batch:3d}: model {model_only:9.1f} img/s, "
              f"from PNG files {end_to_end:8.1f} img/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls-per-run", type=int, default=40)
    parser.add_argument("--startup-repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_images(tmp / "images", max(args.batches))
        rows, start = [], None
        for arch in ("conv4", "resnet12"):
            model_dir = make_model_dir(arch, args.size, tmp / arch)
            if start is None:
                start = startup(model_dir, images[0], args.startup_repeats, args.threads)
                for name, sec in start["seconds"].items():
                    print(f"start-up {name:28s} {sec:6.3f} s "
                          f"({start['ratio_vs_python_pass'][name]:.1f}x python -c pass)", flush=True)
            rows += throughput(arch, model_dir, images, args.batches, args.threads,
                               args.repeats, args.calls_per_run)
    result = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/predict_latency.py "
                   + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "platform": platform.platform()},
        "threads": args.threads, "size": args.size, "startup": start, "throughput": rows,
        "note": "shared 2-core machine: other jobs ran at the same time; figures are medians",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
