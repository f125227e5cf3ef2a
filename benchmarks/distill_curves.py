"""Distillation curves: query accuracy against iteration, per episode and averaged.

Issue 14 asks to distil until the student has plateaued and to show it. Each student's
curve is logged every `distill.eval_every` steps (it never changes training) and kept
in the run's results.json (`episodes[i].curves[model]`) and in each episode's
evaluation.json (`curves`). This draws them, one thin line per episode and cell, the
mean over episodes thick, from any mix of the two file kinds:

    .venv/bin/python benchmarks/distill_curves.py --out curve.png \\
        none=runs/offline-benchmark/cells/none/results.json \\
        tint=runs/offline-benchmark/cells/tint/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curves_of(path: Path, model: str) -> list[list[tuple[int, float]]]:
    """Every episode's curve of `model` in a results.json, or the one of an evaluation.json."""
    data = json.loads(path.read_text())
    episodes = data["episodes"] if "episodes" in data else [data]
    return [[(int(s), float(a)) for s, a in ep.get("curves", {}).get(model, [])] for ep in episodes]


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
    return [(s, sum(dict(c)[s] for c in curves) / len(curves)) for s in steps]


def plot(series: dict[str, list[list[tuple[int, float]]]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, curves) in enumerate(series.items()):
        color = f"C{i}"
        for curve in curves:
            ax.plot([s for s, _ in curve], [100 * a for _, a in curve], color=color, alpha=0.25, lw=1)
        mean = mean_curve(curves)
        ax.plot([s for s, _ in mean], [100 * a for _, a in mean], color=color, lw=2.5,
                label=f"{label} (mean of {len(curves)} episodes)")
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", nargs="+", help="LABEL=FILE[,FILE...] (results.json or evaluation.json)")
    parser.add_argument("--model", default="student")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="student query accuracy during distillation")
    args = parser.parse_args()
    series = {}
    for spec in args.series:
        label, _, files = spec.partition("=")
        series[label] = [c for f in files.split(",") for c in curves_of(Path(f), args.model)]
    plot(series, Path(args.out), args.title)
    for label, curves in series.items():
        print(label, " ".join(f"{s}:{100 * a:.1f}" for s, a in mean_curve(curves)))


if __name__ == "__main__":
    main()
