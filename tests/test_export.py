"""Export: TorchScript and ONNX agree with the torch student; the `tint export` command."""

from __future__ import annotations

import pytest
import torch

from tint.cli import main
from tint.export import check_onnx, export_student, onnx_session
from tint.students import create_student
from tint.students.distill import save_student

RES = 32


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")
@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
def test_onnx_and_torchscript_match_torch(tmp_path, arch):
    torch.manual_seed(0)
    model = create_student(arch, 5, image_size=RES).eval()
    report = export_student(model, tmp_path, RES)

    assert report["onnx_check"]["ok"] and report["onnx_check"]["max_abs_diff"] < 1e-4
    x = torch.rand(3, 3, RES, RES)  # a batch size the export never saw
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.load(report["torchscript"])(x)
    assert torch.allclose(scripted, expected, atol=1e-5)
    session = onnx_session(report["onnx"])
    got = session.run(None, {"images": x.numpy()})[0]
    assert got.shape == (3, 5)
    assert abs(got - expected.numpy()).max() < 1e-4


def test_check_reports_a_mismatch(tmp_path):
    torch.manual_seed(0)
    model = create_student("conv4", 5, image_size=RES).eval()
    report = export_student(model, tmp_path, RES, torchscript=False)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # the torch model no longer matches the file
    result = check_onnx(model, report["onnx"], RES)
    assert not result["ok"] and result["max_abs_diff"] == pytest.approx(1.0, abs=1e-4)


def test_export_command(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_student("conv4", 4, image_size=RES)
    save_student(tmp_path / "student.safetensors", model)

    assert main(["export", str(tmp_path / "student.safetensors"), "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "student.pt").is_file()
    assert (tmp_path / "x" / "student.onnx").is_file()
    assert "ok" in capsys.readouterr().out

    assert main(["export", str(tmp_path / "missing.safetensors")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "student.safetensors"), "--resolution", "84"]) == 2
    assert "only accepts" in capsys.readouterr().err
