"""The HTML report of one run: what went in, what came out, how long it took.

`write_report(run_dir, results, config_text)` turns the run's `results.json` (written by
`tint.results.report`) into ``<run_dir>/report.html`` with PNG plots beside it under
``<run_dir>/report/``. Everything it shows is read from the run directory (support
images are copied there by the prepare stage, generated images are listed in the
generator's manifest), so a report can be rebuilt from a finished run alone.

Results layout (see `tint.results.collect_results`)::

    {"name": str, "models": ["teacher", "<student>", ...],
     "episodes": [{"index": int, "classes": [...], "n_query": int,
                   "accuracy": {"teacher": float, "<student>": float, ...},
                   "curves": {"<student>": [[iteration, accuracy], ...]},
                   "support": [[png path, ...] per class],
                   "generated": [[png path, ...] per class]}],
     "summary": {"<model>": {"mean": float, "ci": float, "n": int}},
     "timings": {"<stage>": seconds}}
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report is written by batch jobs
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tint.io import atomic_path, write_text  # noqa: E402

THUMB = 64  # pixels per image in the support/generated grids


def write_report(run_dir: str | Path, results: dict, config_text: str, max_grid: int = 8) -> Path:
    """Write report.html and its PNGs into `run_dir`; return the HTML path."""
    run_dir = Path(run_dir)
    figures = run_dir / "report"
    figures.mkdir(parents=True, exist_ok=True)
    sections = [
        _summary_section(results),
        figure_section("Accuracy over distillation iterations", plot_curves(results, figures)),
        figure_section("Per-episode accuracy (mean and 95% CI)", _plot_episodes(results, figures)),
        _episode_table(results),
        _timing_section(results, figures),
        _images_section(results, figures, max_grid),
        f"<h2>Resolved config</h2><pre>{html.escape(config_text)}</pre>",
    ]
    page = html_page(f"tint run: {results.get('name', run_dir.name)}", "\n".join(s for s in sections if s))
    path = run_dir / "report.html"
    write_text(path, page)
    return path


# ----------------------------------------------------------------------------- tables


def format_accuracy(mean: float, ci: float) -> str:
    """'81.2 +- 3.4 %' (the CI is unknown with a single episode)."""
    if math.isnan(ci):
        return f"{100 * mean:.1f} % (1 episode: no CI)"
    return f"{100 * mean:.1f} +- {100 * ci:.1f} %"


def summary_lines(results: dict) -> list[str]:
    """One line per model (teacher first), as printed at the end of `tint run`."""
    width = max(len(_label(m)) for m in results["models"])
    n = len(results["episodes"])
    lines = [f"accuracy on the queries of {n} episode(s), mean +- 95% CI:"]
    for model in results["models"]:
        stats = results["summary"][model]
        lines.append(f"  {_label(model):<{width}}  {format_accuracy(stats['mean'], stats['ci'])}")
    return lines


def _label(model: str) -> str:
    if model == "teacher-online":
        return "teacher (online, as the consistent students saw it)"
    return "teacher" if model == "teacher" else f"student {model}"


def _summary_section(results: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(_label(m))}</td>"
        f"<td>{format_accuracy(results['summary'][m]['mean'], results['summary'][m]['ci'])}</td></tr>"
        for m in results["models"]
    )
    n = len(results["episodes"])
    return (
        f"<h2>Teacher vs students</h2><p>Accuracy on the query images of {n} episode(s); "
        "95% confidence interval from the Student-t distribution over episodes.</p>"
        f"<table><tr><th>model</th><th>accuracy</th></tr>{rows}</table>"
    )


def _episode_table(results: dict) -> str:
    models = results["models"]
    head = "".join(f"<th>{html.escape(_label(m))}</th>" for m in models)
    body = ""
    for ep in results["episodes"]:
        cells = "".join(f"<td>{100 * ep['accuracy'][m]:.1f}</td>" for m in models)
        classes = html.escape(", ".join(ep["classes"]))
        body += f"<tr><td>{ep['index']}</td><td>{classes}</td><td>{ep['n_query']}</td>{cells}</tr>"
    return (
        "<h2>Episodes</h2><table><tr><th>episode</th><th>classes</th><th>queries</th>"
        f"{head}</tr>{body}</table>"
    )


def _timing_section(results: dict, figures: Path) -> str:
    timings = results.get("timings", {})
    if not timings:
        return ""
    total = sum(timings.values())
    rows = "".join(
        f"<tr><td>{html.escape(stage)}</td><td>{seconds:.1f}</td></tr>" for stage, seconds in timings.items()
    )
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(timings) + 1))
    ax.barh(list(timings)[::-1], list(timings.values())[::-1], color="#4c72b0")
    ax.set_xlabel("seconds (summed over episodes; first computation, not resumed skips)")
    path = _save(fig, figures / "timings.png")
    return (
        f"<h2>Time per stage</h2><p>Total {total:.0f} s.</p>"
        f"<table><tr><th>stage</th><th>seconds</th></tr>{rows}</table>{img_tag(path)}"
    )


# ----------------------------------------------------------------------------- plots


def plot_curves(results: dict, figures: Path) -> Path | None:
    """Mean query accuracy over iterations per student, per-episode curves faint."""
    students = [m for m in results["models"] if not m.startswith("teacher")]
    if not any(ep.get("curves", {}).get(s) for ep in results["episodes"] for s in students):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for color, student in zip(_colors(len(students)), students, strict=True):
        curves = [np.asarray(ep["curves"][student]) for ep in results["episodes"] if ep["curves"].get(student)]
        for curve in curves:
            ax.plot(curve[:, 0], 100 * curve[:, 1], color=color, alpha=0.25, linewidth=1)
        steps = min(len(c) for c in curves)
        mean = np.mean([c[:steps, 1] for c in curves], axis=0)
        ax.plot(curves[0][:steps, 0], 100 * mean, color=color, linewidth=2, label=student)
    teacher = results["summary"].get("teacher")
    if teacher:
        ax.axhline(100 * teacher["mean"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("query accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, figures / "accuracy_curve.png")


def _plot_episodes(results: dict, figures: Path) -> Path:
    models = results["models"]
    fig, ax = plt.subplots(figsize=(1.6 * len(models) + 2, 4))
    for x, (color, model) in enumerate(zip(_colors(len(models)), models, strict=True)):
        accs = [100 * ep["accuracy"][model] for ep in results["episodes"]]
        jitter = np.linspace(-0.15, 0.15, len(accs)) if len(accs) > 1 else [0.0]
        ax.scatter(x + np.asarray(jitter), accs, color=color, alpha=0.6, s=18)
        stats = results["summary"][model]
        ci = 0.0 if math.isnan(stats["ci"]) else 100 * stats["ci"]
        ax.errorbar(x + 0.3, 100 * stats["mean"], yerr=ci, fmt="o", color="black", capsize=5)
    ax.set_xticks(range(len(models)), [_label(m) for m in models], rotation=15)
    ax.set_ylabel("query accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, figures / "episode_accuracy.png")


def _images_section(results: dict, figures: Path, max_grid: int) -> str:
    parts = ["<h2>Support and generated images</h2><p>Per class: the support images, then "
             f"up to {max_grid} generated images.</p>"]
    for ep in results["episodes"]:
        path = image_grid(ep, figures / f"images_ep{ep['index']:03d}.png", max_grid)
        if path is not None:
            parts.append(f"<h3>Episode {ep['index']}</h3>{img_tag(path)}")
    return "\n".join(parts)


def image_grid(episode: dict, path: Path, max_grid: int) -> Path | None:
    """One row per class: support thumbnails | gap | generated thumbnails."""
    support = episode.get("support") or []
    generated = episode.get("generated") or [[] for _ in support]
    if not support:
        return None
    n_support = max(len(s) for s in support)
    n_gen = min(max_grid, max((len(g) for g in generated), default=0))
    gap = THUMB // 2 if n_gen else 0
    label_width = 150
    width = label_width + THUMB * (n_support + n_gen) + gap
    canvas = Image.new("RGB", (width, THUMB * len(support)), "white")
    for row, (sup, gen) in enumerate(zip(support, generated, strict=True)):
        for col, image_path in enumerate(sup):
            canvas.paste(_thumb(image_path), (label_width + col * THUMB, row * THUMB))
        for col, image_path in enumerate(gen[:n_gen]):
            x = label_width + (n_support + col) * THUMB + gap
            canvas.paste(_thumb(image_path), (x, row * THUMB))
    fig, ax = plt.subplots(figsize=(width / 80, THUMB * len(support) / 80))
    ax.imshow(np.asarray(canvas))
    for row, name in enumerate(episode["classes"]):
        short = name if len(name) <= 22 else "..." + name[-19:]
        ax.text(4, row * THUMB + THUMB / 2, short, fontsize=7, va="center")
    ax.axis("off")
    return _save(fig, path)


def _thumb(image_path: str) -> Image.Image:
    with Image.open(image_path) as image:
        return image.convert("RGB").resize((THUMB, THUMB), Image.BILINEAR)


# ----------------------------------------------------------------------------- helpers


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def img_tag(path: Path | None) -> str:
    return "" if path is None else f'<img src="report/{path.name}" alt="{path.stem}">'


def figure_section(title: str, path: Path | None) -> str:
    return "" if path is None else f"<h2>{html.escape(title)}</h2>{img_tag(path)}"


def html_page(title: str, body: str) -> str:
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:100%;display:block;margin:1em 0}pre{background:#f6f6f6;padding:1em;"
        "overflow-x:auto}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
