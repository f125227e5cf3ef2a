"""`tint export`: a trained student -> TorchScript (.pt) and ONNX (.onnx), checked.

The exported models take what every tint model takes, float32 images ``[B, 3, H, W]``
in ``[0, 1]`` (normalisation is inside), with a dynamic batch dimension, and return
logits ``[B, N]``. ``check_onnx`` runs the ONNX file with onnxruntime and compares its
logits with torch's; the command fails if they differ by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tint.errors import TintError
from tint.io import DamagedFileError, write_json
from tint.students.distill import load_student

DEFAULT_ATOL = 1e-4


@contextlib.contextmanager
def _quiet_export():
    """Tracing warns about Python-side shape checks that are constants for a fixed size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        yield


def example_input(resolution: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def export_torchscript(model: nn.Module, path: str | Path, resolution: int) -> Path:
    """Trace `model` at `resolution` and save it (load with ``torch.jit.load``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with _quiet_export(), torch.no_grad():
        traced = torch.jit.trace(model, example_input(resolution), check_trace=False)
    tmp = path.with_name(f".{path.name}.tmp")
    traced.save(str(tmp))
    tmp.replace(path)
    return path


def export_onnx(model: nn.Module, path: str | Path, resolution: int, opset: int = 17) -> Path:
    """ONNX with a dynamic batch axis; input "images", output "logits".

    Uses the TorchScript-based exporter (fast, mature for plain CNNs) and falls back to
    the torch.export-based one where the former is unavailable or fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    tmp = path.with_name(f".{path.name}.tmp")
    x = example_input(resolution)
    common = dict(input_names=["images"], output_names=["logits"], opset_version=opset)
    with _quiet_export(), torch.no_grad():
        try:
            torch.onnx.export(model, (x,), str(tmp), dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              **common)
        except Exception as legacy_error:  # noqa: BLE001 - retried with the other exporter
            try:
                batch = torch.export.Dim("batch")
                torch.onnx.export(model, (x,), str(tmp), dynamo=True,
                                  dynamic_shapes=({0: batch},), **common)
            except Exception as err:
                tmp.unlink(missing_ok=True)
                raise TintError(f"{path}: ONNX export failed ({legacy_error}; then {err})") from err
    tmp.replace(path)
    return path


def onnx_session(onnx_path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise TintError(f"{onnx_path}: onnxruntime cannot load it ({err})") from err


def check_onnx(model: nn.Module, onnx_path: str | Path, resolution: int, batch: int = 4,
               atol: float = DEFAULT_ATOL, seed: int = 1) -> dict:
    """Compare onnxruntime's logits with torch's on random images.

    Uses a batch size different from the export example, so the dynamic batch axis is
    checked too. Returns {"max_abs_diff", "atol", "ok", "batch", "resolution"}.
    """
    session = onnx_session(onnx_path)
    x = example_input(resolution, batch=batch, seed=seed)
    with torch.no_grad():
        expected = model.eval()(x).float().numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != expected.shape:
        raise TintError(f"{onnx_path}: onnxruntime output shape {got.shape} != torch's "
                        f"{expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    return {"max_abs_diff": diff, "atol": atol, "ok": diff <= atol, "batch": batch,
            "resolution": resolution}


def export_student(model: nn.Module, out_dir: str | Path, resolution: int,
                   name: str = "student", onnx: bool = True, torchscript: bool = True,
                   check: bool = True, atol: float = DEFAULT_ATOL) -> dict:
    """Write ``<name>.pt`` / ``<name>.onnx`` under `out_dir`; returns a report dict
    (also written as ``<name>_export.json``). Raises TintError if the ONNX check fails."""
    out_dir = Path(out_dir)
    report: dict = {"resolution": resolution}
    if torchscript:
        report["torchscript"] = str(export_torchscript(model, out_dir / f"{name}.pt", resolution))
    if onnx:
        onnx_path = export_onnx(model, out_dir / f"{name}.onnx", resolution)
        report["onnx"] = str(onnx_path)
        if check:
            report["onnx_check"] = check_onnx(model, onnx_path, resolution, atol=atol)
    write_json(out_dir / f"{name}_export.json", report)
    if check and onnx and not report["onnx_check"]["ok"]:
        raise TintError(f"{report['onnx']}: onnxruntime logits differ from torch's by "
                        f"{report['onnx_check']['max_abs_diff']:.2e} > atol {atol}")
    return report


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="student weights (student.safetensors written by distillation)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--name", default="student", help="file stem of the exports")
    parser.add_argument("--resolution", type=int, default=None,
                        help="input side (default: the one stored with the weights, else 84)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    parser.add_argument("--no-torchscript", action="store_true", help="skip TorchScript")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing onnxruntime's logits with torch's")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help="largest accepted |onnx - torch| logit difference")


