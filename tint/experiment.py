"""`tint experiment CONFIG`: a grid of `tint run` configs over fixed episodes, one table.

An experiment config names a base run config and a grid::

    name: alpha-sweep
    out_dir: runs/experiments/alpha-sweep
    base: configs/demo.yaml            # a run config; null: the embedded demo
    set: {data.first_episodes: 5}      # overrides for every cell
    grid:                              # axis -> list of {label, set}
      alpha:
        - {label: "0.0", set: {generator.generate.alpha: 0.0}}
        - {label: "1.0", set: {generator.generate.alpha: 1.0}}
    full: {distill.iterations: 10000}  # extra overrides applied with --full (GPU setting)
    fid: false                         # FID of each cell's synthetic images vs real queries
    store: runs/experiments/store      # optional: an artifact store shared with other experiments

Cells are the cartesian product of the axes. Every cell is one `tint run` (run dir
``<out_dir>/cells/<label>_<label>...``) and all cells share one artifact store
(``<out_dir>/artifacts`` unless `store` names another; stages lock their folder, so
several experiments may run at once on one store). Since every stage's artifact is keyed by exactly what it
depends on, cells share whatever they have in common with no bookkeeping here: one
teacher for all cells with the same teacher, one specialisation for every alpha and
synthetic count, and a second run of the same grid finds everything done.

Output: ``results.md`` and ``results.csv`` (one row per cell and model: accuracy mean,
95% CI, episodes [, FID], and for each axis the paired difference to that axis's first
label with everything else fixed) and ``results.png``. Every cell runs on the same
episodes, so a paired difference has a much narrower CI than the two accuracies'.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tint.config import apply_override, config_from_dict, demo_config_text, read_yaml
from tint.errors import TintError
from tint.io import write_json, write_text

LOGGER = logging.getLogger("tint")


@dataclass
class Cell:
    labels: dict[str, str]  # axis -> label
    overrides: list[str]  # KEY=VALUE, in order: experiment `set`, axes, --full, --set

    @property
    def name(self) -> str:
        return "_".join(_safe(v) for v in self.labels.values()) or "default"


@dataclass
class Experiment:
    name: str
    out_dir: Path
    base: dict  # raw run-config data
    axes: dict[str, list[tuple[str, dict]]]
    common: dict = field(default_factory=dict)
    full: dict = field(default_factory=dict)
    fid: bool = False
    store: Path | None = None  # shared artifact store; None: <out_dir>/artifacts

    @property
    def store_dir(self) -> Path:
        return self.store if self.store is not None else self.out_dir / "artifacts"


EXPERIMENT_KEYS = {"name", "out_dir", "base", "set", "grid", "full", "fid", "store"}


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment config (every cell is validated before any work)."""
    path = Path(path)
    data = read_yaml(path)
    unknown = sorted(set(data) - EXPERIMENT_KEYS)
    if unknown:
        raise TintError(f"{path}: {unknown[0]}: unknown key; valid keys: {', '.join(sorted(EXPERIMENT_KEYS))}")
    base_spec = data.get("base")
    if base_spec is None:
        base = yaml.safe_load(demo_config_text()) or {}
    else:
        base_path = Path(base_spec)
        if not base_path.is_absolute() and not base_path.is_file():
            base_path = path.parent / base_path
        base = read_yaml(base_path)
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise TintError(f"{path}: grid: expected a mapping of axis name -> list of {{label, set}}")
    axes: dict[str, list[tuple[str, dict]]] = {}
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise TintError(f"{path}: grid.{axis}: expected a non-empty list of {{label, set}}")
        entries = []
        for i, value in enumerate(values):
            if not isinstance(value, dict) or set(value) - {"label", "set"} or "label" not in value:
                raise TintError(f"{path}: grid.{axis}[{i}]: expected {{label: ..., set: {{KEY: VALUE}}}}")
            entries.append((str(value["label"]), _mapping(value.get("set"), f"{path}: grid.{axis}[{i}].set")))
        labels = [label for label, _ in entries]
        if len(set(labels)) != len(labels):
            raise TintError(f"{path}: grid.{axis}: labels must differ, got {labels}")
        axes[str(axis)] = entries
    fid = data.get("fid", False)
    if not isinstance(fid, bool):
        raise TintError(f"{path}: fid: expected true or false, got {fid!r}")
    name = str(data.get("name") or path.stem)
    return Experiment(
        name=name,
        out_dir=Path(data.get("out_dir") or f"runs/experiments/{name}"),
        base=base,
        axes=axes,
        common=_mapping(data.get("set"), f"{path}: set"),
        full=_mapping(data.get("full"), f"{path}: full"),
        fid=fid,
        store=Path(data["store"]) if data.get("store") else None,
    )


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TintError(f"{where}: expected a mapping KEY: VALUE (e.g. distill.iterations: 300)")
    return dict(value)


