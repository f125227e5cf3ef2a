"""Statistics of multi-episode few-shot evaluation (paper section 3.3, appendix A.3).

The evaluation draws P episodes; in episode p the method has an unknown true accuracy
a_p (random over episodes, mean a, variance sigma^2) and we observe a~_p, the accuracy
on Q query images, i.e. the mean of Q Bernoulli(a_p) trials. The final estimate is
a~ = mean_p a~_p. This module gives:

- per-episode accuracy and the usual Student-t confidence interval over episodes;
- Theorem 1 (Eq. 6) and its large-Q form (Eq. 7) for Var[a~], to plan P and Q;
- the inverse problem (how many episodes reach a target variance or CI);
- estimates of a and sigma from observed per-episode accuracies, with the finite-Q
  Bernoulli noise removed from sigma (derivation in docs/evaluation.md).

Accuracies are fractions in [0, 1] throughout (multiply by 100 only for display).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats as scipy_stats

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


def _as_float_array(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _check_fraction(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")


def _check_count(name: str, value: float) -> None:
    if not value >= 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


# ----------------------------------------------------------------- observed accuracies


def episode_accuracy(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float:
    """Fraction of correct predictions. `pred` is either labels [B] or scores [B, N]
    (logits or probabilities; the arg-max is taken)."""
    pred_t = torch.as_tensor(pred)
    target_t = torch.as_tensor(target).reshape(-1)
    if pred_t.ndim == 2:
        pred_t = pred_t.argmax(dim=1)
    pred_t = pred_t.reshape(-1)
    if pred_t.numel() != target_t.numel():
        raise ValueError(f"{pred_t.numel()} predictions for {target_t.numel()} targets")
    if target_t.numel() == 0:
        raise ValueError("cannot compute the accuracy of an empty query set")
    return float((pred_t.to(target_t.dtype) == target_t).double().mean())


def mean_ci(accs: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Mean of per-episode accuracies and the half-width of its Student-t confidence
    interval (t quantile with P-1 degrees of freedom times the standard error).

    With a single episode there is no spread to estimate: the half-width is NaN.
    """
    values = _as_float_array(accs)
    if values.size == 0:
        raise ValueError("mean_ci needs at least one accuracy")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan")
    std_err = float(values.std(ddof=1)) / math.sqrt(values.size)
    quantile = float(scipy_stats.t.ppf(0.5 + confidence / 2.0, df=values.size - 1))
    return mean, quantile * std_err


# ----------------------------------------------------------------- Theorem 1


def per_episode_variance(a: float, sigma: float, Q: float) -> float:
    """Var[a~_p] = a(1-a)/Q + (1 - 1/Q) sigma^2 (appendix A.3, Eq. 14)."""
    _check_fraction("a", a)
    _check_count("Q", Q)
    if sigma < 0 or sigma > 0.5:
        raise ValueError(f"sigma must be in [0, 0.5] (the std of a value in [0, 1]), got {sigma}")
    if sigma * sigma > a * (1 - a) + 1e-12:
        raise ValueError(
            f"sigma^2 = {sigma * sigma:.3g} exceeds a(1-a) = {a * (1 - a):.3g}: "
            "no distribution on [0, 1] with mean a has that spread"
        )
    return a * (1.0 - a) / Q + (1.0 - 1.0 / Q) * sigma * sigma


def estimator_variance(a: float, sigma: float, P: float, Q: float) -> float:
    """Theorem 1, Eq. 6: Var[a~] = (1/P) (a(1-a)/Q + (1 - 1/Q) sigma^2)."""
    _check_count("P", P)
    return per_episode_variance(a, sigma, Q) / P


def estimator_variance_large_q(a: float, sigma: float, P: float, Q: float) -> float:
    """Eq. 7, the moderately-large-Q approximation: (1/P) (a(1-a)/Q + sigma^2).

    It slightly over-estimates Eq. 6 (by sigma^2 / (PQ)), so plans made with it are safe.
    """
    _check_count("P", P)
    per_episode_variance(a, sigma, Q)  # same argument checks
    return (a * (1.0 - a) / Q + sigma * sigma) / P


def ci_half_width_from_variance(
    var: float, P: int, confidence: float = 0.95, distribution: str = "t"
) -> float:
    """Expected CI half-width for an estimator variance `var` over P episodes.

    "t" (default) uses the Student-t quantile with P-1 degrees of freedom, i.e. the
    interval `mean_ci` will report once the P episodes are run (with the sample std
    replaced by its expected value); it is infinite for P < 2. "normal" uses the
    normal quantile, the large-P limit (1.96 sqrt(var) at 95%).
    """
    if var < 0:
        raise ValueError(f"variance must be >= 0, got {var}")
    _check_count("P", P)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return _quantile(P, confidence, distribution) * math.sqrt(var)


def _quantile(P: int, confidence: float, distribution: str) -> float:
    if distribution == "normal":
        return float(scipy_stats.norm.ppf(0.5 + confidence / 2.0))
    if distribution != "t":
        raise ValueError(f"distribution must be 't' or 'normal', got {distribution!r}")
    if P < 2:
        return math.inf
    return float(scipy_stats.t.ppf(0.5 + confidence / 2.0, df=P - 1))


