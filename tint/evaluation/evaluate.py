"""Episode evaluation and the evaluation result file every method writes.

A result file holds one method's per-episode accuracies on a fixed episode file, with
the number of query images of each episode. Everything downstream (tables, `tint plan
--from-results`, reports) reads these files, so their format lives here:

    {"format": "tint-evaluation-result", "version": 1,
     "method": "tint", "confidence": 0.95,
     "accuracies": [0.91, ...], "queries": [2975, ...],
     "n_episodes": 120, "mean": 0.93, "ci_half_width": 0.005,   # for readers
     "meta": {...}}                                              # free-form

`mean` and `ci_half_width` are written for human readers; `load_result` recomputes
them from the accuracies, so a hand-edited file can never disagree with itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tint.errors import TintError
from tint.evaluation.stats import mean_ci
from tint.io import read_json, write_json

RESULT_FORMAT = "tint-evaluation-result"
RESULT_VERSION = 1

PredictFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvaluationResult:
    method: str
    accuracies: list[float]          # one fraction in [0, 1] per episode
    queries: list[int]               # query images per episode (all classes together)
    mean: float
    ci_half_width: float             # Student-t, NaN with a single episode
    confidence: float = 0.95
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_accuracies(
        cls,
        method: str,
        accuracies: Sequence[float],
        queries: int | Sequence[int],
        confidence: float = 0.95,
        meta: dict[str, Any] | None = None,
    ) -> EvaluationResult:
        accs = [float(a) for a in accuracies]
        if not accs:
            raise TintError(f"method {method!r}: no episode accuracies to summarise")
        qs = [int(queries)] * len(accs) if isinstance(queries, int) else [int(q) for q in queries]
        if len(qs) != len(accs):
            raise TintError(f"method {method!r}: {len(qs)} query counts for {len(accs)} episodes")
        mean, half = mean_ci(accs, confidence)
        return cls(method, accs, qs, mean, half, confidence, dict(meta or {}))

    @property
    def n_episodes(self) -> int:
        return len(self.accuracies)

    def summary(self) -> str:
        """e.g. 'tint: 93.12 +- 0.50 % (95% CI, 120 episodes)'."""
        half = "n/a" if math.isnan(self.ci_half_width) else f"{100 * self.ci_half_width:.2f}"
        return (
            f"{self.method}: {100 * self.mean:.2f} +- {half} % "
            f"({100 * self.confidence:g}% CI, {self.n_episodes} episodes)"
        )


def save_result(path: str | Path, result: EvaluationResult) -> None:
    """Write `result` atomically as JSON (NaN CI written as null)."""
    half = None if math.isnan(result.ci_half_width) else result.ci_half_width
    write_json(
        path,
        {
            "format": RESULT_FORMAT,
            "version": RESULT_VERSION,
            "method": result.method,
            "confidence": result.confidence,
            "n_episodes": result.n_episodes,
            "mean": result.mean,
            "ci_half_width": half,
            "accuracies": result.accuracies,
            "queries": result.queries,
            "meta": result.meta,
        },
    )


def load_result(path: str | Path) -> EvaluationResult:
    """Read and validate a result file; errors name the file and the bad field."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise TintError(f"{path}: not a tint evaluation result (expected format {RESULT_FORMAT!r})")
    if data.get("version") != RESULT_VERSION:
        raise TintError(f"{path}: unsupported result version {data.get('version')!r}")
    accs = data.get("accuracies")
    queries = data.get("queries")
    if not isinstance(accs, list) or not accs or not all(_is_fraction(a) for a in accs):
        raise TintError(f"{path}: 'accuracies' must be a non-empty list of fractions in [0, 1]")
    if not isinstance(queries, list) or not all(isinstance(q, int) and q >= 1 for q in queries):
        raise TintError(f"{path}: 'queries' must be a list of positive integers (one per episode)")
    if len(queries) != len(accs):
        raise TintError(f"{path}: {len(queries)} query counts for {len(accs)} accuracies")
    confidence = data.get("confidence", 0.95)
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise TintError(f"{path}: 'confidence' must be in (0, 1), got {confidence!r}")
    meta = data.get("meta") or {}
    return EvaluationResult.from_accuracies(
        str(data.get("method", "unknown")), accs, queries, float(confidence), meta
    )


def _is_fraction(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


@torch.inference_mode()
def on_model_device(predict_fn: PredictFn, batch: torch.Tensor) -> torch.Tensor:
    """A module's input goes where its weights are (a student on CUDA, queries on the CPU);
    any other callable gets the batch as it is and places it itself."""
    if isinstance(predict_fn, torch.nn.Module):
        weights = next(iter(predict_fn.parameters()), None)
        if weights is not None:
            return batch.to(weights.device)
    return batch


def evaluate_on_episode(
    predict_fn: PredictFn,
    images: torch.Tensor | Sequence[Any],
    labels: torch.Tensor | Sequence[int],
    batch_size: int = 128,
    load_fn: Callable[[Sequence[Any]], torch.Tensor] | None = None,
) -> float:
    """Accuracy of `predict_fn` (a [B,3,H,W] batch -> [B, N] scores) on an episode's queries.

    Runs in batches of `batch_size` so activations stay bounded. `images` is either a
    tensor of all queries, or a sequence of item ids together with `load_fn` (ids ->
    [b,3,H,W] tensor) so that "all remaining" query sets are never in memory at once.
    """
    target = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if len(images) != target.numel():
        raise TintError(f"episode evaluation: {len(images)} query images for {target.numel()} labels")
    if target.numel() == 0:
        raise TintError("episode evaluation: the episode has no query images")
    if load_fn is None and not isinstance(images, torch.Tensor):
        raise TintError("episode evaluation: pass a tensor of images, or item ids with load_fn")
    correct = 0
    for start in range(0, target.numel(), batch_size):
        chunk = images[start : start + batch_size]
        batch = chunk if load_fn is None else load_fn(chunk)
        predicted = predict_fn(on_model_device(predict_fn, batch)).argmax(dim=1).cpu()
        correct += int((predicted == target[start : start + batch_size]).sum())
    return correct / target.numel()
