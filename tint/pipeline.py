"""`tint run`: every stage of the method for one or many episodes.

`run_pipeline` reads from the top as the method's steps::

    1. resolve the context (device, store, log) and claim the run dir
    2. prepare       episodes, base pool, support PNGs              episodes/epNNN/
    3. plan_units    the unit graph of the stage table (tint.stages), as data
    4. execute       each unit through the engine (local order, or a Ray cluster)
    5. report        results.json, per-model results, report.html

This is the driver, the top layer: the stage table (tint.stages) declares the graph, the
stage bodies (tint.stage_bodies) compute the artifacts, the executors (tint.executors)
run the units. docs/pipeline.md has the table stage -> function -> artifact -> key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from tint.config import RunConfig, dump_config
from tint.engine import NonFiniteError
from tint.io import set_threads
from tint.results import report
from tint.stage_bodies import EpisodeData, RunContext, make_context, prepare
from tint.stages import Unit, plan_units

LOGGER = logging.getLogger("tint")
__all__ = ["NonFiniteError", "attach_log", "execute", "report", "run_pipeline", "run_units", "validate_components"]


def run_pipeline(config: RunConfig, store: str | Path | None = None,
                 hooks: dict[str, Callable[..., None]] | None = None,
                 allow_config_change: bool = False) -> dict:
    """Run (or resume) every stage of `config`; return the results dict (results.json).

    The run dir is locked for the whole run and must hold this config's results or none
    (tint.rundir; `allow_config_change` replaces another config's results)."""
    from tint.rundir import claim_run_dir

    validate_components(config)  # before anything is written
    ctx = make_context(config, store, hooks)
    with claim_run_dir(ctx.run_dir, dump_config(config), allow_config_change):
        handler = attach_log(ctx.run_dir / "log.txt")
        try:
            LOGGER.info("tint run %s -> %s (device %s)", config.name, ctx.run_dir, ctx.device)
            episodes = run_units(ctx)
            return report(ctx, episodes)
        finally:
            LOGGER.removeHandler(handler)
            handler.close()


def run_units(ctx: RunContext, select: Callable[[list[Unit]], list[Unit]] = list) -> list[EpisodeData]:
    """Steps 2-4: prepare the episodes, plan the units (those `select` keeps) and execute
    them; the prepared episodes. `tint run` and `tint fit` (no evaluation) both run this."""
    set_threads(ctx.config.threads)
    episodes = prepare(ctx)
    execute(ctx, episodes, select(plan_units(ctx, episodes)))
    return episodes


def execute(ctx: RunContext, episodes: list[EpisodeData], units: list[Unit]) -> None:
    """Hand the unit graph to the executor named by `config.executor.name`."""
    from tint.executors import get_executor

    get_executor(ctx.config.executor.name)(ctx, episodes, units)


def attach_log(path: Path) -> logging.Handler:
    """Log the run to `path` as well (log.txt of the run dir or the fit's work dir)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    return handler


def validate_components(config: RunConfig) -> None:
    """Check names and component settings before any work, each error naming its key (a
    loaded config was checked already; one built in code is checked here)."""
    from tint.config import check_components

    check_components(config)
