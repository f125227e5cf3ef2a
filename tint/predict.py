"""`tint predict`: a model folder from `tint fit` + images -> a label per image.

This path runs the exported ``model.onnx`` with onnxruntime and never imports torch, so
calling ``tint predict`` from a script costs well under a second of start-up
(benchmarks/predict_latency.py). Everything prediction needs is in ``labels.json``
beside the model: class names in output order, the input side, how images are fitted
to the square, whether transparent margins are cropped, and the value range.

Preprocessing is the training path's: `tint.imaging` (PIL and numpy only, shared with
`tint.data.images`) decodes fully (truncated files fail here), applies the EXIF orientation,
converts any mode to RGB and fits to ``size x size`` (``crop``, ``pad`` or ``stretch``,
bicubic); then float32 ``[3, H, W]`` in ``[0, 1]``. The ImageNet mean/std normalisation is
inside the exported model. ``tests/test_predict.py`` checks that the two paths give the same
arrays.

Errors: a missing/unreadable/corrupt image is a `TintError` naming the file. The command
reports it on stderr (one line), skips it, prints every other result and exits with 1;
usage errors (no labels.json, no images found) exit with 2.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tint.errors import TintError
from tint.imaging import FITS, fit_square, open_image, to_rgb

LABELS_FILE = "labels.json"
LABELS_FORMAT = "tint-labels/1"
# The suffixes `tint.data.formats` scans in class folders; directories are walked for these.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FORMATS = ("table", "csv", "json")
# Prediction checks a JPEG's markers only (cheap); the Huffman check of tint.jpeg_check would
# cost ~40x the decoding, so it is left to training, where a damaged image does harm.
PREDICT_JPEG_BLOCKS = 0
HOW_TO_MAKE = "make one with `tint fit DATA_DIR --out MODEL_DIR`"

ImageLike = str | Path | Image.Image | np.ndarray


# ----------------------------------------------------------------------------- labels.json


@dataclass(frozen=True)
class ModelSpec:
    """What `labels.json` says about a model: its classes and the input it expects."""

    classes: list[str]
    size: int
    fit: str = "crop"
    crop_alpha: bool = False
    model_file: str = "model.onnx"
    extra: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (a ResNet12 ONNX file is tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def classes_sha256(classes: Sequence[str]) -> str:
    """SHA-256 of the class list in output order: a reordered or renamed list changes it."""
    return hashlib.sha256(json.dumps(list(classes)).encode()).hexdigest()


def labels_document(classes: Sequence[str], size: int, *, model_sha256: str, fit: str = "crop",
                    crop_alpha: bool = False, arch: str | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    **extra: Any) -> dict:
    """The `labels.json` content written by `tint fit` (kept here, next to its reader).

    `sha256` records the model file's and the class list's SHA-256: prediction refuses a
    folder whose model.onnx was replaced or edited, or whose class list was reordered, since
    either would label every image silently wrong (`check_integrity`)."""
    return {
        "format": LABELS_FORMAT,
        "classes": list(classes),
        "sha256": {"model.onnx": model_sha256, "classes": classes_sha256(classes)},
        "model": "model.onnx",
        "torchscript": "model.pt",
        "arch": arch,
        "input": {"size": int(size), "fit": fit, "crop_alpha": bool(crop_alpha),
                  "layout": "NCHW", "dtype": "float32", "color": "RGB", "range": [0.0, 1.0],
                  "resample": "bicubic"},
        "output": "logits",
        "normalization": {"inside_model": True,
                          "mean": list(mean) if mean is not None else None,
                          "std": list(std) if std is not None else None},
        **extra,
    }


def read_model_spec(model_dir: str | Path) -> ModelSpec:
    """Read and check ``MODEL_DIR/labels.json``; every problem names the file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TintError(f"{model_dir}: model folder not found; {HOW_TO_MAKE}")
    path = model_dir / LABELS_FILE
    if not path.is_file():
        raise TintError(f"{path}: not found, so {model_dir} is not a tint model folder "
                        f"(labels.json holds the class names and input size); {HOW_TO_MAKE}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TintError(f"{path}: not valid JSON ({err}); re-create it with `tint fit`") from err
    if not isinstance(doc, dict):
        raise TintError(f"{path}: expected a JSON object; re-create it with `tint fit`")
    classes = doc.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise TintError(f"{path}: 'classes' must list at least 2 class names")
    spec_in = doc.get("input")
    if not isinstance(spec_in, dict) or not isinstance(spec_in.get("size"), int) or spec_in["size"] < 1:
        raise TintError(f"{path}: 'input.size' must be a positive integer")
    fit = spec_in.get("fit", "crop")
    if fit not in FITS:
        raise TintError(f"{path}: input.fit={fit!r}; choose one of {', '.join(FITS)}")
    model_file = doc.get("model", "model.onnx")
    if not (model_dir / str(model_file)).is_file():
        raise TintError(f"{model_dir / str(model_file)}: model file not found; "
                        f"re-export it with `tint fit` (same command: it resumes)")
    check_integrity(model_dir, doc, str(model_file))
    return ModelSpec(classes=classes, size=spec_in["size"], fit=fit,
                     crop_alpha=bool(spec_in.get("crop_alpha", False)),
                     model_file=str(model_file), extra=doc)


REFIT = "run the same `tint fit DATA_DIR --out MODEL_DIR` again to rewrite the folder (it resumes)"


def check_integrity(model_dir: Path, doc: dict, model_file: str) -> None:
    """The folder's files are the ones `tint fit` wrote together: model.onnx has the SHA-256
    and the class list the order that labels.json records. An edited model or a reordered
    class list would otherwise label every image wrong without a word."""
    path = model_dir / LABELS_FILE
    record = doc.get("sha256")
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                               for k in ("model.onnx", "classes")):
        raise TintError(f"{path}: has no 'sha256' record of model.onnx and the class list (written "
                        "by an older tint, or edited), so the folder cannot be verified; run the "
                        "same `tint fit DATA_DIR --out MODEL_DIR` again with this tint to rewrite it")
    if classes_sha256(doc["classes"]) != record["classes"]:
        raise TintError(f"{path}: the class list was changed (reordered, renamed or edited) since "
                        f"tint fit wrote it, so labels would no longer match the model's outputs; "
                        f"restore it or {REFIT}")
    if file_sha256(model_dir / model_file) != record["model.onnx"]:
        raise TintError(f"{model_dir / model_file}: does not match the SHA-256 recorded in "
                        f"{LABELS_FILE} (the model file was replaced, edited or damaged); "
                        f"restore it or {REFIT}")


