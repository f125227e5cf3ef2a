"""Executors: what runs the planned units of a run (`executor.name` in the config).

Each executor is a function ``run_units(ctx, episodes, units) -> None`` in its own module, looked up
by name here and imported only when chosen (Ray is an optional extra: `tint-fewshot[ray]`).
"""

from __future__ import annotations

from collections.abc import Callable

from tint.registry import Registry

EXECUTORS = Registry("executor", {
    "local": "tint.executors.local:run_units",
    "ray": "tint.executors.ray_executor:run_units",
})


def available_executors() -> list[str]:
    return EXECUTORS.names()


def get_executor(name: str) -> Callable:
    """The executor function called `name` (executor.name / --executor)."""
    return EXECUTORS.load(name, key="executor.name")
