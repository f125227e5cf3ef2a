"""Issue 21's table: distillation recipe x synthetic source on the registered offline benchmark.

Reads the committed per-episode results of the two recipes' runs over the same 10 novel
episodes (`paper`: docs/results/offline-benchmark/results.json, the registered run;
`consistent`: docs/results/offline-benchmark-consistent/results.json) and renders, per
recipe and source, the teacher, the student, the student's gap to its teacher, TINT - none
and consistent - paper, every difference paired by episode with its Student-t 95% CI:

    .venv/bin/python benchmarks/recipe_table.py            # print the markdown table
    .venv/bin/python benchmarks/recipe_table.py --json out.json

`benchmarks/readme_table.py` puts the same table in the README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"paper": ROOT / "docs" / "results" / "offline-benchmark" / "results.json",
        "consistent": ROOT / "docs" / "results" / "offline-benchmark-consistent" / "results.json"}
SOURCES = ("none", "tint")


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width of a - b over episodes, in points."""
    from tint.evaluation.stats import mean_ci

    mean, ci = mean_ci([100 * (x - y) for x, y in zip(a, b, strict=True)])
    return mean, ci


def per_episode(rows: list[dict], source: str, model: str) -> list[float] | None:
    for row in rows:
        if row.get("synthetic") == source and row["model"] == model:
            return row["per_episode"]
    return None


def load_runs() -> dict[str, list[dict]]:
    return {recipe: json.loads(path.read_text()) for recipe, path in RUNS.items() if path.is_file()}


def table_rows(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per (recipe, source): accuracies and paired differences."""
    from tint.evaluation.stats import mean_ci

    out = []
    for recipe, rows in runs.items():
        for source in SOURCES:
            student, teacher = per_episode(rows, source, "student"), per_episode(rows, source, "teacher")
            if student is None:
                continue
            row = {"recipe": recipe, "source": source, "episodes": len(student),
                   "student": mean_ci([100 * v for v in student]), "teacher": mean_ci([100 * v for v in teacher]),
                   "gap_to_teacher": paired(student, teacher)}
            online = per_episode(rows, source, "teacher-online")
            if online is not None:
                row["teacher_online"] = mean_ci([100 * v for v in online])
                row["gap_to_online_teacher"] = paired(student, online)
            none = per_episode(rows, "none", "student")
            if source != "none" and none is not None:
                row["tint_minus_none"] = paired(student, none)
            paper = per_episode(runs.get("paper", []), source, "student")
            if recipe != "paper" and paper is not None:
                row["minus_paper"] = paired(student, paper)
            out.append(row)
    return out


def _fmt(pair: tuple[float, float] | None, signed: bool = False) -> str:
    if pair is None:
        return ""
    mean, ci = pair
    return f"{mean:+.1f} +- {ci:.1f}" if signed else f"{mean:.1f} +- {ci:.1f} %"


def render(rows: list[dict]) -> str:
    head = ["recipe", "source", "teacher (224 px)", "online teacher (what the student saw)", "student",
            "student - teacher", "student - online teacher", "tint - none", "consistent - paper", "episodes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["recipe"], r["source"], _fmt(r["teacher"]), _fmt(r.get("teacher_online")),
                 _fmt(r["student"]), _fmt(r["gap_to_teacher"], True), _fmt(r.get("gap_to_online_teacher"), True),
                 _fmt(r.get("tint_minus_none"), True), _fmt(r.get("minus_paper"), True), str(r["episodes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = table_rows(load_runs())
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
