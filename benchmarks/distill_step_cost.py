"""Cost of one distillation step: `consistent` (teacher online) against `paper`, same batch.

Issue 21 asks where the time of the consistent recipe goes. One process, one batch size,
the offline benchmark's shapes (Conv4 at 32 px, batch 64 of base + synthetic + support,
the EfficientNet-Lite0 P>M>F teacher at `--teacher-size` px): the median seconds of

- ``paper``: one `train_step` of the paper recipe (stored pseudo-labels),
- ``consistent``: one `train_step` of the consistent recipe, and inside it
- ``teacher``: the teacher's forward pass on the mixed batch (``teacher_probabilities``),
- ``student``: the rest (batch, augmentation, mixing, the student's forward and backward),

in fp32 and with bf16 autocast (student and teacher), and the ratio consistent / paper:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_step_cost.py --teacher-size 96 \\
        --out benchmarks/results/distill_step_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from bench_generation import median_time  # the same timing loop (benchmarks/ is on sys.path)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls pay allocation and kernel selection
    return median_time(fn, repeats)


def step_seconds(recipe: str, bf16: bool, online, pool, soft, support, args) -> float:
    """Median seconds of one `train_step` of `recipe` (a fresh student and optimizer)."""
    from tint.students import create_student
    from tint.students.distill import DistillConfig, DistillSource, train_step

    labels = None if recipe == "consistent" else soft
    sources = {"base": DistillSource(labels, images=pool), "synthetic": DistillSource(labels, images=pool),
               "support": DistillSource(support[1], images=support[0])}
    config = DistillConfig(recipe=recipe, batch_size=args.batch_size, iterations=10_000,
                           channels_last=True, bf16=bf16, teacher_size=args.teacher_size)
    student = create_student("conv4", len(soft[0]), image_size=args.resolution)
    student = student.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.02, momentum=0.9)
    steps = iter(range(10_000))
    teacher = online if recipe == "consistent" else None
    return median_seconds(lambda: train_step(student, optimizer, sources, list(sources), config,
                                             next(steps), teacher=teacher), args.repeats)


def teacher_seconds(online, bf16: bool, args) -> float:
    from tint.students.distill import DistillConfig, teacher_probabilities

    config = DistillConfig(bf16=bf16)
    mixed = torch.rand(args.batch_size, 3, args.resolution, args.resolution)
    return median_seconds(lambda: teacher_probabilities(online, mixed, config, "fp32"), args.repeats)


def main() -> None:
    from tint.teachers.protonet import create_pmf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    n_way, res = 5, args.resolution
    support = (torch.rand(25, 3, res, res), torch.arange(25) % n_way)
    online = create_pmf("efficientnet-lite0").online(*support, args.teacher_size)
    soft = torch.rand(500, n_way).softmax(1)
    pool = torch.rand(500, 3, res, res)
    rows = {}
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        for recipe in ("paper", "consistent"):
            rows[f"{recipe}_{tag}"] = step_seconds(recipe, bf16, online, pool, soft, support, args)
        rows[f"teacher_{tag}"] = teacher_seconds(online, bf16, args)
        rows[f"student_{tag}"] = rows[f"consistent_{tag}"] - rows[f"teacher_{tag}"]
        rows[f"ratio_consistent_vs_paper_{tag}"] = rows[f"consistent_{tag}"] / rows[f"paper_{tag}"]
        rows[f"teacher_share_{tag}"] = rows[f"teacher_{tag}"] / rows[f"consistent_{tag}"]
    out = {"what": "median seconds per distillation step (train_step), same batch, one process",
           "threads": torch.get_num_threads(), "machine": f"{platform.machine()} ({torch.get_num_threads()} thread)",
           "settings": vars(args),
           "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_step_cost.py "
                      f"--teacher-size {args.teacher_size} --batch-size {args.batch_size} --out {args.out}",
           "seconds": rows}
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