def _assignments(mapping: dict) -> list[str]:
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in mapping.items()]


def cells(experiment: Experiment, full: bool = False, overrides: list[str] | None = None) -> list[Cell]:
    axes = list(experiment.axes.items())
    out = []
    for combo in itertools.product(*(values for _, values in axes)) if axes else [()]:
        labels = {axis: label for (axis, _), (label, _) in zip(axes, combo, strict=True)}
        assignments = _assignments(experiment.common)
        for _label, mapping in combo:
            assignments += _assignments(mapping)
        if full:
            assignments += _assignments(experiment.full)
        out.append(Cell(labels, assignments + list(overrides or [])))
    return out


def cell_config(experiment: Experiment, cell: Cell):
    data = yaml.safe_load(yaml.safe_dump(experiment.base))
    for assignment in cell.overrides:
        try:
            data = apply_override(data, assignment)
        except TintError as err:
            raise TintError(f"cell {cell.name}: {err}") from err
    try:
        config = config_from_dict(data)
    except TintError as err:
        raise TintError(f"cell {cell.name}: {err}") from err
    config.name = f"{experiment.name}/{cell.name}"
    config.run_dir = str(experiment.out_dir / "cells" / cell.name)
    return config


def run_experiment(experiment: Experiment, full: bool = False, overrides: list[str] | None = None,
                   hooks: dict | None = None) -> list[dict]:
    """Run every cell (validated first), write the tables and plot; return the rows."""
    from tint.pipeline import run_pipeline, validate_components

    grid = cells(experiment, full, overrides)
    configs = [cell_config(experiment, cell) for cell in grid]
    for cell, config in zip(grid, configs, strict=True):
        try:
            validate_components(config)
        except TintError as err:
            raise TintError(f"cell {cell.name}: {err}") from err
    store = experiment.store_dir
    if configs and configs[0].executor.name == "ray":
        configs = _run_all_cells_on_ray(configs, store, hooks)
    rows = []
    for i, (cell, config) in enumerate(zip(grid, configs, strict=True)):
        LOGGER.info("experiment %s: cell %d/%d %s", experiment.name, i + 1, len(grid), cell.name)
        # A cell's run dir belongs to the experiment: an edited experiment replaces the
        # cell's old results (its artifacts stay in the shared store and are reused).
        results = run_pipeline(config, store=store, hooks=hooks, allow_config_change=True)
        fid = _cell_fid(config, results, store) if experiment.fid else None
        for model in results["models"]:
            stats = results["summary"][model]
            per_episode = [ep["accuracy"][model] for ep in results["episodes"]]
            rows.append({**cell.labels, "model": model, "mean": stats["mean"], "ci": stats["ci"],
                         "episodes": stats["n"], **({"fid": fid} if experiment.fid else {}),
                         "per_episode": per_episode})
    add_paired_differences(experiment, rows)
    write_tables(experiment, rows)
    return rows


def _run_all_cells_on_ray(configs: list, store: Path, hooks: dict | None) -> list:
    """Every cell's units as one Ray graph (shared artifacts run once); then the cells,
    all done, are reported by the local executor."""
    from dataclasses import replace

    from tint.executors.ray_executor import run_experiment_cells

    run_experiment_cells(configs, store, hooks)
    return [replace(c, executor=replace(c.executor, name="local")) for c in configs]


def delta_column(axis: str, reference: str) -> str:
    return f"delta vs {axis}={reference}"


def add_paired_differences(experiment: Experiment, rows: list[dict]) -> None:
    """For each axis, each row's paired difference (mean, 95% CI) to the row that differs
    only in that axis, at the axis's first label. Episodes are paired by position (every
    cell runs the same episode list); the reference row itself gets no entry."""
    from tint.evaluation.stats import mean_ci

    axes = list(experiment.axes)
    for axis in axes:
        reference = experiment.axes[axis][0][0]
        index = {tuple(r[a] for a in axes if a != axis) + (r["model"],): r for r in rows
                 if r[axis] == reference}
        for row in rows:
            ref = index.get(tuple(row[a] for a in axes if a != axis) + (row["model"],))
            if ref is None or row is ref or len(ref["per_episode"]) != len(row["per_episode"]):
                continue
            diffs = [a - b for a, b in zip(row["per_episode"], ref["per_episode"], strict=True)]
            mean, ci = mean_ci(diffs)
            row[delta_column(axis, reference)] = {"mean": mean, "ci": ci}


