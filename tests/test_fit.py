"""`tint fit`: a labelled folder -> a model folder that `tint predict` runs (tiny models)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tint
from tint.cli import main
from tint.data.images import load_image, to_tensor
from tint.errors import TintError

TINY = """
threads: 1
data: {resolution: 32, min_base_images: 4}
generator:
  name: tint
  backbone: tiny
  images_per_class: 3
  specialize: {ti_steps: 1, num_steps: 2, nti_inner_steps: 1, bridge_steps: []}
  generate: {batch_size: 4}
teacher:
  name: pmf
  backbone: tiny-vit
  batch_size: 32
  meta_train: {epochs: 0}
students: [{name: model, arch: conv4, sources: [base, synthetic, support]}]
distill: {iterations: 4, batch_size: 8, eval_every: 2, checkpoint_every: 2, lr_drop_at: 3}
report: {grid_images: 2}
"""
COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}
COUNTS = {"red": 3, "green": 2, "blue": 1}  # unequal, and a one-image class


def _photo(path: Path, colour, size, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-30, 30, (size[1], size[0], 3))
    arr = np.clip(np.asarray(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _labelled(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for k in range(n):  # sizes differ from the 32 px training size and from each other
            _photo(root / name / f"{k}.png", COLOURS[name], (40 + 9 * k, 50 - 4 * k), seed + 10 * c + k)
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fit")
    (tmp / "tiny.yaml").write_text(TINY)
    data = _labelled(tmp / "photos", COUNTS)
    unlabeled = tmp / "unlabeled"
    unlabeled.mkdir()
    rng = np.random.default_rng(1)
    for k in range(12):
        Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)).save(unlabeled / f"u{k}.png")
    out = tint.fit(data, tmp / "model", config=tmp / "tiny.yaml", unlabeled=unlabeled)
    return {"tmp": tmp, "data": data, "unlabeled": unlabeled, "out": out}


def test_fit_writes_a_complete_model_folder(fitted):
    out = fitted["out"]
    for name in ("model.onnx", "model.pt", "labels.json", "MODEL_CARD.md", "report.html"):
        assert (out / name).is_file(), name
    labels = json.loads((out / "labels.json").read_text())
    assert labels["classes"] == sorted(COUNTS)
    assert labels["input"]["size"] == 32 and labels["input"]["fit"] == "crop"
    assert labels["training"]["images"] == dict(sorted(COUNTS.items()))
    card = (out / "MODEL_CARD.md").read_text()
    assert labels["training"]["sha256"] in card
    assert "an estimate without a test set" in card
    assert "leave-one-out" in card and "the only image of blue" in card
    assert "your unlabelled images" in card and "held-out generated images" in card
    assert "held-out images of your --unlabeled folder" in card
    report = (out / "report.html").read_text()
    assert "report/images.png" in report and (out / "report" / "images.png").is_file()


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_predict_on_the_fitted_model_in_every_format(fitted, capsys, fmt):
    out, data = fitted["out"], fitted["data"]
    assert main(["predict", str(out), str(data), "--format", fmt]) == 0
    text = capsys.readouterr().out
    files = sorted(str(p) for p in data.rglob("*.png"))
    if fmt == "json":
        got = [r["file"] for r in json.loads(text)]
    elif fmt == "csv":
        got = [r["file"] for r in csv.DictReader(io.StringIO(text))]
    else:
        got = [line.split()[0] for line in text.splitlines()[1:]]
    assert sorted(got) == files


def test_prediction_resizes_other_sizes_as_training_did(fitted):
    """Predictor on the raw files == the exported TorchScript model on tint's training loader."""
    out, data = fitted["out"], fitted["data"]
    files = sorted(data.rglob("*.png"))
    assert {Image.open(f).size for f in files} != {(32, 32)}
    scripted = torch.jit.load(str(out / "model.pt"))
    with torch.no_grad():
        expected = torch.softmax(scripted(to_tensor([load_image(f, 32) for f in files])), 1).numpy()
    got = np.stack([r.probabilities for r in tint.Predictor(out).predict(files)])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_card_sets_the_students_size_and_speed_beside_the_teachers(fitted, capsys):
    from tint.fitting import card_items

    out = fitted["out"]
    student_line, teacher_line, ratio, environment = card_items((out / "MODEL_CARD.md").read_text(),
                                                                "## Size and speed", "## Settings")
    assert environment.startswith("environment: ") and f"torch {torch.__version__}" in environment
    shipped = torch.jit.load(str(out / "model.pt"))
    parameters = sum(p.numel() for p in shipped.parameters())
    assert student_line.startswith("student (conv4, 32 px): ")
    assert f"{parameters:,} parameters, {(out / 'model.onnx').stat().st_size / 1e6:.2f} MB" in student_line
    assert teacher_line.startswith("teacher (pmf on ")
    teacher_parameters = int(teacher_line.split("): ")[1].split(" parameters")[0].replace(",", ""))
    assert teacher_parameters > 0 and teacher_parameters != parameters
    for line in (student_line, teacher_line):
        assert float(line.split(" MB, ")[1].split(" ms per image")[0]) > 0
    assert ratio.startswith(f"the student has {teacher_parameters / parameters:.0f}x fewer parameters")