def check_input_shape(model_dir: Path, spec: ModelSpec, shape: Sequence[Any]) -> None:
    """labels.json's input size must be the one the ONNX model takes: [B, 3, size, size]."""
    shape = list(shape)
    wanted = [3, spec.size, spec.size]
    if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], wanted, strict=True)):
        raise TintError(f"{model_dir / LABELS_FILE}: input.size is {spec.size}, but "
                        f"{spec.model_file} takes input of shape {list(shape)}; the two files do "
                        f"not belong together: {REFIT}")


# ----------------------------------------------------------------------------- images


def array_to_image(array: np.ndarray, name: str = "array") -> Image.Image:
    """A numpy image (H x W, H x W x 1/3/4; uint8, or float in [0, 1]) -> PIL image."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape:
        raise TintError(f"{name}: expected an H x W or H x W x 3/4 image array, got shape "
                        f"{list(arr.shape)}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise TintError(f"{name}: expected uint8 or finite float values in [0, 1], got {arr.dtype}")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[2] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(arr), mode)


def preprocess(image: ImageLike, spec: ModelSpec, name: str | None = None) -> np.ndarray:
    """One image (path, PIL image or array) -> float32 [3, size, size] in [0, 1]."""
    if isinstance(image, (str, Path)):
        img = open_image(image, jpeg_blocks=PREDICT_JPEG_BLOCKS)
    elif isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        img = array_to_image(image, name or "array")
    else:
        raise TintError(f"{name or type(image).__name__}: expected a path, a PIL image or a "
                        f"numpy array, got {type(image).__name__}")
    img = fit_square(to_rgb(img, crop_alpha=spec.crop_alpha), spec.size, spec.fit)
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, directories walked (recursively, sorted) for image suffixes.

    A file named explicitly is always tried (and reported if it is not an image); inside a
    directory only files with an image suffix are taken, hidden files and folders skipped.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        else:
            found.append(path)
    return found


# ----------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    """One image's result: the best label, its probability, and the top k."""

    source: str
    label: str
    probability: float
    top: list[tuple[str, float]]
    probabilities: np.ndarray = field(repr=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """A model folder from `tint fit`, ready to label images (onnxruntime, no torch).

    >>> Predictor("my-model").predict(["a.jpg", "b.png"])[0].label
    """

    def __init__(self, model_dir: str | Path, threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.spec = read_model_spec(self.model_dir)
        self.classes = self.spec.classes
        self._session = _onnx_session(self.model_dir / self.spec.model_file, threads)
        first_input = self._session.get_inputs()[0]
        check_input_shape(self.model_dir, self.spec, first_input.shape)
        self._input = first_input.name
        outputs = self._session.get_outputs()[0].shape
        if outputs and isinstance(outputs[-1], int) and outputs[-1] != len(self.classes):
            raise TintError(f"{self.model_dir / LABELS_FILE}: lists {len(self.classes)} classes "
                            f"but the model outputs {outputs[-1]}; re-create the folder with `tint fit`")

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for a preprocessed batch [B, 3, size, size]."""
        return self._session.run(None, {self._input: batch})[0]

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 1,
                batch_size: int = 64) -> list[Prediction]:
        """Label images (paths, PIL images or arrays); a bad image raises TintError naming it."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        results = []
        for _, outcome in self.iter_predictions(list(images), top_k, batch_size):
            if isinstance(outcome, TintError):
                raise outcome
            results.append(outcome)
        return results

    def iter_predictions(self, images: Sequence[ImageLike], top_k: int = 1,
                         batch_size: int = 64) -> Iterator[tuple[int, Prediction | TintError]]:
        """(index, Prediction or the TintError of an unreadable image), in input order."""
        if batch_size < 1:
            raise TintError(f"--batch-size {batch_size}: must be >= 1")
        if top_k < 1:
            raise TintError(f"--top-k {top_k}: must be >= 1")
        top_k = min(top_k, len(self.classes))
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            arrays: list[np.ndarray] = []
            kept: list[int] = []
            failed: dict[int, TintError] = {}
            for offset, image in enumerate(chunk):
                try:
                    arrays.append(preprocess(image, self.spec, _name(image, start + offset)))
                    kept.append(start + offset)
                except TintError as err:
                    failed[start + offset] = err
            probs = softmax(self.logits(np.stack(arrays))) if arrays else np.zeros((0, 0))
            by_index = dict(zip(kept, probs, strict=True))
            for index in range(start, start + len(chunk)):
                if index in failed:
                    yield index, failed[index]
                else:
                    yield index, self._prediction(_name(images[index], index), by_index[index], top_k)

    def _prediction(self, source: str, probs: np.ndarray, top_k: int) -> Prediction:
        order = np.argsort(-probs, kind="stable")[:top_k]
        top = [(self.classes[i], float(probs[i])) for i in order]
        return Prediction(source=source, label=top[0][0], probability=top[0][1], top=top,
                          probabilities=probs)


def _name(image: ImageLike, index: int) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return f"<{type(image).__name__} {index}>"


def _onnx_session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise TintError(f"{path}: onnxruntime cannot load it ({err}); re-create it with "
                        "`tint fit`") from err


# ----------------------------------------------------------------------------- output


def format_results(results: list[Prediction], fmt: str, top_k: int) -> str:
    """Results as an aligned table, CSV (header + one row per image) or a JSON array."""
    if fmt == "json":
        rows = [{"file": r.source, "label": r.label, "probability": round(r.probability, 6),
                 "top": [{"label": lab, "probability": round(p, 6)} for lab, p in r.top]}
                for r in results]
        return json.dumps(rows, indent=2) + "\n"
    header = ["file", "label", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"label_{rank}", f"probability_{rank}"]
    rows = []
    for r in results:
        row = [r.source]
        for lab, p in r.top:
            row += [lab, f"{p:.4f}"]
        rows.append(row + [""] * (len(header) - len(row)))
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="a model folder written by `tint fit`")
    parser.add_argument("images", nargs="+", type=Path,
                        help="image files and/or folders (walked recursively for image files)")
    parser.add_argument("--top-k", type=int, default=1, help="labels shown per image (default 1)")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="output format on stdout (default table)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime threads (default: onnxruntime's choice)")
    parser.epilog = ("Exit status: 0 all images labelled; 1 some images could not be read "
                     "(each named on stderr, the others still printed); 2 usage error.")


def run(args: argparse.Namespace) -> int:
    predictor = Predictor(args.model_dir, threads=args.threads)
    paths = find_images(args.images)
    if not paths:
        raise TintError(f"{', '.join(map(str, args.images))}: no image files found "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    results: list[Prediction] = []
    failures = 0
    for _, outcome in predictor.iter_predictions(paths, args.top_k, args.batch_size):
        if isinstance(outcome, TintError):
            failures += 1
            print(f"tint predict: skipped {outcome}", file=sys.stderr)
        else:
            results.append(outcome)
    sys.stdout.write(format_results(results, args.format, min(args.top_k, len(predictor.classes))))
    if failures:
        print(f"tint predict: {failures} of {len(paths)} file(s) could not be read (exit status 1)",
              file=sys.stderr)
    return 1 if failures else 0