FID_FEATURES = "efficientnet-lite0-64"


def _cell_fid(config, results: dict, store: Path) -> float | None:
    """FID between the cell's synthetic images and the real query images, averaged over
    the episodes' classes (the offline feature substitute unless Inception is given).
    Each class's value is cached in the store, keyed by both image lists, so cells and
    experiments that share images compute it once."""
    import math

    from tint.engine import StoreContext, run_stage, stable_hash

    generated = [ep["_synthetic"] for ep in results["episodes"] if ep.get("_synthetic")]
    if not generated or not any(any(c) for c in generated[0]):
        return None
    values = []
    for ep in results["episodes"]:
        episode = read_episode(Path(config.run_dir), ep["index"])
        for c, paths in enumerate(ep["_synthetic"]):
            real = list(episode["query"][c])
            if len(paths) < 2 or len(real) < 2:
                continue
            key = {"features": FID_FEATURES, "dataset": config.data.dataset,
                   "resolution": config.data.resolution, "real": real,
                   "generated": [_store_relative(p, store) for p in paths]}
            marker = run_stage(StoreContext(store), "fid", store / "fid" / stable_hash(key, 16), key,
                               f"ep{ep['index']:03d}/c{c:02d}",
                               lambda f, paths=paths, real=real: {"value": _class_fid(config, paths, real)})
            values.append(float(marker["value"]))
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _store_relative(path: str, store: Path) -> str:
    try:
        return str(Path(path).relative_to(store))
    except ValueError:
        return str(path)


def _class_fid(config, generated: list[str], real_items: list[str]) -> float:
    from tint.evaluation.fid import fid_between

    real = _dataset(config.data.dataset, config.data.resolution).load_tensor(real_items)
    return fid_between(list(generated), real, _extractor(FID_FEATURES))


@functools.cache
def _dataset(spec: str, resolution: int):
    from tint.data.datasets import load_dataset

    return load_dataset(spec, resolution=resolution)


@functools.cache
def _extractor(name: str):
    """The FID feature network, loaded once per process."""
    from tint.evaluation.fid import create_extractor

    return create_extractor(name)


def read_episode(run_dir: Path, index: int) -> dict:
    from tint.io import read_json

    return read_json(run_dir / "episodes" / f"ep{index:03d}" / "episode.json")


# ----------------------------------------------------------------------------- output


def redraw_tables(experiment: Experiment) -> list[dict]:
    """Tables and plot again from results.json (e.g. after a tint upgrade), no cell run."""
    from tint.io import read_json

    path = experiment.out_dir / "results.json"
    if not path.is_file():
        raise TintError(f"{path}: no results yet; run `tint experiment` without --tables-only first")
    rows = [{k: v for k, v in row.items() if not k.startswith("delta vs ")} for row in read_json(path)]
    add_paired_differences(experiment, rows)
    write_tables(experiment, rows)
    return rows


