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

from tint.registry import Registry
from tint.teachers.labelhalluc import LabelHallucTeacher, create_labelhalluc
from tint.teachers.protonet import ProtoNetTeacher, create_pmf
from tint.teachers.settings import resolve_teacher_settings

TEACHERS = Registry("teacher", {
    "pmf": "tint.teachers.protonet:create_pmf",
    "labelhalluc": "tint.teachers.labelhalluc:create_labelhalluc",
})


def available_teachers() -> list[str]:
    return TEACHERS.names()


def create_teacher(name: str, **kwargs) -> ProtoNetTeacher | LabelHallucTeacher:
    """Create a teacher by name: "pmf" or "labelhalluc"."""
    return TEACHERS.load(name)(**kwargs)


__all__ = ["TEACHERS", "LabelHallucTeacher", "ProtoNetTeacher", "available_teachers",
           "create_labelhalluc", "create_pmf", "create_teacher", "resolve_teacher_settings"]
