"""What a run reports: accuracies per episode and model, means with 95% CIs, stage times.

`report(ctx, episodes)` is step 5 of `tint run` (also a Ray run's partial reports):
`collect_results` turns the episodes' evaluations (read through the stage table) into the
results dict (results.json, the HTML report's input); `write_model_results` writes one
evaluation-result file per model, the format `tint plan --from-results` reads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tint.engine import DONE
from tint.io import read_json

LOGGER = logging.getLogger("tint")


def report(ctx: Any, episodes: list) -> dict:
    """results.json, one result file per model, report.html (step 5 of `tint run`, and a
    Ray run's partial reports as episodes finish); returns the results."""
    from tint.config import dump_config
    from tint.io import write_json
    from tint.report import summary_lines, write_report
    from tint.stages import evaluation, synthetic_paths

    evaluations = [{**evaluation(ctx, ep), "synthetic": synthetic_paths(ctx, ep)} for ep in episodes]
    results = collect_results(ctx, episodes, evaluations)
    write_model_results(ctx, results)
    if ctx.config.report.enabled:
        start = time.perf_counter()
        write_report(ctx.run_dir, results, dump_config(ctx.config), ctx.config.report.grid_images)
        results["timings"]["report"] = round(time.perf_counter() - start, 2)
    write_json(ctx.run_dir / "results.json", public_results(results))
    LOGGER.info("results: %s", "; ".join(summary_lines(results)[1:]))
    return results


def collect_results(ctx: Any, episodes: list, evaluations: list[dict]) -> dict:
    from tint.evaluation.stats import mean_ci

    config = ctx.config
    from tint.stage_bodies import ONLINE_TEACHER

    online = [ONLINE_TEACHER] if config.distill.consistent else []
    models = ["teacher", *online] + [s.name for s in config.students]
    rows = []
    for episode, evaluation in zip(episodes, evaluations, strict=True):
        support_png = read_json(episode.folder / DONE)["support_png"]
        rows.append({
            "index": episode.index,
            "classes": episode.classes,
            "n_query": sum(len(q) for q in episode.query),
            "accuracy": evaluation["accuracy"],
            **({"repeats": evaluation["repeats"]} if config.distill.repeats > 1 else {}),
            "curves": evaluation.get("curves", {}),
            "support": [[str(ctx.run_dir / p) for p in row] for row in support_png],
            "generated": [paths[: config.report.grid_images] for paths in evaluation["synthetic"]],
            "_synthetic": evaluation["synthetic"],  # every path; not written to results.json
        })
    summary = {}
    for model in models:
        mean, ci = mean_ci([row["accuracy"][model] for row in rows])
        summary[model] = {"mean": mean, "ci": ci, "n": len(rows)}
    return {"name": config.name, "models": models, "episodes": rows, "summary": summary,
            "timings": stage_timings(ctx.markers), "environments": environments(ctx.markers)}


def public_results(results: dict) -> dict:
    """results without the private (underscore) keys of its episode rows."""
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in results["episodes"]]
    return {**results, "episodes": rows}


def stage_timings(markers: dict[str, dict]) -> dict[str, float]:
    """Seconds per stage over the markers this run used (time of the first computation)."""
    from tint.stages import timed_stages

    totals = dict.fromkeys(timed_stages(), 0.0)
    for marker in markers.values():
        totals[marker["stage"]] = totals.get(marker["stage"], 0.0) + float(marker.get("seconds", 0.0))
    return {stage: round(seconds, 2) for stage, seconds in totals.items()}


def environments(markers: dict[str, dict]) -> list[dict]:
    """The distinct environments that computed this run's artifacts (older markers have none)."""
    seen: list[dict] = []
    for marker in markers.values():
        env = marker.get("environment")
        if env is not None and env not in seen:
            seen.append(env)
    return seen


def write_model_results(ctx: Any, results: dict) -> None:
    """One tint evaluation result file per model (readable by `tint plan --from-results`)."""
    from tint.evaluation.evaluate import EvaluationResult, save_result

    for model in results["models"]:
        accs = [row["accuracy"][model] for row in results["episodes"]]
        queries = [row["n_query"] for row in results["episodes"]]
        result = EvaluationResult.from_accuracies(f"{ctx.config.name}/{model}", accs, queries,
                                                  meta={"run_dir": str(ctx.run_dir)})
        save_result(Path(ctx.run_dir) / "results" / f"{model}.json", result)
