"""Synthetic-data generators, one module per method, created by name (see docs/generators.md).

Every generator module satisfies `tint.generators.base.Generator`: ``NAME``, its settings
dataclasses ``SpecializeSettings`` and ``GenerateSettings``, ``REQUIRED_TENSORS``,
``MAY_RETURN_FEWER``, ``specialize(backbone, class_name, support, out_dir, settings) -> Path``
and ``generate(backbone, artifact_path, n_images, out_dir, seed, settings) -> list[Path]``.
Modules are imported lazily (`tint.registry`) so that one generator's optional dependencies
cannot break another; no generator imports another: what they share is in ``base``.
"""

from __future__ import annotations

from typing import Any

from tint.generators.base import Generator
from tint.registry import Registry
from tint.settings import resolve

# name -> module. Add new generators here.
GENERATORS = Registry("generator", {
    "tint": "tint.generators.tint",
    "tint-lora": "tint.generators.tint:TINT_LORA",  # TINT + UNet LoRA on the supports (issue 14)
    "plain-ti": "tint.generators.plain_ti",
    "da-fusion": "tint.generators.da_fusion",
    "none": "tint.generators.none",
    "real-mining": "tint.generators.real_mining",
    "nao": "tint.generators.nao",
})


def available_generators() -> list[str]:
    return GENERATORS.names()


def create_generator(name: str) -> Generator:
    """The generator module registered under `name` (as timm's create_model, by name)."""
    return GENERATORS.load(name)


def resolve_settings(name: str, specialize: Any = None, generate: Any = None) -> tuple[Any, Any]:
    """The generator's (SpecializeSettings, GenerateSettings) from config mappings (or its
    settings objects, returned as they are): coerced, defaults filled in and range-checked,
    errors naming ``generator.<part>.<key>``. `tint.config` calls it once, at load."""
    module = GENERATORS.load(name, key="generator.name")
    return (resolve(module.SpecializeSettings, specialize, "generator.specialize"),
            resolve(module.GenerateSettings, generate, "generator.generate"))


__all__ = ["GENERATORS", "Generator", "available_generators", "create_generator",
           "resolve_settings"]
