"""The stage engine: verified markers (content hashes), damaged files, checksummed tensors."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tint.engine import DONE, run_stage, weights_fingerprint
from tint.errors import TintError
from tint.io import DamagedFileError, load_tensors, save_tensors


@dataclass
class Ctx:
    run_dir: Path
    seed: int = 0
    hooks: dict = field(default_factory=dict)
    markers: dict = field(default_factory=dict)


def _stage(ctx: Ctx, folder: Path, calls: list[int]) -> dict:
    def work(f: Path) -> dict:
        calls.append(1)
        (f / "out.txt").write_text("payload")
        (f / "sub").mkdir(exist_ok=True)
        (f / "sub" / "deep.bin").write_bytes(b"\x00\x01\x02")
        return {"value": 7}

    return run_stage(ctx, "demo", folder, {"k": 1}, "x", work)


def test_marker_records_hashes_and_a_finished_stage_is_skipped(tmp_path):
    calls: list[int] = []
    marker = _stage(Ctx(tmp_path), tmp_path / "s", calls)
    assert set(marker["files"]) == {"out.txt", "sub/deep.bin"} and len(calls) == 1
    _stage(Ctx(tmp_path), tmp_path / "s", calls)  # a new process: verified, skipped
    assert len(calls) == 1


def test_marker_records_the_environment_that_computed_it(tmp_path):
    """A key fixes an artifact within one environment only, so the marker says which one
    (library versions, CPU, threads), and a run's results list the distinct ones."""
    from tint.results import environments

    ctx = Ctx(tmp_path)
    torch.set_num_threads(1)
    marker = _stage(ctx, tmp_path / "s", [])
    env = marker["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == 1
    assert env["numpy"] and env["pillow"]
    assert json.loads((tmp_path / "s" / DONE).read_text())["environment"] == env
    other = {**marker, "environment": {**env, "torch_threads": 2}}
    old = {k: v for k, v in marker.items() if k != "environment"}  # written before the record
    assert environments({"a": marker, "b": dict(marker), "c": other, "d": old}) == [env, other["environment"]]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_file_makes_the_stage_recompute_with_one_line(tmp_path, caplog, damage):
    calls: list[int] = []
    folder = tmp_path / "s"
    _stage(Ctx(tmp_path), folder, calls)
    target = folder / "sub" / "deep.bin"
    if damage == "flip":
        target.write_bytes(b"\x00\x01\x03")
    elif damage == "truncate":
        target.write_bytes(b"\x00")
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING, logger="tint"):
        marker = _stage(Ctx(tmp_path), folder, calls)
    assert len(calls) == 2 and target.read_bytes() == b"\x00\x01\x02"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sub/deep.bin changed or missing" in warnings[0]
    assert json.loads((folder / DONE).read_text())["files"] == marker["files"]


def test_subfolders_with_their_own_marker_belong_to_their_own_stage(tmp_path):
    calls: list[int] = []
    folder = tmp_path / "s"
    _stage(Ctx(tmp_path), folder, calls)
    inner = folder / "inner"
    run_stage(Ctx(tmp_path), "inner", inner, {"k": 2}, "y", lambda f: (f / "a.txt").write_text("1") and None)
    (inner / "a.txt").write_text("changed later by its own stage")
    _stage(Ctx(tmp_path), folder, calls)
    assert len(calls) == 1  # the outer stage does not own inner/a.txt


def test_tensor_files_carry_a_checksum(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"w": torch.arange(1000, dtype=torch.float32)}, {"step": 3})
    tensors, meta = load_tensors(path)
    assert meta == {"step": 3} and torch.equal(tensors["w"], torch.arange(1000, dtype=torch.float32))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one flipped bit in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match="no longer match their checksum"):
        load_tensors(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DamagedFileError, match="damaged or truncated"):
        load_tensors(path)
    assert issubclass(DamagedFileError, TintError)


