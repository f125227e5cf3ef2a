"""Size and speed of a fitted student beside its teacher, for the model card.

What a user ships is the ONNX student; what it stands in for is the teacher. Both are
measured on the machine that ran the fit, at batch 1 on one CPU thread (the embedded
setting a small device has), so the card can say what the distillation bought.
Timings are not keyed artifacts: a rerun of the same fit measures them again.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tint.students.models import count_parameters

WARMUP = 3
REPEATS = 20


@dataclass(frozen=True)
class Footprint:
    """Parameters, weight bytes and median milliseconds per image (batch 1, 1 thread)."""

    parameters: int
    megabytes: float
    ms_per_image: float

    def describe(self) -> str:
        return (f"{self.parameters:,} parameters, {self.megabytes:.2f} MB, "
                f"{self.ms_per_image:.1f} ms per image")


def median_ms(call: Callable[[], object], warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median wall time of `call` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as held in memory."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def student_footprint(student: nn.Module, onnx_path: Path, resolution: int) -> Footprint:
    """The exported student as `tint predict` runs it: onnxruntime, one thread."""
    from tint.export import onnx_session

    session = onnx_session(onnx_path, threads=1)
    name = session.get_inputs()[0].name
    image = np.random.default_rng(0).random((1, 3, resolution, resolution), dtype=np.float32)
    ms = median_ms(lambda: session.run(None, {name: image}))
    return Footprint(count_parameters(student), onnx_path.stat().st_size / 1e6, ms)


def teacher_network(teacher) -> nn.Module:
    """The weights a teacher holds: the teacher itself (P>M>F is a module) or its `network`
    (LabelHalluc wraps a backbone and a scikit-learn classifier)."""
    return teacher if isinstance(teacher, nn.Module) else teacher.network


def teacher_footprint(teacher, resolution: int) -> Footprint:
    """The fitted teacher classifying one image (its backbone resizes to its own input
    size), in torch on one thread, as the pipeline runs it."""
    image = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            ms = median_ms(lambda: teacher.predict_proba(image))
    finally:
        torch.set_num_threads(threads)
    network = teacher_network(teacher)
    return Footprint(count_parameters(network), weight_bytes(network) / 1e6, ms)


def comparison_lines(student: Footprint, teacher: Footprint, student_what: str,
                     teacher_what: str) -> list[str]:
    """The card's lines: each model, then how much smaller and faster the student is."""
    return [
        f"student ({student_what}): {student.describe()} (onnxruntime, batch 1, 1 CPU thread)",
        f"teacher ({teacher_what}): {teacher.describe()} (torch, batch 1, 1 CPU thread)",
        f"the student has {teacher.parameters / max(student.parameters, 1):.0f}x fewer parameters "
        f"and runs {teacher.ms_per_image / max(student.ms_per_image, 1e-6):.0f}x faster per image "
        "on this machine",
    ]
