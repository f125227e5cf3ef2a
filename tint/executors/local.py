"""The local executor: every unit in this process, in the plan's order (today's order:
teacher, then per episode each class's specialise + generate, labels, students,
evaluation, export)."""

from __future__ import annotations


def run_units(ctx, episodes, units) -> None:
    from tint.stages import run_unit

    for unit in units:
        run_unit(ctx, episodes, unit)
