"""Teachers as the pipeline sees them: a key, a training, a loading, by name.

Each teacher module provides ``run_key(run)``, ``train_for_run(run, folder)`` and
``load_for_run(run, folder)``; `run` is a `TeacherInputs`. The pipeline keys, trains and
loads every teacher through these three calls and never branches on a teacher's name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from tint.registry import Registry

# name -> module providing run_key / train_for_run / load_for_run
RECIPES = Registry("teacher", {
    "pmf": "tint.teachers.protonet",
    "labelhalluc": "tint.teachers.labelhalluc",
})


@dataclass
class TeacherInputs:
    """What a teacher's training reads: its settings, the dataset and the base pool."""

    config: Any  # tint.config.TeacherConfig
    dataset: Any  # tint.data.datasets.FewShotDataset
    dataset_spec: str
    resolution: int
    base_split: str
    base_items: list[str]
    seed: int
    first_student_arch: str
    device: torch.device

    @property
    def settings(self) -> dict:
        """The teacher's settings object (typed at load) as its class's keyword arguments."""
        return asdict(self.config.settings)

    @property
    def settings_key(self) -> dict:
        """The settings that differ from their defaults: filling defaults into the config
        (so config.yaml lists them) must not change the artifact key."""
        return non_default_settings(self.config.name, self.settings)


def teacher_recipe(name: str):
    return RECIPES.load(name, key="teacher.name")


def non_default_settings(name: str, settings: dict) -> dict:
    from tint.teachers import resolve_teacher_settings

    defaults = asdict(resolve_teacher_settings(name, {}))
    return {k: v for k, v in settings.items() if k not in defaults or defaults[k] != v}