def test_rerun_computes_nothing_and_val_only_adds_the_estimate(fitted):
    tmp, out, log = fitted["tmp"], fitted["out"], fitted["out"] / "work" / "log.txt"
    before = log.read_text()
    tint.fit(fitted["data"], out, config=tmp / "tiny.yaml", unlabeled=fitted["unlabeled"])
    again = log.read_text()[len(before):]
    assert "done, skipped" in again and "running" not in again
    val = _labelled(tmp / "val", {"red": 1, "green": 2}, seed=50)
    tint.fit(fitted["data"], out, config=tmp / "tiny.yaml", unlabeled=fitted["unlabeled"], val=val)
    with_val = log.read_text()[len(again) + len(before):]
    running = [line.split("tint: ")[1].split(":")[0].split()[0] for line in with_val.splitlines()
               if "running" in line]
    assert running == ["estimate"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "real validation accuracy" in card and "(--val, 3 images)" in card


def test_class_folder_without_images_is_named(tmp_path):
    data = _labelled(tmp_path / "photos", {"red": 1, "green": 1})
    (data / "empty").mkdir()
    (data / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(TintError, match=f"{data / 'empty'}: class folder has no images"):
        tint.fit(data, tmp_path / "model")


def test_fewer_than_two_classes_is_an_error(tmp_path, capsys):
    data = _labelled(tmp_path / "photos", {"red": 3})
    assert main(["fit", str(data), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert "at least 2 class folders" in err and "found 1: red" in err
    assert not (tmp_path / "model").exists()
    data = _labelled(tmp_path / "two", {"red": 1, "green": 1})
    assert main(["fit", str(data), "--out", str(data / "model")]) == 2
    assert "inside DATA_DIR" in capsys.readouterr().err


def test_corrupt_training_image_is_named_before_any_work(tmp_path):
    data = _labelled(tmp_path / "photos", {"red": 2, "green": 1})
    bad = data / "green" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(TintError, match=str(bad)):
        tint.fit(data, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_val_with_an_unknown_class_is_refused_before_any_work(tmp_path):
    data = _labelled(tmp_path / "photos", {"red": 1, "green": 1})
    val = _labelled(tmp_path / "val", {"red": 1, "blue": 1})
    with pytest.raises(TintError, match=r"--val .*val: class folder\(s\) blue are not training classes"):
        tint.fit(data, tmp_path / "model", val=val)
    assert not (tmp_path / "model").exists()


def test_fold_split_holds_out_round_robin_and_keeps_every_class():
    from tint.cross_validation import fold_split

    support = [["r0", "r1", "r2"], ["g0", "g1"], ["b0"]]
    assert fold_split(support, 2, 0) == ([["r1"], ["g1"], ["b0"]], [["r0", "r2"], ["g0"], []])
    assert fold_split(support, 2, 1) == ([["r0", "r2"], ["g0"], ["b0"]], [["r1"], ["g1"], []])
    held = [i for f in range(3) for row in fold_split(support, 3, f)[1] for i in row]
    assert sorted(held) == ["g0", "g1", "r0", "r1", "r2"]  # each scored once; one-image class never


def test_cross_validated_student_estimate_on_the_card(fitted):
    """Issue 21: --folds K trains K fold students on the fit's recipe (no generated images:
    they saw every labelled image) and scores each on the images it never saw."""
    tmp, out = fitted["tmp"], fitted["out"]
    tint.fit(fitted["data"], out, config=tmp / "tiny.yaml", unlabeled=fitted["unlabeled"], folds=2)
    from tint.io import read_json

    estimate = read_json(out / "work" / "estimate" / "done.json")
    cv = estimate["cross_validation"]
    assert cv["n_scored"] == 5 and cv["folds"] == 2 and 0 <= cv["student"] <= 1
    assert [f["n"] for f in cv["per_fold"]] == [3, 2]
    card = (out / "MODEL_CARD.md").read_text()
    assert "2-fold cross-validated" in card and "5 held-out images" in card and "95% interval" in card
    fold_students = list((out / "work" / "artifacts" / "distill").glob("*/student.safetensors"))
    assert len(fold_students) == 3  # the model + one per fold


def test_wilson_interval_is_wide_at_few_images_and_narrows():
    from tint.fitting import wilson_interval

    low, high = wilson_interval(0.52, 25)
    assert 0.33 < low < 0.34 and 0.69 < high < 0.71  # 13 of 25: about +-18 points
    low100, high100 = wilson_interval(0.52, 100)
    assert high100 - low100 < high - low
    assert wilson_interval(1.0, 5)[1] == 1.0 and wilson_interval(0.0, 5)[0] == 0.0
