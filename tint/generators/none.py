"""The "no synthetic data" baseline (Table 3, first row) behind the generator interface.

It exists so that a run config or experiment grid can name ``none`` like any other
generator: specialisation writes a tensor-free artifact (the stage's completion marker,
recording the class), and generation writes no image and an empty manifest. The
distillation stage then sees zero synthetic images and trains on support + base only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tint.generators.base import (
    MANIFEST_NAME,
    artifact_path,
    check_count,
    load_artifact,
    save_artifact,
    settings_dict,
    settings_from,
    validate_support,
)
from tint.settings import AT_LEAST_ONE, Settings

NAME = "none"
REQUIRED_TENSORS: tuple[str, ...] = ()
MAY_RETURN_FEWER = False


@dataclass
class SpecializeSettings(Settings):
    dataset_resolution: int | None = None  # only validated: supports must have this size

    RANGES = {"dataset_resolution": AT_LEAST_ONE}


@dataclass
class GenerateSettings(Settings):
    resolution: int | None = None  # accepted for interface parity; nothing is written

    RANGES = {"resolution": AT_LEAST_ONE}


def specialize(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
               settings: SpecializeSettings | dict | None = None) -> Path:
    """Write ``<out_dir>/<class>.safetensors`` with no tensors (the backbone is not used)."""
    s = settings_from(SpecializeSettings, settings)
    support = validate_support(support, class_name, s.dataset_resolution)
    meta = {"generator": NAME, "class": class_name, "support_count": int(support.shape[0]),
            "dataset_resolution": int(support.shape[-1]), "settings": settings_dict(s)}
    return save_artifact(artifact_path(out_dir, class_name), {}, meta)


def generate(backbone: Any, artifact_path: str | Path, n_images: int, out_dir: str | Path,
             seed: int = 0, settings: GenerateSettings | dict | None = None) -> list[Path]:
    """No images: leave (or create) an empty manifest so later stages see "done, zero images"."""
    settings_from(GenerateSettings, settings)
    check_count(n_images)
    load_artifact(artifact_path, REQUIRED_TENSORS, generator=NAME)  # a wrong file is an error
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).touch(exist_ok=True)
    return []
