"""The model folder of `tint fit` as an artifact (issue 22, docs/reliability.md "The model
folder"): never written over the user's files, one fit at a time, keyed by content."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from test_fit import TINY, _labelled

import tint
from tint.cli import main
from tint.fitting import fit_identity, load_fit_config, read_labelled_folder
from tint.model_folder import RECORD, claim_model_folder, record_outputs

COUNTS = {"red": 2, "green": 2}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("model_folder")
    (tmp / "tiny.yaml").write_text(TINY)
    data = _labelled(tmp / "photos", COUNTS)
    out = tint.fit(data, tmp / "model", config=tmp / "tiny.yaml")
    return {"tmp": tmp, "data": data, "out": out, "config": tmp / "tiny.yaml"}


def _identity(fitted: dict, data: Path) -> dict:
    cfg = load_fit_config(fitted["config"], [], fitted["out"].resolve() / "work", None)
    return fit_identity(read_labelled_folder(data), cfg, None, None)


def _one_line(err: str) -> str:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_fit_refuses_a_non_empty_out_that_is_not_a_model_folder(tmp_path, capsys):
    """Issue 22 (DATA-LOSS): --out holding the user's own report.html and MODEL_CARD.md was
    overwritten without a word; now refused before any work, naming the files."""
    data = _labelled(tmp_path / "photos", COUNTS)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("my report")
    (out / "MODEL_CARD.md").write_text("my card")
    assert main(["fit", str(data), "--out", str(out)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--out {out}" in err and "MODEL_CARD.md, report.html" in err and "not a tint model folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "report.html"]
    assert (out / "report.html").read_text() == "my report"


def test_fit_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    """A tint model folder whose MODEL_CARD.md the user edited (or replaced): refused, kept."""
    data = _labelled(tmp_path / "photos", COUNTS)
    out = tmp_path / "model"
    out.mkdir()
    (out / "labels.json").write_text(json.dumps({"format": "tint-labels/1", "classes": ["a", "b"]}))
    (out / "MODEL_CARD.md").write_text("written by tint fit")
    record_outputs(out)
    (out / "MODEL_CARD.md").write_text("my own notes")
    assert main(["fit", str(data), "--out", str(out)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "MODEL_CARD.md was not written by tint fit" in err and "labels.json" not in err
    assert (out / "MODEL_CARD.md").read_text() == "my own notes"


def test_a_second_fit_of_other_data_on_one_out_is_refused(fitted, tmp_path, capsys):
    """Issue 22 (silently wrong): two fits with different data on one --out both exited 0 and
    left a mix. The lock records the data's content hash: the second fails at once."""
    other = _labelled(tmp_path / "other", {"red": 1, "green": 3}, seed=7)
    with claim_model_folder(fitted["out"], _identity(fitted, fitted["data"])):
        code = main(["fit", str(other), "--out", str(fitted["out"]), str(fitted["config"])])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and f"(pid {os.getpid()})" in err and "of different data or settings" in err


def test_a_second_fit_of_the_same_data_waits_saying_so_once(fitted, caplog):
    """The same fit twice at once: the second waits (one warning with the holder's pid), then
    finds everything done."""
    caplog.set_level(logging.INFO, logger="tint")
    log = fitted["out"] / "work" / "log.txt"
    before = log.read_text()
    held, done = threading.Event(), []
    with claim_model_folder(fitted["out"], _identity(fitted, fitted["data"])):
        second = threading.Thread(target=lambda: done.append(
            tint.fit(fitted["data"], fitted["out"], config=fitted["config"])))
        second.start()
        for _ in range(1200):
            if any("in use by another tint fit" in r.getMessage() for r in caplog.records):
                held.set()
                break
            time.sleep(0.05)
        assert held.is_set() and not done
    second.join(120)
    waits = [r for r in caplog.records if "in use by another tint fit" in r.getMessage()]
    assert len(waits) == 1 and waits[0].levelno == logging.WARNING
    assert f"(pid {os.getpid()})" in waits[0].getMessage()
    assert done == [fitted["out"]] and "running" not in log.read_text()[len(before):]