def write_tables(experiment: Experiment, rows: list[dict]) -> None:
    out = experiment.out_dir
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    flat = [_flat_row(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    write_text(out / "results.csv", buffer.getvalue())
    write_text(out / "results.md", markdown_table(experiment, rows))
    write_json(out / "results.json", rows)
    if rows:
        _plot(experiment, rows, out / "results.png")


def _flat_row(row: dict) -> dict:
    """A CSV row: deltas as two columns, per-episode accuracies joined by spaces."""
    flat = {}
    for key, value in row.items():
        if key == "per_episode":
            flat[key] = " ".join(f"{v:.4f}" for v in value)
        elif isinstance(value, dict):
            flat[f"{key} mean"], flat[f"{key} ci"] = value["mean"], value["ci"]
        else:
            flat[key] = value
    return flat


def markdown_table(experiment: Experiment, rows: list[dict]) -> str:
    from tint.report import format_accuracy

    axes = list(experiment.axes)
    has_fid = any("fid" in r for r in rows)
    deltas = [d for d in (delta_column(a, experiment.axes[a][0][0]) for a in axes)
              if any(d in r for r in rows)]
    head = (axes + ["model", "accuracy (95% CI)", "episodes"] + (["FID"] if has_fid else [])
            + [f"{d} (paired, 95% CI)" for d in deltas])
    lines = [f"# {experiment.name}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for row in rows:
        cells_ = [str(row[a]) for a in axes] + [row["model"], format_accuracy(row["mean"], row["ci"]),
                                                 str(row["episodes"])]
        if has_fid:
            cells_.append("" if row.get("fid") is None else f"{row['fid']:.2f}")
        for d in deltas:
            cells_.append(_signed(row[d]) if d in row else "")
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def _signed(delta: dict) -> str:
    import math

    ci = "" if math.isnan(delta["ci"]) else f" +- {100 * delta['ci']:.1f}"
    return f"{100 * delta['mean']:+.1f}{ci}"


def _numeric_axis(experiment: Experiment) -> str | None:
    """The grid's only axis when every label is a number (alpha, counts): a line plot."""
    if len(experiment.axes) != 1:
        return None
    axis, values = next(iter(experiment.axes.items()))
    try:
        [float(label) for label, _ in values]
    except ValueError:
        return None
    return axis


def _plot(experiment: Experiment, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tint.io import atomic_path

    axis = _numeric_axis(experiment)
    fig = _line_plot(experiment, rows, axis, plt) if axis else _bar_plot(experiment, rows, plt)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _line_plot(experiment: Experiment, rows: list[dict], axis: str, plt):
    """Accuracy (mean and 95% CI band) per model against the axis; FID on a second y axis."""
    import math

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: float(r[axis]))
        x = [float(r[axis]) for r in mine]
        mean = [100 * r["mean"] for r in mine]
        ci = [0.0 if math.isnan(r["ci"]) else 100 * r["ci"] for r in mine]
        ax.plot(x, mean, marker="o", label=model)
        ax.fill_between(x, [m - c for m, c in zip(mean, ci, strict=True)],
                        [m + c for m, c in zip(mean, ci, strict=True)], alpha=0.15)
    ax.set_xlabel(axis)
    ax.set_ylabel("query accuracy (%), mean and 95% CI")
    ax.set_title(experiment.name)
    fid = {float(r[axis]): r["fid"] for r in rows if r.get("fid") is not None}
    if fid:
        ax2 = ax.twinx()
        xs = sorted(fid)
        ax2.plot(xs, [fid[x] for x in xs], color="grey", linestyle="--", marker="s", label="FID")
        ax2.set_ylabel("FID (64-dim features), lower = closer to real")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _bar_plot(experiment: Experiment, rows: list[dict], plt):
    import math

    labels = [" / ".join([*(str(r[a]) for a in experiment.axes), r["model"]]) for r in rows]
    means = [100 * r["mean"] for r in rows]
    cis = [0.0 if math.isnan(r["ci"]) else 100 * r["ci"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh(range(len(rows)), means, xerr=cis, color="#4c72b0", capsize=3)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("query accuracy (%), mean and 95% CI over episodes")
    ax.set_title(experiment.name)
    return fig


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment config (YAML), e.g. configs/experiments/alpha.yaml")
    parser.add_argument("--full", action="store_true",
                        help="apply the config's `full` overrides (the paper's settings, for a GPU)")
    parser.add_argument("--out-dir", default=None, help="where cells and tables go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config value in every cell (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    parser.add_argument("--tables-only", action="store_true",
                        help="redraw results.md/.csv/.png from the last run's results.json, run nothing")
    from tint.run_cli import add_execution_arguments

    add_execution_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tint.run_cli import execution_overrides

    args.overrides = [*args.overrides, *execution_overrides(args)]
    experiment = load_experiment(args.config)
    if args.out_dir:
        experiment.out_dir = Path(args.out_dir)
    if args.list:
        from tint.pipeline import validate_components

        for cell in cells(experiment, args.full, args.overrides):
            try:
                validate_components(cell_config(experiment, cell))
            except TintError as err:
                raise TintError(f"cell {cell.name}: {err}") from err
            print(f"{cell.name}: {' '.join(cell.overrides)}")
        return 0
    if args.tables_only:
        rows = redraw_tables(experiment)
    else:
        rows = run_experiment(experiment, args.full, args.overrides)
    print(markdown_table(experiment, rows), end="")
    print(f"tables: {experiment.out_dir / 'results.md'}, {experiment.out_dir / 'results.csv'}")
    return 0


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(text)).strip("-") or "x"
