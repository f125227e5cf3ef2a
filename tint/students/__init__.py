"""Tiny student classifiers (Conv4, ResNet12), created by name."""

from tint.students.models import (
    Student,
    count_parameters,
    create_student,
    list_students,
    register_student,
)

__all__ = ["Student", "count_parameters", "create_student", "list_students", "register_student"]