def test_a_moved_model_folder_and_a_relative_out_reuse_everything(fitted, tmp_path, monkeypatch):
    """Issue 22: the folder's absolute path was in every key (the snapshot's `folder:` spec),
    so a moved folder recomputed everything, and --out spelt relative gave another model. The
    keys now follow the snapshot's content. Uses the docs' synopsis order (CONFIG last)."""
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(fitted["out"], moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    before = (moved / "work" / "log.txt").read_text()
    assert main(["fit", str(fitted["data"]), "--out", "model", str(fitted["config"])]) == 0
    again = (moved / "work" / "log.txt").read_text()[len(before):]
    assert "done, skipped" in again and "running" not in again
    for name in ("model.onnx", "labels.json"):
        assert (moved / name).read_bytes() == (fitted["out"] / name).read_bytes(), name
    assert json.loads((moved / RECORD).read_text())["files"]["model.onnx"]


def test_predict_accepts_the_fitted_folder_and_its_record(fitted, capsys):
    """The labels.json fit writes verifies against its own model.onnx."""
    assert main(["predict", str(fitted["out"]), str(fitted["data"])]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + sum(COUNTS.values())


def _card_figures(out: Path) -> list[str]:
    card = (out / "MODEL_CARD.md").read_text().split("## Accuracy", 1)[1].split("## Intended", 1)[0]
    return [line for line in card.splitlines() if line.startswith("- ")]


def _students(out: Path) -> dict[str, dict]:
    from tint.io import load_tensors

    return {path.parent.name: load_tensors(path)[0]
            for path in sorted((out / "work" / "artifacts" / "distill").glob("*/student.safetensors"))}


def test_fit_killed_mid_distillation_resumes_to_the_same_model_folder(fitted, tmp_path):
    """Issue 22 (must show): `tint fit` killed with SIGKILL in the middle of distillation and
    run again gives the model folder of an uninterrupted fit: the same student tensors (in
    the same content-keyed folders) and the same card figures."""
    import signal
    import subprocess
    import sys

    import torch

    root = Path(__file__).resolve().parents[1]
    longer = ["--set", "distill.iterations=60", "--set", "distill.checkpoint_every=5"]
    argv = ["fit", str(fitted["data"]), "--out", str(tmp_path / "killed"), str(fitted["config"]), *longer]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    fit = subprocess.Popen([sys.executable, "-m", "tint.cli", *argv], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    distill = tmp_path / "killed" / "work" / "artifacts" / "distill"
    try:
        deadline = time.monotonic() + 300
        while not list(distill.glob("*/checkpoint.safetensors")):
            assert fit.poll() is None, "the fit ended before distillation checkpointed"
            assert time.monotonic() < deadline, "no distillation checkpoint within 300 s"
            time.sleep(0.02)
    finally:
        fit.send_signal(signal.SIGKILL)
        fit.wait()
    assert not list(distill.glob("*/done.json")), "killed too late: distillation had finished"
    assert main(argv) == 0
    reference = tmp_path / "uninterrupted"
    assert main(["fit", str(fitted["data"]), "--out", str(reference), str(fitted["config"]), *longer]) == 0
    killed, expected = _students(tmp_path / "killed"), _students(reference)
    assert killed and sorted(killed) == sorted(expected)
    for folder, tensors in killed.items():
        assert all(torch.equal(tensors[k], expected[folder][k]) for k in expected[folder]), folder
    assert _card_figures(tmp_path / "killed") == _card_figures(reference)
    assert (tmp_path / "killed" / "labels.json").read_text() == (reference / "labels.json").read_text()


def test_fit_refuses_a_model_folder_without_onnx_before_any_work(tmp_path, capsys):
    """labels.json records model.onnx's SHA-256, and prediction runs it: export.onnx=false
    would end the fit in a missing-file error after all the work."""
    data = _labelled(tmp_path / "photos", COUNTS)
    assert main(["fit", str(data), "--out", str(tmp_path / "model"), "--set", "export.onnx=false"]) == 2
    assert "export.onnx: false" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "model").exists()
