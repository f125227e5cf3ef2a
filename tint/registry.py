"""One way to register components by name: datasets, generators, teachers, students, backbones.

A `Registry` maps a name to ``"module"`` or ``"module:attribute"``, imported only when the
name is used: one component's optional dependencies cannot break another, ``tint --help``
stays fast, and a registry module never imports the modules it lists (no import circles:
``tint.data.formats`` imports ``tint.data.datasets``, never the reverse). Each package
exposes ``available_<kind>s()`` (the names) and ``create_<kind>(name, ...)`` over its registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from tint.errors import TintError


def import_target(target: str) -> Any:
    """"module" or "module:attribute", imported now."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


class Registry(Mapping[str, str]):
    """name -> "module[:attribute]" target; `load(name)` imports and returns the target."""

    def __init__(self, kind: str, targets: Mapping[str, str]) -> None:
        self.kind = kind
        self._targets = dict(targets)

    def __getitem__(self, name: str) -> str:
        return self._targets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def names(self) -> list[str]:
        return list(self._targets)

    def register(self, name: str, target: str) -> None:
        """Add (or replace) a component: `target` is "module" or "module:attribute"."""
        self._targets[name] = target

    def check(self, name: str, key: str | None = None) -> None:
        """Refuse an unknown name; the message names `key` (e.g. ``generator.name``) if given."""
        if name not in self._targets:
            where = f"{key}: " if key else ""
            raise TintError(f"{where}unknown {self.kind} {name!r}; choose one of "
                            f"{', '.join(self._targets)}")

    def load(self, name: str, key: str | None = None) -> Any:
        """The registered module (or its attribute), imported now."""
        self.check(name, key)
        target = self._targets[name]
        try:
            return import_target(target)
        except ModuleNotFoundError as err:
            if err.name == target.partition(":")[0]:
                raise TintError(f"{self.kind} {name!r}: not available in this installation "
                                f"(module {err.name} is missing)") from err
            raise