def _check_student_file(path: Path) -> None:
    """A readable safetensors file that names its student architecture, or a TintError
    saying which file to give (the weights alone cannot say which network they fit)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types  # noqa: BLE001
        raise TintError(f"{path}: not a readable safetensors file ({err}); give the "
                        "student.safetensors a tint run wrote (artifacts/distill/<key>/)") from err
    from tint.io import read_metadata

    meta = read_metadata(raw)[0] or {}
    if not isinstance(meta, dict) or "arch" not in meta or "num_classes" not in meta:
        raise TintError(f"{path}: no student architecture in its metadata, so tint cannot rebuild "
                        "the network; give a student.safetensors written by `tint run` "
                        "(artifacts/distill/<key>/student.safetensors)")
    _check_architecture(path, meta)


def _check_architecture(path: Path, meta: dict) -> None:
    """The tensors must be those of the network the metadata names: otherwise rebuilding it
    fails with a page-long list of missing and unexpected keys (or an unknown-name error
    that does not say which file)."""
    from safetensors import safe_open

    from tint.students import create_student

    arch = str(meta["arch"])
    try:
        kwargs = {k: meta[k] for k in ("image_size", "pool") if k in meta}
        expected = {k: list(v.shape) for k, v in
                    create_student(arch, int(meta["num_classes"]), **kwargs).state_dict().items()}
    except (TintError, TypeError, ValueError) as err:
        raise TintError(f"{path}: its metadata names student {arch!r} with "
                        f"{meta['num_classes']!r} classes, which tint cannot build ({err})") from err
    with safe_open(str(path), framework="pt") as handle:
        found = {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}
    wrong = sorted(set(expected) ^ set(found)) or sorted(
        k for k in expected if expected[k] != found[k])
    if wrong:
        first = wrong[0]
        detail = (f"{first}: {found.get(first, 'missing')} in the file, "
                  f"{expected.get(first, 'none')} in a {arch}")
        raise TintError(f"{path}: its metadata names a {arch} student, but its tensors are another "
                        f"network's ({len(wrong)} differ, e.g. {detail}); the file was edited or "
                        "mixed up: give the unmodified student.safetensors of the run that made it "
                        "(artifacts/distill/<key>/)")


def run(args: argparse.Namespace) -> int:
    if not args.checkpoint.is_file():
        raise TintError(f"{args.checkpoint}: file not found; give a student.safetensors "
                        "from a distillation run directory")
    _check_student_file(args.checkpoint)
    try:
        model, meta = load_student(args.checkpoint)
    except DamagedFileError as err:
        raise TintError(
            f"{err.path}: {err.problem}, so it cannot be exported. Run again the `tint run` (or "
            "`tint fit`) command that wrote it: it notices the damage, distils this student again "
            "from its last good checkpoint (same weights) and exports it itself (export/ in the run "
            "dir); then `tint export` that new file if you need another copy") from err
    resolution = args.resolution or int(meta.get("image_size") or 84)
    stored = meta.get("image_size")
    if stored and args.resolution and int(stored) != args.resolution and meta.get("arch") == "conv4":
        raise TintError(f"--resolution {args.resolution}: this conv4 was trained at "
                        f"{stored}x{stored} and only accepts that size")
    out_dir = args.out or args.checkpoint.parent
    report = export_student(model, out_dir, resolution, name=args.name,
                            onnx=not args.no_onnx, torchscript=not args.no_torchscript,
                            check=not args.no_check, atol=args.atol)
    for key in ("torchscript", "onnx"):
        if key in report:
            print(f"{key}: {report[key]}")
    if "onnx_check" in report:
        c = report["onnx_check"]
        print(f"onnxruntime vs torch: max |diff| = {c['max_abs_diff']:.2e} (atol {c['atol']}): "
              f"{'ok' if c['ok'] else 'MISMATCH'}")
    return 0
