"""Bad settings fail before any work: exit code 2, one line naming the key, no traceback.

The catalogue of issue 15 item 4 (and the range rules of docs/pipeline.md, "Config"): each
case runs ``tint run configs/tiny.yaml --set ...`` in-process and checks that nothing was
written to the run dir, i.e. the error came from loading the config, not from a stage.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tint.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")

# (--set assignments, text the one-line error must contain)
CASES = [
    (["generator.generate.alpha=2"], "generator.generate.alpha: must be in [0, 1], got 2.0"),
    (["generator.generate.alpha=abc"], "generator.generate.alpha: expected float, got 'abc'"),
    (["generator.generate.alpha=.nan"], "generator.generate.alpha: must be a finite number"),
    (["generator.generate.alpha_range=[0.9, 0.1]"], "generator.generate.alpha_range: lo must be <= hi"),
    (["generator.generate.batch_size=0"], "generator.generate.batch_size: must be >= 1, got 0"),
    (["generator.generate.guidance=-1"], "generator.generate.guidance: must be >= 0"),
    (["generator.generate.nope=1"], "generator.generate.nope: unknown key"),
    (["generator.specialize.ti_steps=abc"], "generator.specialize.ti_steps: expected int, got 'abc'"),
    (["generator.specialize.ti_steps=0"], "generator.specialize.ti_steps: must be >= 1"),
    (["generator.specialize.ti_lr=0"], "generator.specialize.ti_lr: must be > 0"),
    (["generator.specialize.ti_lr=nan"], "generator.specialize.ti_lr: must be a finite number"),
    (["generator.specialize.ti_t_min=1000"], "generator.specialize.ti_t_min: must be in [0, 1000)"),
    (["generator.specialize.nti_lr=-1"], "generator.specialize.nti_lr: must be > 0"),
    (["generator.specialize.nti_schedule=linear"], "generator.specialize.nti_schedule: expected"),
    (["generator.specialize.template=no-slot"], "generator.specialize.template: must contain '{}'"),
    (["generator.name=plain-ti"], "generator.specialize.nti_inner_steps: unknown key"),
    (["generator.name=plain-ti", "generator.specialize={ti_t_min: -1}"],
     "generator.specialize.ti_t_min: must be in [0, 1000)"),
    (["generator.name=da-fusion", "generator.specialize={store_support: false}",
      "generator.generate={strength: 1.5}"], "generator.specialize.store_support: must stay true"),
    (["generator.name=da-fusion", "generator.specialize={}", "generator.generate={strength: 1.5}"],
     "generator.generate.strength: must be in [0, 1]"),
    (["generator.name=gan"], "generator.name: unknown generator 'gan'"),
    (["generator.images_per_class=-1"], "generator.images_per_class: must be >= 0"),
    (["generator.backbone=/no/such/generator"], "generator.backbone: /no/such/generator does not exist"),
    (["generator.backbone=./missing-model"], "generator.backbone: ./missing-model does not exist"),
    (["teacher.settings.scael=5"], "teacher.settings.scael: unknown key; valid keys here: scale"),
    (["teacher.settings.scale=0"], "teacher.settings.scale: must be > 0"),
    (["teacher.settings.finetune_lr=nan"], "teacher.settings.finetune_lr: must be a finite number"),
    (["teacher.name=labelhalluc", "teacher.settings={C: abc}"], "teacher.settings.C: expected float"),
    (["teacher.name=mystery"], "teacher.name: unknown teacher 'mystery'"),
    (["teacher.backbone=vit:/no/such/dino"], "teacher.backbone: /no/such/dino does not exist"),
    (["teacher.meta_train.lr=-0.1"], "teacher.meta_train.lr: must be > 0"),
    (["teacher.batch_size=0"], "teacher.batch_size: must be >= 1"),
    (["threads=-1"], "threads: must be >= 1, got -1"),
    (["device=gpu"], "device: 'gpu' is not a device"),
    (["precision=fp8"], "precision: expected 'auto' | 'fp32' | 'bf16' | 'fp16', got 'fp8'"),
    (["distill.lr=nan"], "distill.lr: must be a finite number, got 'nan'"),
    (["distill.lr=.inf"], "distill.lr: must be a finite number, got inf"),
    (["distill.lr=0"], "distill.lr: must be > 0, got 0.0"),
    (["distill.temperature=nan"], "distill.temperature: must be a finite number"),
    (["distill.lr_drop_factor=-10"], "distill.lr_drop_factor: must be in (0, 1], got -10.0"),
    (["distill.momentum=1"], "distill.momentum: must be in [0, 1)"),
    (["distill.repeats=0"], "distill.repeats: must be >= 1, got 0"),
    (["distill.crop_scale=[0.9, 0.5]"], "distill.crop_scale: lo must be <= hi"),
    (["executor.max_in_flight=0"], "executor.max_in_flight: must be >= 1, got 0"),
    (["executor.max_retries=-1"], "executor.max_retries: must be >= 0, got -1"),
    (["executor.threads=0"], "executor.threads: must be >= 1"),
    (["executor.gpus.distill=-1"], "executor.gpus.distill: must be >= 0"),
    (["data.n_way=0"], "data.n_way: must be >= 1"),
]


def _run_fails(argv: list[str], run_dir: Path, capsys) -> str:
    code = main(argv + ["--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not run_dir.exists(), "the run started: the error must come before any work"
    return err


@pytest.mark.parametrize(("assignments", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_setting_is_one_line_before_any_work(assignments, message, tmp_path, capsys):
    argv = ["run", TINY]
    for assignment in assignments:
        argv += ["--set", assignment]
    err = _run_fails(argv, tmp_path / "run", capsys)
    assert message in err


@pytest.mark.parametrize("key", ["device", "distill.device"])
def test_cuda_without_cuda_is_refused_at_load(key, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _run_fails(["run", TINY, "--set", f"{key}=cuda"], tmp_path / "run", capsys)
    assert f"{key}: cuda asked for, but CUDA is not available" in err


def test_a_distill_device_other_than_the_runs_is_refused_at_load(tmp_path, capsys, monkeypatch):
    """distill.device follows the run's device: a value that disagrees is refused, naming
    the key and the way to choose the device (--device / `device`), not silently replaced."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # so that `cuda` is a device here
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    err = _run_fails(["run", TINY, "--device", "cpu", "--set", "distill.device=cuda"], tmp_path / "run", capsys)
    assert "distill.device: 'cuda' differs from the run's device 'cpu'" in err
    assert "--device" in err and "`device`" in err