def test_a_damaged_distillation_checkpoint_is_not_resumed_from(tmp_path, caplog):
    from tint.students.distill import CHECKPOINT_NAME, DistillConfig, DistillSource, distill
    from tint.students.models import create_student

    torch.manual_seed(0)
    images = torch.rand(12, 3, 16, 16)
    sources = {"support": DistillSource(torch.arange(12) % 3, images=images)}
    config = DistillConfig(iterations=4, batch_size=6, checkpoint_every=2, eval_every=2, lr_drop_at=None,
                           sources=("support",), seed=1)

    def train(folder: Path, stop_at: int | None = None):
        torch.manual_seed(5)  # the engine seeds each stage like this
        student = create_student("conv4", 3, image_size=16)
        hook = None
        if stop_at is not None:
            def hook(step, loss):
                if step == stop_at:
                    raise KeyboardInterrupt
        return distill(student, sources, config, folder, progress=False, on_step=hook)

    reference = load_tensors(train(tmp_path / "ref").final_path)[0]
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", stop_at=3)
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    data = bytearray(checkpoint.read_bytes())
    data[-5] ^= 0x10
    checkpoint.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        result = train(tmp_path / "run")
    assert result.resumed_from == 0
    # issue 22: the warning says what happened and that there is nothing to do (it said
    # "delete it and run the same command again", which the loop had already done)
    warned = [r.getMessage() for r in caplog.records if "cannot be resumed from" in r.getMessage()]
    assert len(warned) == 1 and "from step 0; nothing to do" in warned[0]
    assert str(checkpoint) in warned[0] and "delete it" not in warned[0]
    final = load_tensors(result.final_path)[0]
    assert all(torch.equal(reference[k], final[k]) for k in reference)


def test_a_manifest_may_only_name_files_in_its_own_folder(tmp_path):
    from tint.generators.base import MANIFEST_NAME, manifest_paths

    folder = tmp_path / "gen"
    folder.mkdir()
    (tmp_path / "outside.png").write_bytes(b"x")
    (folder / MANIFEST_NAME).write_text(json.dumps({"class": "a", "index": 0, "file": "../outside.png"}) + "\n")
    with pytest.raises(TintError, match="outside"):
        manifest_paths(folder, "a")


def _model_folder(folder: Path, weights: torch.Tensor) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text('{"sample_size": 16}')
    save_tensors(folder / "unet" / "diffusion_pytorch_model.safetensors", {"w": weights})
    return folder


def test_weights_fingerprint_sees_retrained_weights_of_the_same_size(tmp_path: Path) -> None:
    """Re-trained weights have the same configs and file sizes: their key must differ
    (sizes alone let a swapped generator reuse the old generator's artifacts)."""
    old = _model_folder(tmp_path / "old", torch.zeros(64))
    new = _model_folder(tmp_path / "new", torch.ones(64))
    copy = _model_folder(tmp_path / "copy", torch.zeros(64))
    sizes = [(p / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size for p in (old, new)]
    assert sizes[0] == sizes[1]
    assert weights_fingerprint(old) != weights_fingerprint(new)
    assert weights_fingerprint(old) == weights_fingerprint(copy)  # content, not location


def test_weights_fingerprint_follows_a_file_rewritten_in_place(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "gen", torch.zeros(64))
    before = weights_fingerprint(folder)
    save_tensors(folder / "unet" / "diffusion_pytorch_model.safetensors", {"w": torch.full((64,), 2.0)})
    assert weights_fingerprint(folder) != before


def test_identical_tensor_files_are_byte_identical_across_processes(tmp_path):
    """Issue 20.5: one metadata value, so the same student gives the same bytes in any
    process (safetensors writes a multi-key metadata map in a per-process order)."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from tint.students import create_student\n"
        "from tint.students.distill import save_student\n"
        "torch.manual_seed(0)\n"
        "save_student(sys.argv[1], create_student('conv4', 5, image_size=32), {'classes': ['a', 'b'], 'step': 3})\n"
    )
    paths = [tmp_path / f"s{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1


def test_files_written_before_the_one_key_format_still_load(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from tint.io import CHECKSUM_KEY, DamagedFileError, load_tensors, tensors_sha256

    tensors = {"w": torch.arange(4.0)}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={CHECKSUM_KEY: tensors_sha256(tensors), "tint": json.dumps({"step": 2})})
    loaded, meta = load_tensors(old)
    assert torch.equal(loaded["w"], tensors["w"]) and meta == {"step": 2}
    save_file({"w": torch.ones(4)}, str(old), metadata={CHECKSUM_KEY: tensors_sha256(tensors), "tint": "{}"})
    with pytest.raises(DamagedFileError):
        load_tensors(old)
