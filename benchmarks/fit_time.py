"""`tint fit` wall time for 5 classes x 5 images with the embedded defaults, on this CPU.

Builds the README example (examples/make_clipart_example.py: 5 openclipart novel
classes x 5 images, plus 5 test images per class), runs `tint fit` on it in a fresh
model folder with the embedded config, then `tint predict` on the test images. It
records the wall time, each stage's time (from the stage markers), the fit's own
accuracy estimates and the real accuracy on the 25 test images, and, for scale, the
seconds of 20 Conv4 training steps at batch 64 measured in the same run just before
(a machine-load yardstick: the same figure on an idle machine is in docs/fit.md).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fit_time.py --threads 2 \
        --note "idle 2-core machine" --out benchmarks/results/fit_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def conv4_yardstick(threads: int, steps: int = 20) -> float:
    """Seconds for `steps` Conv4 forward+backward passes at batch 64, 84 px."""
    import torch

    from tint.students import create_student

    torch.set_num_threads(threads)
    model = create_student("conv4", 5, image_size=84)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(64, 3, 84, 84), torch.randint(0, 5, (64,))
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start


def stage_seconds(work: Path) -> dict[str, float]:
    totals: dict[str, float] = {}
    for marker in work.rglob("done.json"):
        data = json.loads(marker.read_text())
        stage = data.get("stage") or marker.parent.parent.name
        totals[stage] = round(totals.get(stage, 0.0) + float(data.get("seconds") or 0.0), 1)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--note", default="", help="how the machine was loaded during the run")
    args = parser.parse_args()
    example = ROOT / "examples" / "clipart"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_clipart_example.py"),
                    "--out", str(example)], check=True)
    yardstick = conv4_yardstick(args.threads)
    print(f"yardstick: 20 Conv4 steps at batch 64 in {yardstick:.1f} s", flush=True)
    tint = str(Path(sys.executable).parent / "tint")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_dir or Path(tmp) / "model"
        start = time.perf_counter()
        subprocess.run([tint, "fit", str(example / "train"), "--out", str(model),
                        "--set", f"threads={args.threads}"], check=True)
        wall = time.perf_counter() - start
        print(f"tint fit: {wall:.0f} s wall", flush=True)
        done = subprocess.run([tint, "predict", str(model), str(example / "test"), "--format", "json"],
                              check=True, capture_output=True, text=True)
        rows = json.loads(done.stdout)
        correct = sum(Path(r["file"]).parent.name == r["label"] for r in rows)
        labels = json.loads((model / "labels.json").read_text())
        card = (model / "MODEL_CARD.md").read_text().split("## Accuracy", 1)[1].split("## Intended", 1)[0]
        result = {
            "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} "
                       ".venv/bin/python benchmarks/fit_time.py " + " ".join(sys.argv[1:]),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
            "threads": args.threads,
            "fit_wall_seconds": round(wall, 1),
            "stage_seconds": stage_seconds(model / "work"),
            "yardstick_conv4_20_steps_seconds": round(yardstick, 2),
            "classes": labels["classes"],
            "card_estimates": [line[2:] for line in card.strip().splitlines() if line.startswith("- ")],
            "test_accuracy": {"correct": correct, "n": len(rows), "accuracy": correct / len(rows)},
            "note": args.note,
        }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
