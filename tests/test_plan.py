"""`tint plan` through tint.cli.main, and the evaluation result file it reads."""

import json
import math

import numpy as np
import pytest

from tint.cli import main
from tint.errors import TintError
from tint.evaluation import EvaluationResult, load_result, mean_ci, save_result
from tint.evaluation.stats import estimate_a_sigma


def _plan(capsys, *argv):
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------- result files


def test_result_round_trip(tmp_path):
    accs = [0.9, 0.8, 0.85, 0.95]
    result = EvaluationResult.from_accuracies("tint", accs, 75, meta={"episodes": "ep.json"})
    path = tmp_path / "results" / "tint.json"
    save_result(path, result)
    loaded = load_result(path)
    assert loaded.method == "tint" and loaded.accuracies == accs and loaded.queries == [75] * 4
    assert (loaded.mean, loaded.ci_half_width) == pytest.approx(mean_ci(accs))
    assert loaded.meta == {"episodes": "ep.json"}
    assert "tint: 87.50 +-" in loaded.summary()


def test_single_episode_result_stores_null_ci(tmp_path):
    path = tmp_path / "one.json"
    save_result(path, EvaluationResult.from_accuracies("none", [0.7], [40]))
    assert json.loads(path.read_text())["ci_half_width"] is None
    assert math.isnan(load_result(path).ci_half_width)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"format": "other"}, "not a tint evaluation result"),
        ({"accuracies": [0.5, 1.5]}, "accuracies"),
        ({"queries": [75]}, "1 query counts for 2"),
        ({"queries": [75, 0]}, "queries"),
        ({"version": 99}, "version"),
    ],
)
def test_bad_result_files_name_the_file(tmp_path, patch, message):
    data = {"format": "tint-evaluation-result", "version": 1, "method": "m",
            "accuracies": [0.5, 0.6], "queries": [75, 75]}
    data.update(patch)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TintError, match=message) as err:
        load_result(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------- the CLI


def test_plan_variance_for_given_episodes(capsys):
    code, out, _ = _plan(capsys, "--accuracy", "0.87", "--sigma", "0.05", "--queries", "75",
                         "--episodes", "600")
    assert code == 0
    assert "6.6244e-06" in out                    # the paper's "7e-6"
    assert "+- 0.505 % (Student-t, 599 df)" in out


def test_plan_solves_for_episodes_on_the_paper_numbers(capsys):
    code, out, _ = _plan(capsys, "--accuracy", "0.93", "--sigma", "0.028", "--queries", "2975",
                         "--target-variance", "7e-6")
    assert code == 0 and "P = 116" in out
    code, out, _ = _plan(capsys, "--accuracy", "0.93", "--sigma", "0.0283", "--queries", "2975",
                         "--target-variance", "7e-6")
    assert code == 0 and "P = 118" in out        # the paper's 118 (see docs/evaluation.md)
    code, out, _ = _plan(capsys, "--accuracy", "0.93", "--sigma", "0.028", "--queries", "2975",
                         "--target-ci", "0.005")
    assert code == 0 and "P = 127" in out and "+- 0.498 %" in out


def test_plan_paper_example(capsys):
    code, out, _ = _plan(capsys, "--paper-example")
    assert code == 0
    for expected in ("1.154e-05", "6.624e-06", "P for the printed target 7e-6: 116",
                     "6.624e-06: 122", "P = 118", "120 episodes", "+- 0.51 %"):
        assert expected in out


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--accuracy", "87", "--sigma", "0.05", "--queries", "75", "--episodes", "600"], "--accuracy"),
        (["--accuracy", "0.87", "--sigma", "-0.1", "--queries", "75", "--episodes", "6"], "--sigma"),
        (["--accuracy", "0.99", "--sigma", "0.2", "--queries", "75", "--episodes", "6"], "--sigma"),
        (["--accuracy", "0.87", "--sigma", "0.05", "--queries", "0", "--episodes", "6"], "--queries"),
        (["--accuracy", "0.87", "--sigma", "0.05", "--queries", "75", "--episodes", "0"], "--episodes"),
        (["--accuracy", "0.87", "--sigma", "0.05", "--queries", "75", "--target-ci", "0.5"], "--target-ci"),
        (["--accuracy", "0.87", "--sigma", "0.05", "--queries", "75", "--target-variance", "0"],
         "--target-variance"),
        (["--accuracy", "0.87", "--sigma", "0.05", "--queries", "75"], "--episodes"),
        (["--accuracy", "0.87", "--queries", "75", "--episodes", "6"], "--sigma"),
    ],
)
def test_plan_errors_name_the_option(capsys, argv, option):
    code, out, err = _plan(capsys, *argv)
    assert code == 2
    assert option in err and out == ""


def test_plan_from_results(tmp_path, capsys):
    rng = np.random.default_rng(3)
    a_p = rng.beta(45, 5, size=60)
    accs = rng.binomial(75, a_p) / 75
    path = tmp_path / "res.json"
    save_result(path, EvaluationResult.from_accuracies("labelhalluc", accs, 75))
    a_hat, sigma_hat = estimate_a_sigma(accs, 75)
    mean, half = mean_ci(accs)

    code, out, _ = _plan(capsys, "--from-results", str(path))
    assert code == 0
    assert f"{100 * mean:.2f} %" in out and f"+- {100 * half:.3f} %" in out
    assert f"{100 * sigma_hat:.3f} %" in out and f"{100 * accs.std(ddof=1):.3f} %" in out

    code, out, _ = _plan(capsys, "--from-results", str(path), "--target-ci", "0.005",
                         "--queries", "2975")
    assert code == 0 and "with Q = 2975: P = " in out

    code, _, err = _plan(capsys, "--from-results", str(path), "--accuracy", "0.9")
    assert code == 2 and "--accuracy" in err
    code, _, err = _plan(capsys, "--from-results", str(tmp_path / "missing.json"))
    assert code == 2 and "missing.json" in err
