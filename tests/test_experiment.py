"""Experiment tables (paired differences), the cross-process stage lock, shared keys."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tint.evaluation.stats import mean_ci
from tint.experiment import Experiment, add_paired_differences, delta_column, markdown_table


def _experiment() -> Experiment:
    axes = {"teacher": [("pmf", {}), ("labelhalluc", {})],
            "synthetic": [("none", {}), ("tint", {})]}
    return Experiment(name="t2", out_dir=Path("unused"), base={}, axes=axes)


def _rows() -> list[dict]:
    per_episode = {("pmf", "none"): [0.50, 0.60, 0.40], ("pmf", "tint"): [0.55, 0.70, 0.42],
                   ("labelhalluc", "none"): [0.45, 0.50, 0.30],
                   ("labelhalluc", "tint"): [0.50, 0.52, 0.41]}
    rows = []
    for (teacher, synthetic), accs in per_episode.items():
        mean, ci = mean_ci(accs)
        rows.append({"teacher": teacher, "synthetic": synthetic, "model": "student",
                     "mean": mean, "ci": ci, "episodes": 3, "per_episode": accs})
    return rows


def test_paired_differences_compare_along_each_axis_with_the_rest_fixed():
    experiment, rows = _experiment(), _rows()
    add_paired_differences(experiment, rows)
    by = {(r["teacher"], r["synthetic"]): r for r in rows}
    vs_none, vs_pmf = delta_column("synthetic", "none"), delta_column("teacher", "pmf")
    # reference rows carry no difference to themselves
    assert vs_none not in by["pmf", "none"] and vs_pmf not in by["pmf", "none"]
    mean, ci = mean_ci([0.05, 0.10, 0.02])
    assert by["pmf", "tint"][vs_none] == pytest.approx({"mean": mean, "ci": ci})
    mean, ci = mean_ci([0.05, 0.02, 0.11])  # labelhalluc/tint vs labelhalluc/none
    assert by["labelhalluc", "tint"][vs_none] == pytest.approx({"mean": mean, "ci": ci})
    mean, ci = mean_ci([-0.05, -0.10, -0.10])  # labelhalluc/none vs pmf/none
    assert by["labelhalluc", "none"][vs_pmf] == pytest.approx({"mean": mean, "ci": ci})
    # pairing removes the episode-difficulty spread: narrower than either accuracy's CI
    assert by["pmf", "tint"][vs_none]["ci"] < min(by["pmf", "tint"]["ci"], by["pmf", "none"]["ci"])
    table = markdown_table(experiment, rows)
    assert "delta vs synthetic=none (paired, 95% CI)" in table
    assert "delta vs teacher=pmf (paired, 95% CI)" in table
    assert f"+{100 * by['pmf', 'tint'][vs_none]['mean']:.1f} +- " in table


def test_paired_differences_skip_rows_with_other_episode_counts():
    experiment, rows = _experiment(), _rows()
    rows[1]["per_episode"] = [0.5, 0.6]  # pmf/tint ran fewer episodes: no pairing
    add_paired_differences(experiment, rows)
    assert delta_column("synthetic", "none") not in rows[1]


def test_stage_lock_makes_a_concurrent_run_wait_and_reuse(tmp_path):
    """Two runs sharing a store ask for the same artifact at once: it is computed once."""
    from tint.config import config_from_dict
    from tint.engine import run_stage
    from tint.stage_bodies import RunContext

    config = config_from_dict({"name": "x", "run_dir": str(tmp_path / "run")})
    calls: list[str] = []

    def work(folder: Path) -> dict:
        calls.append(threading.current_thread().name)
        time.sleep(0.6)
        (folder / "out.txt").write_text("done")
        return {"value": 7}

    markers: dict[str, dict] = {}

    def one_run(name: str) -> None:
        ctx = RunContext(config, tmp_path / "run", tmp_path / "store")
        markers[name] = run_stage(ctx, "demo", tmp_path / "store" / "demo", {"k": 1}, "x", work)

    threads = [threading.Thread(target=one_run, args=(n,), name=n) for n in ("first", "second")]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert calls == ["first"]
    assert markers["first"] == markers["second"] and markers["second"]["value"] == 7


def test_no_synthetic_images_means_the_no_synthetic_student(tmp_path):
    """A count of 0 with `synthetic` in the sources is the `generator: none` student, so
    a count sweep's 0 shares its distillation with the none cell of another table."""
    from tint.config import config_from_dict
    from tint.stage_bodies import EpisodeData, RunContext, distill_config

    episode = EpisodeData(0, tmp_path, ["a"], [["a/1"]], [["a/2"]], [], {"e": 0})

    def sources(**generator) -> tuple[str, ...]:
        config = config_from_dict({"name": "x", "run_dir": str(tmp_path), "generator": generator,
                                   "students": [{"name": "s", "arch": "conv4",
                                                 "sources": ["base", "synthetic", "support"]}]})
        ctx = RunContext(config, tmp_path, tmp_path / "store")
        return distill_config(ctx, episode, config.students[0]).sources

    assert sources(name="tint", images_per_class=0) == ("base", "support")
    assert sources(name="none") == ("base", "support")
    assert sources(name="tint", images_per_class=10) == ("base", "synthetic", "support")


def test_tables_and_plots_are_written_for_numeric_and_categorical_axes(tmp_path):
    from PIL import Image

    from tint.experiment import write_tables

    categorical = _experiment()
    categorical.out_dir = tmp_path / "t2"
    rows = _rows()
    add_paired_differences(categorical, rows)
    write_tables(categorical, rows)
    csv_text = (tmp_path / "t2" / "results.csv").read_text()
    assert "delta vs synthetic=none mean" in csv_text.splitlines()[0]
    assert "0.5500 0.7000 0.4200" in csv_text  # per-episode accuracies kept
    numeric = Experiment(name="alpha", out_dir=tmp_path / "alpha", base={},
                         axes={"alpha": [("0.5", {}), ("1.0", {})]})
    rows = [{"alpha": a, "model": "student", "mean": m, "ci": 0.05, "episodes": 3,
             "fid": f, "per_episode": [m, m, m]} for a, m, f in (("0.5", 0.5, 3.0), ("1.0", 0.4, 5.0))]
    write_tables(numeric, rows)
    for folder in ("t2", "alpha"):
        with Image.open(tmp_path / folder / "results.png") as image:
            assert image.size[0] > 300 and image.size[1] > 100



def test_tables_only_redraws_from_results_json(tmp_path):
    from tint.errors import TintError
    from tint.experiment import redraw_tables, write_tables

    experiment = _experiment()
    experiment.out_dir = tmp_path / "t2"
    with pytest.raises(TintError, match="no results yet"):
        redraw_tables(experiment)
    rows = _rows()
    add_paired_differences(experiment, rows)
    write_tables(experiment, rows)
    (tmp_path / "t2" / "results.md").unlink()
    again = redraw_tables(experiment)
    assert again == rows and (tmp_path / "t2" / "results.md").is_file()