def _ceil(x: float) -> int:
    """Ceiling that ignores floating-point dust (117.99999999997 -> 118, not 119)."""
    return max(1, math.ceil(x - 1e-9 * max(1.0, abs(x))))


def episodes_needed(
    a: float,
    sigma: float,
    Q: float,
    target_variance: float | None = None,
    target_ci: float | None = None,
    confidence: float = 0.95,
    distribution: str = "t",
    large_q: bool = False,
) -> int:
    """Smallest number of episodes P whose estimator variance (Eq. 6, or Eq. 7 with
    `large_q`) is at most `target_variance`, or whose expected CI half-width
    (see `ci_half_width_from_variance`) is at most `target_ci`. Give exactly one target.
    """
    if (target_variance is None) == (target_ci is None):
        raise ValueError("give exactly one of target_variance and target_ci")
    if large_q:
        per_episode = estimator_variance_large_q(a, sigma, 1, Q)
    else:
        per_episode = per_episode_variance(a, sigma, Q)
    if target_variance is not None:
        if not target_variance > 0:
            raise ValueError(f"target_variance must be > 0, got {target_variance}")
        return _ceil(per_episode / target_variance)
    assert target_ci is not None
    if not target_ci > 0:
        raise ValueError(f"target_ci must be > 0, got {target_ci}")
    return _episodes_for_ci(per_episode, target_ci, confidence, distribution)


def _episodes_for_ci(per_episode: float, target_ci: float, confidence: float, distribution: str) -> int:
    """The half-width q(P) sqrt(v/P) falls monotonically in P: start at the normal-quantile
    answer (a lower bound, since t > z), then double and bisect."""

    def half_width(P: int) -> float:
        return _quantile(P, confidence, distribution) * math.sqrt(per_episode / P)

    z = float(scipy_stats.norm.ppf(0.5 + confidence / 2.0))
    low = _ceil(per_episode * z * z / (target_ci * target_ci))
    if distribution == "t":
        low = max(low, 2)
    if half_width(low) <= target_ci:
        return low
    high = low * 2
    while half_width(high) > target_ci:
        low, high = high, high * 2
    while high - low > 1:  # invariant: half_width(low) > target >= half_width(high)
        mid = (low + high) // 2
        if half_width(mid) <= target_ci:
            high = mid
        else:
            low = mid
    return high


# ----------------------------------------------------------------- estimating a and sigma


def _queries_per_episode(Q: float | Sequence[float] | np.ndarray, n_episodes: int) -> np.ndarray:
    q = np.asarray(Q, dtype=np.float64).reshape(-1)
    if q.size == 1:
        q = np.full(n_episodes, float(q[0]))
    if q.size != n_episodes:
        raise ValueError(f"{q.size} query counts for {n_episodes} episodes")
    if np.any(q < 2):
        raise ValueError(
            "every episode needs Q >= 2 queries to separate sigma from Bernoulli noise "
            f"(got min Q = {q.min():g})"
        )
    return q


def effective_queries(Q: float | Sequence[float] | np.ndarray) -> float:
    """The Q to plan with when episodes had different query counts: the harmonic mean,
    because Theorem 1's noise term averages a(1-a)/Q_p over episodes."""
    q = np.asarray(Q, dtype=np.float64).reshape(-1)
    return float(1.0 / np.mean(1.0 / q))


def estimate_sigma2(accs: ArrayLike, Q: float | Sequence[float] | np.ndarray) -> float:
    """Unbiased estimate of sigma^2 = Var[a_p] from observed accuracies a~_p on Q_p queries.

    Law of total variance: Var[a~_p] = E[a_p(1-a_p)]/Q_p + sigma^2, and since
    E[a~_p(1-a~_p) | a_p] = (1 - 1/Q_p) a_p(1-a_p), the term a~_p(1-a~_p)/(Q_p-1) is
    unbiased for the Bernoulli part. So sigma^2 ~ s^2 - mean_p a~_p(1-a~_p)/(Q_p-1),
    with s^2 the (ddof=1) sample variance. For constant Q this equals
    (Q s^2 - m(1-m) - s^2/P)/(Q-1), m the mean. It can be negative (not clipped here).
    """
    values = _as_float_array(accs)
    if values.size < 2:
        raise ValueError("estimating sigma needs accuracies of at least 2 episodes")
    if np.any((values < 0) | (values > 1)):
        raise ValueError("accuracies must be fractions in [0, 1]")
    q = _queries_per_episode(Q, values.size)
    bernoulli_part = np.mean(values * (1.0 - values) / (q - 1.0))
    return float(values.var(ddof=1) - bernoulli_part)


def estimate_a_sigma(accs: ArrayLike, Q: float | Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(a, sigma) from per-episode accuracies: a = the mean (unbiased, Eq. 5); sigma from
    `estimate_sigma2` clipped at 0 (a negative estimate means the spread between episodes
    is below what the query noise alone explains)."""
    values = _as_float_array(accs)
    sigma2 = estimate_sigma2(values, Q)
    return float(values.mean()), math.sqrt(max(sigma2, 0.0))


def naive_sigma(accs: ArrayLike) -> float:
    """The sample std of a~_p: biased upwards by the query noise (kept for comparison)."""
    return float(_as_float_array(accs).std(ddof=1))
