"""Synthetic-data generators, one module per method, created by name (see docs/generators.md).

Every generator module exposes ``NAME``, ``specialize(backbone, class_name, support, out_dir,
settings) -> Path`` and ``generate(backbone, artifact_path, n_images, out_dir, seed, settings)
-> list[Path]``, plus its settings dataclasses ``SpecializeSettings`` and ``GenerateSettings``.
Modules are imported lazily so that one generator's optional dependencies cannot break another.
"""

from __future__ import annotations

import importlib

from tint.errors import TintError
from tint.generators.base import Generator

# name -> module. Add new generators here.
GENERATORS: dict[str, str] = {
    "tint": "tint.generators.tint",
    "plain-ti": "tint.generators.plain_ti",
    "da-fusion": "tint.generators.da_fusion",
    "none": "tint.generators.none",
    "real-mining": "tint.generators.real_mining",
    "nao": "tint.generators.nao",
}


def available_generators() -> list[str]:
    return list(GENERATORS)


def create_generator(name: str) -> Generator:
    """The generator module registered under `name` (as timm's create_model, by name)."""
    if name not in GENERATORS:
        raise TintError(f"generator {name!r}: unknown; choose from {', '.join(GENERATORS)}")
    try:
        return importlib.import_module(GENERATORS[name])  # type: ignore[return-value]
    except ModuleNotFoundError as err:
        if err.name == GENERATORS[name]:
            raise TintError(f"generator {name!r}: not available in this installation "
                            f"(module {GENERATORS[name]} is missing)") from err
        raise


__all__ = ["GENERATORS", "Generator", "available_generators", "create_generator"]
