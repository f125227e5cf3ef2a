"""`tint predict` / `tint.Predictor`: onnxruntime only, same preprocessing as training."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tint.cli import main
from tint.data.images import load_image, to_tensor
from tint.export import export_onnx
from tint.io import write_json
from tint.predict import LABELS_FILE, ModelSpec, Predictor, file_sha256, labels_document, preprocess
from tint.students import create_student

CLASSES = ["apple", "boat", "cat"]
SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A Conv4 exported the way `tint fit` exports it: model.onnx + labels.json."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = create_student("conv4", len(CLASSES), image_size=SIZE).eval()
    export_onnx(model, folder / "model.onnx", SIZE)
    write_json(folder / LABELS_FILE, labels_document(CLASSES, SIZE, arch="conv4",
                                                      model_sha256=file_sha256(folder / "model.onnx")))
    torch.save(model.state_dict(), folder / "weights.pt")  # for the torch comparison below
    return folder


def _torch_model(model_dir: Path) -> torch.nn.Module:
    model = create_student("conv4", len(CLASSES), image_size=SIZE).eval()
    model.load_state_dict(torch.load(model_dir / "weights.pt", weights_only=True))
    return model


def _photo(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    if mode == "RGBA":
        arr[: size[1] // 3, :, 3] = 0  # a transparent band, as in clip-art
    img = Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
@pytest.mark.parametrize("crop_alpha", [False, True])
def test_numpy_preprocessing_matches_the_training_loader(tmp_path, fit, crop_alpha):
    spec = ModelSpec(classes=CLASSES, size=SIZE, fit=fit, crop_alpha=crop_alpha)
    cases = [((57, 41), "RGB"), ((20, 90), "RGBA"), ((100, 100), "L"), ((SIZE, SIZE), "RGB")]
    for i, (size, mode) in enumerate(cases):
        path = _photo(tmp_path / f"img{i}.png", size, seed=i, mode=mode)
        expected = to_tensor(load_image(path, SIZE, crop_alpha=crop_alpha, fit=fit))[0].numpy()
        got = preprocess(path, spec)
        assert got.shape == (3, SIZE, SIZE) and got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


def test_predictor_probabilities_equal_the_torch_model(model_dir, tmp_path):
    paths = [_photo(tmp_path / f"p{i}.png", (40 + 7 * i, 33), seed=10 + i) for i in range(5)]
    results = Predictor(model_dir).predict(paths, top_k=3, batch_size=2)
    x = to_tensor([load_image(p, SIZE) for p in paths])
    with torch.no_grad():
        expected = torch.softmax(_torch_model(model_dir)(x), dim=1).numpy()
    got = np.stack([r.probabilities for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for r, row in zip(results, expected, strict=True):
        assert r.label == CLASSES[int(row.argmax())]
        assert [lab for lab, _ in r.top] == [CLASSES[i] for i in np.argsort(-row)]
        assert r.probability == pytest.approx(float(row.max()), abs=1e-5)


def test_predictor_accepts_paths_pil_images_and_arrays(model_dir, tmp_path):
    path = _photo(tmp_path / "x.png", (50, 70), seed=3)
    img = Image.open(path)
    arr = np.asarray(img)
    predictor = Predictor(model_dir)
    by_path, by_pil, by_uint8, by_float = predictor.predict([path, img, arr, arr / 255.0])
    for other in (by_pil, by_uint8, by_float):
        np.testing.assert_allclose(other.probabilities, by_path.probabilities, atol=1e-6)
    assert predictor.predict(arr)[0].label == by_path.label  # a single image, not a list
    with pytest.raises(Exception, match="H x W"):
        predictor.predict([np.zeros((2, 3, 4, 5), dtype=np.uint8)])


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_cli_prints_every_format_and_walks_folders(model_dir, tmp_path, capsys, fmt):
    folder = tmp_path / "imgs"
    paths = [_photo(folder / f"a{i}.png", (45, 30), seed=i) for i in range(3)]
    paths.append(_photo(folder / "sub" / "b.jpg", (30, 60), seed=7))
    (folder / "notes.txt").write_text("not an image, and not an image suffix: ignored")
    code = main(["predict", str(model_dir), str(folder), "--format", fmt, "--top-k", "2",
                 "--batch-size", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    expected = {str(p): r.label for p, r in zip(paths, Predictor(model_dir).predict(paths), strict=True)}
    if fmt == "json":
        rows = json.loads(out)
        assert {r["file"]: r["label"] for r in rows} == expected
        assert all(len(r["top"]) == 2 and r["top"][0]["label"] == r["label"] for r in rows)
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert {r["file"]: r["label"] for r in rows} == expected
        assert set(rows[0]) == {"file", "label", "probability", "label_2", "probability_2"}
    else:
        lines = out.splitlines()
        assert lines[0].split() == ["file", "label", "probability", "label_2", "probability_2"]
        assert {line.split()[0]: line.split()[1] for line in lines[1:]} == expected


def test_corrupt_image_is_reported_skipped_and_exit_status_is_1(model_dir, tmp_path, capsys):
    good = [_photo(tmp_path / f"g{i}.png", (36, 36), seed=i) for i in range(3)]
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    text = tmp_path / "readme.md"
    text.write_text("named explicitly, so it is tried and reported")
    code = main(["predict", str(model_dir), str(good[0]), str(corrupt), str(good[1]), str(text),
                 str(good[2]), "--format", "csv", "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["file"] for r in rows] == [str(p) for p in good]
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and str(corrupt) in skipped[0] and str(text) in skipped[1]


def test_model_folder_without_labels_json_is_a_clear_usage_error(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes())
    image = _photo(tmp_path / "x.png", (32, 32), seed=0)
    assert main(["predict", str(bare), str(image)]) == 2
    err = capsys.readouterr().err
    assert str(bare / "labels.json") in err and "tint fit" in err
    assert len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(model_dir), str(empty)]) == 2
    assert "no image files found" in capsys.readouterr().err
    image = _photo(tmp_path / "x.png", (32, 32), seed=0)
    assert main(["predict", str(model_dir), str(image), "--top-k", "0"]) == 2
    assert "--top-k" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "labels.json").write_text(json.dumps({"classes": ["a", "b"]}))
    assert main(["predict", str(bad), str(image)]) == 2
    assert "input.size" in capsys.readouterr().err


def test_predict_path_never_imports_torch(model_dir, tmp_path):
    image = _photo(tmp_path / "x.png", (40, 30), seed=1)
    code = (
        "import sys\n"
        "from tint.cli import main\n"
        f"rc = main(['predict', {str(model_dir)!r}, {str(image)!r}, '--format', 'json'])\n"
        "import tint\n"
        f"tint.Predictor({str(model_dir)!r}).predict([{str(image)!r}])\n"
        "assert rc == 0, rc\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not loaded, loaded[:5]\n"
        "print('no torch')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("no torch")
    assert json.loads(done.stdout.rsplit("no torch", 1)[0])[0]["file"] == str(image)


def _copy_model(model_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("model.onnx", LABELS_FILE):
        (dest / name).write_bytes((model_dir / name).read_bytes())
    return dest


def _edit_labels(folder: Path, edit) -> None:
    doc = json.loads((folder / LABELS_FILE).read_text())
    edit(doc)
    (folder / LABELS_FILE).write_text(json.dumps(doc))


def _reorder(doc: dict) -> None:
    doc["classes"] = doc["classes"][::-1]


def _flip_a_byte(folder: Path) -> None:
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-20] ^= 0xFF  # inside the weights: onnxruntime would still load and run it
    (folder / "model.onnx").write_bytes(bytes(data))


def _forget_the_record(doc: dict) -> None:
    del doc["sha256"]


@pytest.mark.parametrize("damage, names, says", [
    (lambda f: _edit_labels(f, _reorder), LABELS_FILE, "class list was changed"),
    (_flip_a_byte, "model.onnx", "does not match the SHA-256"),
    (lambda f: _edit_labels(f, _forget_the_record), LABELS_FILE, "cannot be verified"),
    (lambda f: _edit_labels(f, lambda d: d["input"].update(size=48)), LABELS_FILE,
     "input.size is 48"),
], ids=["reordered-classes", "edited-model", "no-record", "input-size-mismatch"])
def test_a_model_folder_whose_files_do_not_match_is_refused(model_dir, tmp_path, capsys, damage,
                                                              names, says):
    """Issue 22: an edited model.onnx, a reordered class list or a labels.json whose input size
    is not the model's was used as it was (or was a traceback); now exit 2, one line naming
    the file and what to do, from the command and from tint.Predictor alike."""
    from tint.errors import TintError

    folder = _copy_model(model_dir, tmp_path / "model")
    damage(folder)
    image = _photo(tmp_path / "x.png", (32, 32), seed=0)
    assert main(["predict", str(folder), str(image)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(folder / names) in err and says in err and "tint fit" in err
    with pytest.raises(TintError, match=says):
        Predictor(folder)
