"""The online teacher's input size: how small can it go before it loses accuracy?

Issue 21's `consistent` distillation recipe calls the frozen teacher on every augmented,
mixed batch, so its forward pass is paid at every step. EfficientNet-Lite0 was pretrained
at 224 px, but the benchmark's images are 32 px (upsampled): a smaller teacher input may
keep the accuracy at a fraction of the cost. This measures, per input size, the P>M>F
teacher's query accuracy on **val-split** episodes (prototypes and queries at that size,
fp32 and bf16 autocast) and the time of one forward pass of a batch, all in one run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/teacher_input_size.py \\
        --episodes configs/experiments/episodes/openclipart-val-5w5s.json \\
        --resolution 32 --sizes 224 128 96 64 --out benchmarks/results/teacher_input_size.json

The rule it feeds (docs/results/consistent-distillation-preregistration.md): the smallest
size whose mean val accuracy is within 1 point of the 224 px teacher's.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from bench_generation import median_time  # the same timing loop (benchmarks/ is on sys.path)


def teacher_accuracy(backbone, support, support_labels, query, query_labels, bf16: bool) -> float:
    from tint.teachers.protonet import cosine_logits, prototypes

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        protos = prototypes(backbone(support).float(), support_labels, int(support_labels.max()) + 1)
        correct = 0
        for i in range(0, len(query), 128):
            feats = backbone(query[i:i + 128]).float()
            pred = cosine_logits(feats, protos, torch.tensor(10.0)).argmax(1)
            correct += int((pred == query_labels[i:i + 128]).sum())
    return correct / len(query)


def forward_seconds(backbone, batch: torch.Tensor, bf16: bool, repeats: int = 5) -> float:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        backbone(batch)  # warm-up
        return median_time(lambda: backbone(batch), repeats)


def main() -> None:
    from tint.data.datasets import load_dataset
    from tint.data.episodes import load_episodes
    from tint.teachers.backbones import load_efficientnet_lite0

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", required=True)
    parser.add_argument("--dataset", default="openclipart")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128, 96, 64])
    parser.add_argument("--batch", type=int, default=64, help="images per timed forward pass")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    dataset = load_dataset(args.dataset, resolution=args.resolution)
    episodes, _ = load_episodes(args.episodes)
    data = []
    for ep in episodes:
        s_items = [i for row in ep.support for i in row]
        q_items = [i for row in ep.query for i in row]
        data.append((dataset.load_tensor(s_items), torch.tensor([c for c, r in enumerate(ep.support) for _ in r]),
                     dataset.load_tensor(q_items), torch.tensor([c for c, r in enumerate(ep.query) for _ in r])))
    batch = data[0][2][: args.batch]
    rows = []
    for size in args.sizes:
        backbone = load_efficientnet_lite0(size).eval()
        row = {"size": size}
        for bf16 in (False, True):
            tag = "bf16" if bf16 else "fp32"
            accs = [teacher_accuracy(backbone, *d, bf16=bf16) for d in data]
            row[f"accuracy_{tag}"] = accs
            row[f"mean_accuracy_{tag}"] = sum(accs) / len(accs)
            row[f"seconds_per_batch_{tag}"] = forward_seconds(backbone, batch, bf16)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = rows[0]
    for row in rows:
        row["accuracy_vs_first_points"] = 100 * (row["mean_accuracy_fp32"] - ref["mean_accuracy_fp32"])
        row["time_ratio_vs_first_fp32"] = row["seconds_per_batch_fp32"] / ref["seconds_per_batch_fp32"]
    out = {"what": "P>M>F EfficientNet-Lite0 teacher (no meta-training) accuracy and forward time "
                   "per input size", "episodes": args.episodes, "n_episodes": len(data),
           "resolution": args.resolution, "batch": args.batch, "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} thread)",
           "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/teacher_input_size.py "
                      + " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                 for k, v in vars(args).items()),
           "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
