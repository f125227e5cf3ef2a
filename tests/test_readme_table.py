"""The README's headline table is the committed offline benchmark, rendered, nothing else.

A hand-edited number, a re-measured benchmark without a re-rendered README, or a changed
benchmark config without a re-measurement each fail here.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _readme_table():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benchmarks" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_headline_table_is_the_rendered_benchmark_results():
    table = _readme_table()
    assert table.current_block(table.README.read_text()) == table.block(table.load_rows())


def test_readme_recipe_table_is_the_rendered_results_of_both_recipes():
    table = _readme_table()
    readme = table.README.read_text()
    assert table.current_block(readme, table.RECIPES_BEGIN, table.RECIPES_END) == table.recipes_block()


def test_committed_results_were_measured_with_the_current_benchmark_config():
    table = _readme_table()
    # results, the config they were measured with and the command come together or not at all
    committed = [table.RESULTS.is_file(), table.COMMITTED_CONFIG.is_file(),
                 (table.COMMITTED_CONFIG.parent / "command.txt").is_file()]
    assert len(set(committed)) == 1
    if not committed[0]:
        assert table.NOT_MEASURED in table.README.read_text()
        return
    assert table.COMMITTED_CONFIG.read_text() == table.CONFIG.read_text()
    config = yaml.safe_load(table.CONFIG.read_text())
    rows = json.loads(table.RESULTS.read_text())
    cells = {entry["label"] for entry in next(iter(config["grid"].values()))}
    assert {row[next(iter(config["grid"]))] for row in rows} == cells
    # The run may have covered fewer episodes than registered (--set data.first_episodes=k);
    # the committed command says how many, and every row must have exactly that many.
    command = (table.COMMITTED_CONFIG.parent / "command.txt").read_text()
    found = re.search(r"data\.first_episodes=(\d+)", command)
    episodes = int(found.group(1)) if found else config["set"]["data.first_episodes"]
    assert "configs/experiments/offline-benchmark.yaml" in command
    assert all(row["episodes"] == episodes == len(row["per_episode"]) for row in rows)


def test_committed_results_were_measured_with_the_embedded_generator():
    """A re-trained embedded generator changes what the benchmark computes: its results
    must be re-measured (and the fingerprint re-recorded) with it."""
    table = _readme_table()
    if not table.RESULTS.is_file():
        return
    assert table.GENERATOR_RECORD.read_text().strip() == table.embedded_generator_fingerprint()


def test_render_shows_every_number_it_is_given():
    table = _readme_table()
    rows = [{"synthetic": "none", "model": "student", "mean": 0.5, "ci": 0.1, "episodes": 2,
             "per_episode": [0.4, 0.6]},
            {"synthetic": "tint", "model": "student", "mean": 0.55, "ci": 0.05, "episodes": 2,
             "per_episode": [0.5, 0.6], "delta vs synthetic=none": {"mean": 0.05, "ci": 0.02}}]
    text = table.render(rows)
    for expected in ("50.0 +- 10.0 %", "40.0 / 60.0", "55.0 +- 5.0 %", "+5.0 +- 2.0"):
        assert expected in text
    rows[1]["per_episode"] = [0.5, 0.61]
    assert table.render(rows) != text
    assert table.render(None) == table.NOT_MEASURED and "%" not in table.NOT_MEASURED
