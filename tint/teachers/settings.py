"""The settings a config may give a teacher (``teacher.settings``), one dataclass per teacher.

Each field is a keyword argument of the teacher's class with the same default, so the
pipeline passes ``**settings`` unchanged. What the run config sets elsewhere is not here:
pmf's ``batch_size`` is ``teacher.batch_size`` and its ``seed`` the run seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tint.registry import Registry
from tint.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Settings, resolve


@dataclass
class PMFSettings(Settings):
    """`tint.teachers.protonet.ProtoNetTeacher`'s keyword arguments."""

    scale: float = 10.0  # initial scale of the cosine classifier (learned in meta-training)
    finetune_steps: int = 0  # P>M>F support fine-tuning steps per episode (0: off, the paper's)
    finetune_lr: float = 1e-4

    RANGES = {"scale": POSITIVE, "finetune_steps": NON_NEGATIVE, "finetune_lr": POSITIVE}


@dataclass
class LabelHallucSettings(Settings):
    """`tint.teachers.labelhalluc.LabelHallucTeacher`'s keyword arguments."""

    C: float = 1.0  # inverse L2 strength of the logistic regression
    max_iter: int = 1000  # logistic-regression solver iterations
    batch_size: int = 128  # images per forward pass when embedding
    augment_copies: int = 0  # extra augmented views of each support image
    seed: int = 0  # augmentation draws

    RANGES = {"C": POSITIVE, "max_iter": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE,
              "augment_copies": NON_NEGATIVE}


TEACHER_SETTINGS = Registry("teacher", {
    "pmf": "tint.teachers.settings:PMFSettings",
    "labelhalluc": "tint.teachers.settings:LabelHallucSettings",
})


def resolve_teacher_settings(name: str, settings: Any = None) -> Settings:
    """``teacher.settings`` (a mapping, or the dataclass itself, returned as is) as the
    teacher's dataclass: coerced, defaults filled, checked. `tint.config` calls it at load."""
    cls = TEACHER_SETTINGS.load(name, key="teacher.name")
    return resolve(cls, settings, "teacher.settings")
