"""Evaluation: per-episode accuracy, Student-t CIs, Theorem 1 planning, result files."""

from tint.evaluation.evaluate import (
    EvaluationResult,
    evaluate_on_episode,
    load_result,
    save_result,
)
from tint.evaluation.stats import (
    ci_half_width_from_variance,
    episode_accuracy,
    episodes_needed,
    estimate_a_sigma,
    estimate_sigma2,
    estimator_variance,
    estimator_variance_large_q,
    mean_ci,
    per_episode_variance,
)

__all__ = [
    "EvaluationResult",
    "ci_half_width_from_variance",
    "episode_accuracy",
    "episodes_needed",
    "estimate_a_sigma",
    "estimate_sigma2",
    "estimator_variance",
    "estimator_variance_large_q",
    "evaluate_on_episode",
    "load_result",
    "mean_ci",
    "per_episode_variance",
    "save_result",
]
