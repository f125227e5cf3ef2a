"""`--executor ray` on a real local Ray cluster (2 CPUs and one *logical* GPU, no CUDA).

One cluster for the module. The tiny config (one episode) runs once locally and once on
Ray from scratch; the fault tests copy the Ray run, delete its students (distil, evaluate,
export) and run those again with a fault: a killed worker, a unit that raises, a killed
driver. Every run must end with the local run's accuracies and student weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install tint-fewshot[ray])")

from tint.cli import main as tint_main  # noqa: E402
from tint.config import dump_config, load_config  # noqa: E402
from tint.errors import TintError  # noqa: E402
from tint.executors import ray_executor  # noqa: E402
from tint.executors.ray_executor import Task, drive  # noqa: E402
from tint.pipeline import run_pipeline  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
STUDENT_STAGES = ("distill", "evaluate", "export")


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def cluster(faults):
    """A local cluster; workers inherit the fault folder (set before the cluster starts)."""
    os.environ[ray_executor.FAULTS_ENV] = str(faults)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    os.environ.pop(ray_executor.FAULTS_ENV, None)


# Only the teacher asks for the (logical) GPU: Ray starts a fresh worker process for every GPU
# task, which pays torch's imports again; the CPU units share two reused workers.
CPU_ONLY = {f"executor.gpus.{stage}": 0 for stage in ("specialize", "generate", "pseudo-label")}
CPU_STAGES = [f"{key}={value}" for key, value in CPU_ONLY.items()]


def tiny_config(run_dir: Path, executor: str = "local", *extra: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={run_dir}", "data.n_episodes=1", "report.enabled=false", "export.onnx=false",
        f"executor.name={executor}", *CPU_STAGES, *extra])


def run_counting(config) -> tuple[dict, list[str]]:
    submitted: list[str] = []
    results = run_pipeline(config, hooks={"ray-submit": submitted.append})
    return results, submitted


def accuracies(run_dir: Path) -> list[dict]:
    results = json.loads((run_dir / "results.json").read_text())
    return [episode["accuracy"] for episode in results["episodes"]]


def student_weights(run_dir: Path) -> dict[str, tuple[dict, dict]]:
    """Every distilled student's tensors and metadata, by its file's path inside the store.
    (Not the raw bytes: safetensors writes its metadata keys in a per-process hash order.)"""
    store = run_dir / "artifacts"
    out = {}
    for path in sorted((store / "distill").rglob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            out[str(path.relative_to(store))] = (
                handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()})
    return out


def assert_same_as_local(run_dir: Path, local: Path) -> None:
    assert accuracies(run_dir) == accuracies(local)
    weights, expected = student_weights(run_dir), student_weights(local)
    assert weights and sorted(weights) == sorted(expected)
    for name, (metadata, tensors) in weights.items():
        assert metadata == expected[name][0], name
        assert sorted(tensors) == sorted(expected[name][1]), name
        for key, tensor in tensors.items():  # bit-identical: equal values, dtype and shape
            assert torch.equal(tensor, expected[name][1][key]), f"{name}: {key}"


def without_students(source: Path, target: Path) -> Path:
    """A copy of a finished run with its students deleted: distil, evaluate, export redo."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "artifacts" / "distill")
    shutil.rmtree(target / "export", ignore_errors=True)
    for folder in (target / "episodes").glob("ep*/evaluate"):
        shutil.rmtree(folder)
    (target / "results.json").unlink()
    return target


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("local") / "run"
    run_pipeline(tiny_config(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def ray_run(cluster, local_run, tmp_path_factory) -> tuple[Path, list[str], dict]:
    run_dir = tmp_path_factory.mktemp("ray") / "run"
    _results, submitted = run_counting(tiny_config(run_dir, "ray"))
    return run_dir, submitted, ray_executor.LAST_REPORT.results


# ----------------------------------------------------------------------------- the driver loop


def test_drive_runs_once_per_artifact_and_blocks_what_needs_a_failure(cluster):
    """Equal share keys run once; a failing unit blocks only what needs it (keep_going)."""
    def _echo(value):  # nested: pickled by value (workers cannot import the test module)
        if value == "boom":
            raise ValueError("boom")
        return {"seconds": 0.0, "node": "test", "value": value}

    cpu = {"num_cpus": 0.5, "num_gpus": 0.0}
    tasks = [Task("a", "s", (), cpu, "a"), Task("a2", "s", (), cpu, "a"),
             Task("b", "s", ("a2",), cpu, "b"), Task("bad", "s", (), cpu, "boom"),
             Task("after-bad", "s", ("bad",), cpu, "x"), Task("last", "s", ("b", "after-bad"), cpu, "y")]
    lines: list[str] = []
    report = drive(tasks, ray.remote(_echo), keep_going=True, share_key=lambda t: t.payload,
                   is_done=lambda t: False, log=lines.append, status_every=0.0)
    assert set(report.results) == {"a", "b"} and report.shared == {"a2": "a"}
    assert report.failed == {"bad": "ValueError: boom"}
    assert report.blocked == ["after-bad", "last"] and report.submitted == 3
    assert "done a on test in 0.0 s" in lines and "FAILED bad: ValueError: boom" in lines
    assert lines[-1].startswith("status: 3/6 done, 0 running; s 3/6")  # a2 shared with a


# ----------------------------------------------------------------------------- tint run on Ray


def test_ray_gives_the_local_results_and_weights(ray_run, local_run):
    run_dir, submitted, by_unit = ray_run
    assert_same_as_local(run_dir, local_run)
    assert len(submitted) == 14 and "specialize/ep000/c00" in submitted
    # the teacher got the logical GPU, which has no CUDA here: it ran on the CPU
    assert by_unit["teacher"]["gpu"] == "0" and by_unit["teacher"]["device"] == "cpu"
    assert by_unit["distill/ep000/s00"]["gpu"] is None


def test_rerun_submits_nothing(ray_run, local_run):
    run_dir = ray_run[0]
    _results, submitted = run_counting(tiny_config(run_dir, "ray"))
    assert submitted == []
    assert_same_as_local(run_dir, local_run)


def test_killed_worker_is_retried(ray_run, local_run, faults, tmp_path):
    run_dir = without_students(ray_run[0], tmp_path / "run")
    crash = faults / "crash--distill-ep000-s01"
    crash.touch()
    _results, submitted = run_counting(tiny_config(run_dir, "ray"))
    assert not crash.exists()  # the worker running it died ...
    assert submitted.count("distill/ep000/s01") == 1  # ... and Ray, not the driver, retried it
    assert_same_as_local(run_dir, local_run)


def test_failing_unit_is_named_and_nothing_finished_is_lost(ray_run, local_run, faults, tmp_path, capsys):
    run_dir = without_students(ray_run[0], tmp_path / "run")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(dump_config(tiny_config(run_dir, "ray", "executor.keep_going=true")))
    (faults / "raise--distill-ep000-s00").touch()
    assert tint_main(["run", str(config_file)]) == 2
    error = capsys.readouterr().err
    assert "distill/ep000/s00" in error and "injected test fault" in error
    # keep_going: the other student was distilled and exported; the evaluation needs both
    assert list((run_dir / "export").glob("ep000/with-tint/done.json"))
    assert not (run_dir / "episodes" / "ep000" / "evaluate" / "done.json").exists()
    _results, submitted = run_counting(tiny_config(run_dir, "ray"))
    assert sorted(submitted) == ["distill/ep000/s00", "evaluate/ep000", "export/ep000/s00"]
    assert_same_as_local(run_dir, local_run)


def test_killed_driver_then_rerun(cluster, ray_run, local_run, tmp_path):
    run_dir = without_students(ray_run[0], tmp_path / "run")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(dump_config(tiny_config(run_dir, "ray")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    driver = subprocess.Popen([sys.executable, "-m", "tint.cli", "run", str(config_file),
                               "--ray-address", cluster], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "artifacts").glob("distill/*/done.json")):
            assert driver.poll() is None, "the driver ended before any student was distilled"
            assert time.monotonic() < deadline, "no student distilled within 120 s"
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert not (run_dir / "results.json").exists()
    _results, submitted = run_counting(tiny_config(run_dir, "ray"))
    assert 0 < len(submitted) < 5  # at least the evaluation; not the finished student
    assert_same_as_local(run_dir, local_run)


def test_unsatisfiable_gpu_request_fails_before_submitting(cluster, tmp_path):
    config = tiny_config(tmp_path / "run", "ray", "executor.gpus.specialize=4")
    submitted: list[str] = []
    with pytest.raises(TintError, match=r"executor.gpus.specialize=4 .*largest node: 1 GPU"):
        run_pipeline(config, hooks={"ray-submit": submitted.append})
    assert submitted == []


def test_experiment_runs_each_shared_artifact_once(cluster, tmp_path):
    """Two cells that differ only in the report: every keyed artifact is one task."""
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(json.dumps({
        "name": "shared", "out_dir": str(tmp_path / "exp"), "base": str(ROOT / "configs" / "tiny.yaml"),
        "set": {"seed": 7, "data.n_episodes": 1, "generator.name": "none", "generator.specialize": {},
                "generator.generate": {}, "export.onnx": False,
                "report.enabled": False, "executor.gpus.teacher": 0, **CPU_ONLY},
        "grid": {"grid": [{"label": "a", "set": {"report.grid_images": 2}},
                          {"label": "b", "set": {"report.grid_images": 3}}]},
    }))
    assert tint_main(["experiment", str(experiment), "--executor", "ray"]) == 0
    report = ray_executor.LAST_REPORT
    assert report.shared["shared/b:teacher"] == "shared/a:teacher"
    assert report.shared["shared/b:distill/ep000/s00"] == "shared/a:distill/ep000/s00"
    assert "shared/b:evaluate/ep000" in report.results  # run-dir outputs are per cell
    cells = [json.loads((tmp_path / "exp" / "cells" / c / "results.json").read_text()) for c in "ab"]
    assert cells[0]["episodes"][0]["accuracy"] == cells[1]["episodes"][0]["accuracy"]


def test_model_folder_missing_on_the_driver_fails_before_submitting(cluster, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert tint_main(["run", str(ROOT / "configs" / "tiny.yaml"), "--executor", "ray",
                      "--run-dir", str(tmp_path / "run"), "--set", f"generator.backbone={missing}"]) == 2
    assert f"generator.backbone: {missing} does not exist" in capsys.readouterr().err
    config = tiny_config(tmp_path / "run", "ray")  # a config built in code skips that check
    config.teacher.backbone = f"vit:{missing}"
    with pytest.raises(TintError, match=r"teacher.backbone: .*no-such-model does not exist on the driver"):
        ray_executor.check_model_folders(config)


# ----------------------------------------------------------------------------- issue 22


def test_no_cluster_at_the_address_is_a_clear_error_within_30_s(tmp_path):
    """Issue 22: `--ray-address 127.0.0.1:1` (nothing there) retried for ever, printing only
    Ray's log lines. Now one line, exit 2, within the default 20 s connect budget."""
    start = time.monotonic()
    with pytest.raises(TintError, match=r"executor.address 127.0.0.1:1: no Ray cluster answers"):
        ray_executor.check_reachable("127.0.0.1:1")
    assert time.monotonic() - start < 30
    env = dict(os.environ, OMP_NUM_THREADS="1", **{ray_executor.CONNECT_TIMEOUT_ENV: "2"})
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "tint.cli", "run", str(ROOT / "configs" / "tiny.yaml"),
                           "--ray-address", "127.0.0.1:1", "--run-dir", str(tmp_path / "run")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("tint run: error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and "127.0.0.1:1: no Ray cluster answers" in errors[0]


def test_gpu_requests_follow_the_resolved_device():
    """Issue 22: `device: auto` on a cluster without GPUs asked for GPUs no node has; now it
    asks for none (as does `device: cpu`); an explicit cuda keeps its request."""
    executor = tiny_config(Path("run"), "ray").executor  # teacher: 1 GPU
    assert ray_executor.stage_resources(executor, "teacher", "auto", 1.0)["num_gpus"] == 1
    assert ray_executor.stage_resources(executor, "teacher", "auto", 0.0)["num_gpus"] == 0
    assert ray_executor.stage_resources(executor, "teacher", "cpu", 8.0)["num_gpus"] == 0
    assert ray_executor.stage_resources(executor, "teacher", "cuda", 0.0)["num_gpus"] == 1


def test_out_of_the_box_on_a_cluster_without_gpus_and_a_relative_run_dir(
        ray_run, local_run, tmp_path, monkeypatch):
    """Issue 22: `tint run configs/tiny.yaml --executor ray --run-dir runs/x` on a cluster
    without GPUs was refused (every default GPU request), and with the GPUs set to 0 a
    relative run dir failed in the report, on every rerun. Now it runs with the defaults
    (the cluster is shown to the driver without GPUs) and ends with the local results."""
    monkeypatch.chdir(tmp_path)
    without_students(ray_run[0], tmp_path / "runs" / "x")
    monkeypatch.setattr(ray_executor, "_cluster_gpus", lambda ray: 0.0)
    tasks: list[Task] = []
    real_drive = ray_executor.drive

    def recording_drive(all_tasks, *args, **kwargs):
        tasks.extend(all_tasks)
        return real_drive(all_tasks, *args, **kwargs)

    monkeypatch.setattr(ray_executor, "drive", recording_drive)
    config = tmp_path / "tiny.yaml"
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    argv = ["run", str(config), "--executor", "ray", "--run-dir", "runs/x", "--set", "data.n_episodes=1",
            "--set", "report.enabled=false", "--set", "export.onnx=false"]
    assert tint_main(argv) == 0
    assert tasks and all(task.resources["num_gpus"] == 0 for task in tasks)
    assert_same_as_local(tmp_path / "runs" / "x", local_run)
    assert tint_main(argv) == 0  # and again: everything done, the report is made again
