"""Executors: what runs the planned units of a run (`executor.name` in the config).

Each executor is a function ``run_units(ctx, episodes, units) -> None`` in its own module, looked up
by name here and imported only when chosen (Ray is an optional extra: `tint-fewshot[ray]`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from tint.errors import TintError

# name -> "module:function"
EXECUTORS: dict[str, str] = {
    "local": "tint.executors.local:run_units",
    "ray": "tint.executors.ray_executor:run_units",
}


def get_executor(name: str) -> Callable:
    """The executor function called `name` (executor.name / --executor)."""
    if name not in EXECUTORS:
        raise TintError(f"executor.name: unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
    module_name, function = EXECUTORS[name].split(":")
    return getattr(importlib.import_module(module_name), function)