def test_a_distill_device_of_the_run_or_its_default_is_kept(capsys):
    from tint.config import load_config

    assert load_config(TINY, ["device=cpu", "distill.device=cpu"]).distill.device == "cpu"
    assert load_config(TINY, ["device=auto"]).distill.device == "cpu"  # the default: says nothing


def test_empty_config_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    err = _run_fails(["run", str(empty)], tmp_path / "run", capsys)
    assert "empty.yaml: the config is empty" in err and "paper-size run" in err


def test_yaml_string_numbers_are_read_as_floats_everywhere(capsys):
    """YAML 1.1 reads 1e-3 as a string; every float setting accepts it."""
    assert main(["run", TINY, "--print-config", "--set", "generator.specialize.ti_lr=1e-3",
                 "--set", "teacher.settings.finetune_lr=5e-5"]) == 0
    out = capsys.readouterr().out
    assert "ti_lr: 0.001" in out and "finetune_lr: 5.0e-05" in out
    assert "alpha: 1.0" in out  # every generator default is written out


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "generator.generate.alpha=2"], "generator.generate.alpha: must be in [0, 1]"),
    (["--set", "distill.lr=nan"], "distill.lr: must be a finite number"),
])
def test_bad_setting_from_the_command_line(args, message, tmp_path):
    """The real `tint` process: exit 2, one line on stderr, no traceback."""
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tint.cli", "run", TINY, "--run-dir", str(run_dir),
                           *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tint run: error: "), done.stderr
    assert message in lines[0] and "Traceback" not in done.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--ti-lr", "0"], "--ti-lr: must be > 0, got 0.0"),
    (["--bridge-steps", "96", "1.5"], "--bridge-steps[1]: expected int or str, got 1.5"),
    (["--ti-steps", "abc"], "--ti-steps: expected int, got 'abc'"),
    (["--generator", "plain-ti", "--nti-lr", "0.1"], "--nti-lr: generator 'plain-ti' has no setting"),
])
def test_bad_specialize_flag_fails_before_any_model(flags, message, tmp_path, capsys):
    from PIL import Image

    for name in ("apple", "boat"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (24, 24), (100 * i, 50, 200)).save(tmp_path / "data" / name / f"{i}.png")
    out = tmp_path / "artifacts"
    code = main(["specialize", "--backbone", "tiny", "--dataset", f"folder:{tmp_path / 'data'}",
                 "--resolution", "24", "--n-way", "2", "--k-shot", "1", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
