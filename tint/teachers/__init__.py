"""Few-shot teachers that pseudo-label images for distillation, created by name.

Every teacher has ``fit(support, labels, ids=None)`` and
``predict_proba(x, ids=None) -> Tensor[B, N]`` (``ids``: optional item ids used as keys of a
feature cache), plus ``accuracy(x, labels)``.

- ``create_teacher("pmf", backbone="efficientnet-lite0", weights=None, ...)``: P>M>F
  ProtoNet (``tint.teachers.protonet``); ``weights`` = a file written by
  ``ProtoNetTeacher.save`` after ``meta_train``.
- ``create_teacher("labelhalluc", weights=PATH, ...)`` or ``(..., network=model)``:
  logistic regression on a base-pretrained student-architecture network
  (``tint.teachers.labelhalluc``; ``pretrain_on_base`` writes the weights).

``available_teachers()`` lists the names; the settings a config gives a teacher
(``teacher.settings``) are typed in ``tint.teachers.settings`` (`resolve_teacher_settings`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tint.errors import TintError
from tint.registry import Registry
from tint.teachers.backbones import load_feature_backbone
from tint.teachers.labelhalluc import LabelHallucTeacher, load_labelhalluc_teacher
from tint.teachers.protonet import ProtoNetTeacher
from tint.teachers.settings import resolve_teacher_settings

TEACHERS = Registry("teacher", {
    "pmf": "tint.teachers:create_pmf",
    "labelhalluc": "tint.teachers:create_labelhalluc",
})


def create_pmf(backbone: str = "efficientnet-lite0", weights: str | Path | None = None,
               input_size: int | None = None, allow_download: bool = False, seed: int = 0,
               **kwargs) -> ProtoNetTeacher:
    """P>M>F teacher; ``kwargs`` go to ProtoNetTeacher (scale, batch_size, finetune_steps...)."""
    extractor = load_feature_backbone(backbone, input_size=input_size,
                                      allow_download=allow_download, seed=seed)
    teacher = ProtoNetTeacher(extractor, seed=seed, **kwargs)
    if weights is not None:
        teacher.load(weights)
    teacher.eval()
    return teacher


def create_labelhalluc(weights: str | Path | None = None, network: nn.Module | None = None,
                       **kwargs) -> LabelHallucTeacher:
    """LabelHalluc teacher from pretrained weights or an in-memory network."""
    if (weights is None) == (network is None):
        raise TintError("teacher labelhalluc: give either weights (a file written by "
                        "pretrain_on_base) or network")
    if network is not None:
        return LabelHallucTeacher(network, **kwargs)
    return load_labelhalluc_teacher(weights, **kwargs)


def available_teachers() -> list[str]:
    return TEACHERS.names()


def create_teacher(name: str, **kwargs) -> ProtoNetTeacher | LabelHallucTeacher:
    """Create a teacher by name: "pmf" or "labelhalluc"."""
    return TEACHERS.load(name)(**kwargs)


__all__ = ["TEACHERS", "LabelHallucTeacher", "ProtoNetTeacher", "available_teachers",
           "create_teacher", "resolve_teacher_settings"]
