"""The catalogue of bad inputs and ordinary faults (issue 15, docs/reliability.md).

One parametrised test per category: CLI faults, episode checks, run-dir faults, plan
inputs. Every case asserts the exit status, a one-line message on stderr that names the
file or option, and no traceback. The tests after them check what a refusal alone
cannot show: Ctrl-C of a real `tint run`, a changed config replacing stale outputs, a
second identical run waiting for the first, the near-constant-image warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from data_fixtures import write_folder_tree
from PIL import Image
from safetensors.torch import save_file
from test_pipeline import tiny_config, write_tiny_dataset

import tint.io
from tint.cli import main
from tint.config import config_from_dict, dump_config
from tint.data import load_dataset
from tint.data.episodes import Episode, check_not_in_base, sample_episodes, save_episodes
from tint.data.images import load_image
from tint.errors import TintError
from tint.io import set_threads
from tint.rundir import claim_run_dir

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    set_threads(1)
    return write_tiny_dataset(tmp_path_factory.mktemp("reliability_data"))


def write_config(path: Path, data_root: Path, run_dir: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(data_root, run_dir, **overrides)))
    return path


def run_main(argv: list[str]) -> int:
    """`tint.main`, with anything it lets escape (a traceback for a user) as a failure."""
    try:
        return main(argv)
    except BaseException as err:  # noqa: BLE001 - KeyboardInterrupt and SystemExit too
        pytest.fail(f"tint {' '.join(argv[:1])} raised {type(err).__name__}: {err}")


def assert_one_line_error(code: int, expected_code: int, captured, *needles: str) -> str:
    """The exit status, one stderr line besides progress lines ("tint: ..."), every
    needle in it, no traceback."""
    out = captured.out + captured.err
    assert code == expected_code, out
    assert "Traceback" not in out
    lines = [line for line in captured.err.splitlines()
             if line.strip() and not line.startswith("tint: ")]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- CLI faults


def _config_folder(tmp: Path, mp) -> tuple[list[str], list[str]]:
    (tmp / "configs").mkdir()
    return ["run", str(tmp / "configs")], [str(tmp / "configs"), "is a folder", "YAML file"]


def _binary_config(tmp: Path, mp) -> tuple[list[str], list[str]]:
    path = tmp / "model.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    return ["run", str(path)], [str(path), "not a text file"]


def _episodes_argv(tmp: Path, out: Path) -> list[str]:
    """`tint episodes` on a small image-folder dataset: a command that writes one file."""
    root = write_folder_tree(tmp / "ds", {f"c{i}": 3 for i in range(3)})
    return ["episodes", "--dataset", f"folder:{root}", "--way", "2", "--shot", "1",
            "--query", "1", "--out", str(out)]


def _disk_full_on_write(tmp: Path, mp) -> tuple[list[str], list[str]]:
    """write() itself fails with ENOSPC (through /dev/full), so the OS names no file."""
    full = tmp / ".dev-full-link"
    full.symlink_to("/dev/full")
    mp.setattr(tint.io.tempfile, "mkstemp", lambda **kw: (os.open(full, os.O_WRONLY), str(full)))
    out = tmp / "episodes.json"
    return _episodes_argv(tmp, out), [str(out), "No space left on device", "free disk space"]


def _read_only_disk(tmp: Path, mp) -> tuple[list[str], list[str]]:
    def refuse(dir=None, **kw):  # what os.open inside mkstemp raises on a read-only mount
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(dir) / ".tmpfile"))

    mp.setattr(tint.io.tempfile, "mkstemp", refuse)
    out = tmp / "ro" / "episodes.json"
    return (_episodes_argv(tmp, out),
            [str(tmp / "ro"), "Read-only file system", "writable folder"])


def _permission_denied(tmp: Path, mp) -> tuple[list[str], list[str]]:
    def refuse(dir=None, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(dir) / ".tmpfile"))

    mp.setattr(tint.io.tempfile, "mkstemp", refuse)
    out = tmp / "locked" / "episodes.json"
    return _episodes_argv(tmp, out), [str(tmp / "locked"), "Permission denied", "permissions"]


def _keyboard_interrupt(tmp: Path, mp) -> tuple[list[str], list[str]]:
    import tint.evaluation.plan_cli as plan_cli

    def interrupted(args):
        raise KeyboardInterrupt

    mp.setattr(plan_cli, "run", interrupted)
    return ["plan", "--paper-example"], ["interrupted", "same command again"]


def _export_unknown_weights(tmp: Path, mp) -> tuple[list[str], list[str]]:
    import torch

    path = tmp / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    return ["export", str(path)], [str(path), "no student architecture", "tint run"]


def _export_truncated_weights(tmp: Path, mp) -> tuple[list[str], list[str]]:
    path = tmp / "student.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    return ["export", str(path)], [str(path), "not a readable safetensors file"]


def _export_other_architecture(tmp: Path, mp) -> tuple[list[str], list[str]]:
    """Issue 22: conv4 weights whose metadata says resnet12 (a page-long load error before)."""
    from tint.io import save_tensors
    from tint.students import create_student

    path = tmp / "student.safetensors"
    model = create_student("conv4", 3, image_size=32)
    save_tensors(path, model.state_dict(), {"arch": "resnet12", "num_classes": 3, "image_size": 32})
    return ["export", str(path)], [str(path), "names a resnet12 student", "another network's"]


def _export_damaged_student(tmp: Path, mp) -> tuple[list[str], list[str]]:
    """Issue 22: a damaged student: the advice is to rerun the run that made it, not to
    "delete it and run the same command again" (tint export cannot recompute its input)."""
    from tint.students import create_student
    from tint.students.distill import save_student

    path = tmp / "student.safetensors"
    save_student(path, create_student("conv4", 3, image_size=32))
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))
    return ["export", str(path)], [str(path), "cannot be exported", "`tint run`", "again"]


def _duplicate_yaml_key(tmp: Path, mp) -> tuple[list[str], list[str]]:
    """Issue 22: a key given twice was accepted (the last won)."""
    path = tmp / "dup.yaml"
    path.write_text("name: dup\ndistill:\n  lr: 0.1\n  iterations: 3\n  lr: 0.01\n")
    return ["run", str(path)], [str(path), "key 'lr' appears twice", "line 3 and line 5"]


def _ray_address_with_local_executor(tmp: Path, mp) -> tuple[list[str], list[str]]:
    """Issue 22: --ray-address was silently ignored without --executor ray; it now implies
    ray, and contradicting it with --executor local is an error."""
    return (["run", "--executor", "local", "--ray-address", "127.0.0.1:1"],
            ["--ray-address 127.0.0.1:1", "--executor local"])


CLI_FAULTS: dict[str, Callable] = {
    "config-is-a-folder": _config_folder,
    "binary-config": _binary_config,
    "disk-full": _disk_full_on_write,
    "read-only-disk": _read_only_disk,
    "permission-denied": _permission_denied,
    "ctrl-c": _keyboard_interrupt,
    "export-weights-without-architecture": _export_unknown_weights,
    "export-truncated-weights": _export_truncated_weights,
    "export-other-architecture": _export_other_architecture,
    "export-damaged-student": _export_damaged_student,
    "duplicate-yaml-key": _duplicate_yaml_key,
    "ray-address-with-local-executor": _ray_address_with_local_executor,
}


@pytest.mark.parametrize("case", list(CLI_FAULTS))
def test_cli_fault_is_one_line(case, tmp_path, monkeypatch, capsys):
    argv, needles = CLI_FAULTS[case](tmp_path, monkeypatch)
    expected = 130 if case == "ctrl-c" else 2
    line = assert_one_line_error(run_main(argv), expected, capsys.readouterr(), *needles)
    assert "--arch" not in line and "--num-classes" not in line  # options tint export lacks


# ----------------------------------------------------------------------------- episodes


def _episode_file(tmp: Path, data_root: Path, edit: Callable[[dict], None]) -> Path:
    """A valid tint episode file of the tiny dataset's novel classes, then `edit`ed."""
    dataset = load_dataset(f"folder:{data_root}", resolution=32)
    episodes = sample_episodes(dataset, "novel", n_way=3, k_shot=2, n_query=3, seed=0)
    path = tmp / "episodes.json"
    save_episodes(path, episodes, {"dataset": f"folder:{data_root}"})
    data = json.loads(path.read_text())
    edit(data["episodes"][0])
    path.write_text(json.dumps(data))
    return path


def _swap_queries(ep: dict) -> None:
    """The first query image of class 0 and of class 1 exchanged: both filed wrongly."""
    ep["query"][0][0], ep["query"][1][0] = ep["query"][1][0], ep["query"][0][0]


def _wrong_class_query(tmp, data_root):
    path = _episode_file(tmp, data_root, _swap_queries)
    ep = json.loads(path.read_text())["episodes"][0]
    item, filed, real = ep["query"][0][0], ep["classes"][0], ep["classes"][1]
    return (["--set", f"data.episodes={path}"],
            [str(path), f"query item {item!r} is filed under class {filed!r}",
             f"belongs to class {real!r}"])


def _unknown_item(tmp, data_root):
    path = _episode_file(tmp, data_root, lambda ep: ep["query"][2].append("class7/missing.png"))
    return (["--set", f"data.episodes={path}"],
            [str(path), "'class7/missing.png'", "is not an item of"])


def _support_is_query(tmp, data_root):
    path = _episode_file(tmp, data_root, lambda ep: ep["query"][0].append(ep["support"][0][0]))
    return ["--set", f"data.episodes={path}"], [str(path), "support/query overlap"]


def _evaluated_split_is_base(tmp, data_root):
    return (["--set", "data.split=base"],
            ["data.split='base'", "base classes (data.base_split='base')", "data.split=novel"])


def _base_classes_in_file(tmp, data_root):
    dataset = load_dataset(f"folder:{data_root}", resolution=32)
    episodes = sample_episodes(dataset, "base", n_way=3, k_shot=2, n_query=3, seed=0)
    path = tmp / "base-episodes.json"
    save_episodes(path, episodes, {"dataset": f"folder:{data_root}"})
    return (["--set", f"data.episodes={path}"],
            [str(path), f"{episodes[0].classes[0]!r}", "base classes", "data.split=novel"])


def _malformed_file(tmp, data_root):
    path = tmp / "episodes.json"
    path.write_text('{"format": "tint-episodes", "version": 1, "episodes": [')
    return (["--set", f"data.episodes={path}"],
            [str(path), "malformed episode file", "line 1", "tint episodes"])


def _binary_file(tmp, data_root):
    path = tmp / "episodes.json"
    path.write_bytes(bytes(range(256)))
    return ["--set", f"data.episodes={path}"], [str(path), "not a text file", "tint episodes"]


EPISODE_CASES: dict[str, Callable] = {
    "query-filed-under-wrong-class": _wrong_class_query,
    "item-not-in-dataset": _unknown_item,
    "support-item-also-query": _support_is_query,
    "sampled-from-the-base-split": _evaluated_split_is_base,
    "file-of-base-classes": _base_classes_in_file,
    "malformed-json": _malformed_file,
    "binary-file": _binary_file,
}


@pytest.mark.parametrize("case", list(EPISODE_CASES))
def test_bad_episodes_are_refused_before_any_work(case, data_root, tmp_path, capsys):
    extra, needles = EPISODE_CASES[case](tmp_path, data_root)
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", data_root, run_dir)
    line = assert_one_line_error(run_main(["run", str(config), "--run-dir", str(run_dir), *extra]), 2,
                                 capsys.readouterr(), *needles)
    assert "delete it" not in line  # the user's own input is never "recomputed"
    assert not (run_dir / "artifacts").exists() and not (run_dir / "episodes").exists()


def test_images_in_the_distillation_pool_are_refused(data_root):
    """The item-level leak check, for pools not made of whole base classes."""
    dataset = load_dataset(f"folder:{data_root}", resolution=32)
    (episode,) = sample_episodes(dataset, "novel", n_way=3, k_shot=2, n_query=3, seed=0)
    pool = [*dataset.items["class0"], episode.query[1][2]]
    with pytest.raises(TintError, match=rf"query image '{episode.query[1][2]}' is also in the "
                                        "distillation pool of this run"):
        check_not_in_base([episode], dataset, "eps.json", pool)
    check_not_in_base([episode], dataset, "eps.json", dataset.items["class0"])  # disjoint: fine


# ----------------------------------------------------------------------------- run dir


def _run_dir_is_a_file(tmp, data_root):
    path = tmp / "results.txt"
    path.write_text("not a folder")
    return path, [str(path), "existing file, not a folder"], None


def _parent_is_a_file(tmp, data_root):
    (tmp / "plain").write_text("")
    return tmp / "plain" / "run", [f"{tmp / 'plain'} is a file, not a folder"], None


def _saved_config_differs(tmp, data_root):
    run_dir = tmp / "run"
    other = config_from_dict(tiny_config(data_root, run_dir, **{"distill.iterations": 9}))
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(other))
    return run_dir, [str(run_dir), "distill.iterations: 9 -> 6", "--allow-config-change"], None


def _in_use_with_other_settings(tmp, data_root):
    run_dir = tmp / "run"
    other = dump_config(config_from_dict(tiny_config(data_root, run_dir, **{"data.n_episodes": 3})))
    return run_dir, [str(run_dir), "in use by another tint run", "data.n_episodes: 3 -> 2"], other


RUN_DIR_CASES: dict[str, Callable] = {
    "run-dir-is-a-file": _run_dir_is_a_file,
    "parent-is-a-file": _parent_is_a_file,
    "saved-config-differs": _saved_config_differs,
    "in-use-by-a-run-with-other-settings": _in_use_with_other_settings,
}


@pytest.mark.parametrize("case", list(RUN_DIR_CASES))
def test_run_dir_fault_is_refused_before_any_work(case, data_root, tmp_path, capsys):
    run_dir, needles, held_by = RUN_DIR_CASES[case](tmp_path, data_root)
    config = write_config(tmp_path / "tiny.yaml", data_root, run_dir)
    argv = ["run", str(config), "--run-dir", str(run_dir)]
    if held_by is None:
        code = run_main(argv)
    else:
        with claim_run_dir(run_dir, held_by):  # another run holds it for its whole length
            code = run_main(argv)
    assert_one_line_error(code, 2, capsys.readouterr(), *needles)
    assert not (run_dir / "artifacts").exists()


def test_changed_config_replaces_stale_outputs_only_when_allowed(data_root, tmp_path, capsys):
    """A run dir left by a 3-episode config with another student: refused; with the flag,
    its export/ep002 and the renamed student's folders are gone and the new run is whole."""
    run_dir = tmp_path / "run"
    quick = {"generator.name": "none", "generator.images_per_class": 0,
             "generator.specialize": {}, "generator.generate": {},
             "teacher.meta_train.epochs": 0, "distill.iterations": 2}
    old = tiny_config(data_root, run_dir, **quick, **{"data.n_episodes": 3})
    old["students"][1]["name"] = "old-name"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(config_from_dict(old)))
    for stale in ("export/ep002/with-tint", "export/ep000/old-name", "episodes/ep002"):
        (run_dir / stale).mkdir(parents=True)
        (run_dir / stale / "done.json").write_text("{}")
    (run_dir / "results.json").write_text('{"name": "old"}')
    config = write_config(tmp_path / "tiny.yaml", data_root, run_dir, **quick)
    argv = ["run", str(config), "--run-dir", str(run_dir)]
    assert_one_line_error(run_main(argv), 2, capsys.readouterr(), "data.n_episodes: 3 -> 2",
                          "students.1.name: 'old-name' -> 'with-tint'", "--allow-config-change")
    assert (run_dir / "export" / "ep002").is_dir()  # refused: nothing touched

    assert main([*argv, "--allow-config-change"]) == 0
    exports = sorted(str(p.relative_to(run_dir / "export")) for p in
                     (run_dir / "export").glob("ep*/*"))
    assert exports == ["ep000/with-tint", "ep000/without-synthetic",
                       "ep001/with-tint", "ep001/without-synthetic"]
    assert not (run_dir / "episodes" / "ep002").exists()
    assert json.loads((run_dir / "results.json").read_text())["name"] == "tiny"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["students"][1]["name"] == "with-tint"
    assert main(argv) == 0  # the same config again: accepted, everything resumed


def test_second_identical_run_waits_for_the_first(tmp_path, caplog):
    run_dir, text = tmp_path / "run", "name: same\n"
    held, release, waited = threading.Event(), threading.Event(), []

    def first():
        with claim_run_dir(run_dir, text):
            held.set()
            release.wait(60)

    def second():
        with claim_run_dir(run_dir, text, on_wait=waited.append):
            (run_dir / "second.txt").write_text("ran")

    caplog.set_level(logging.INFO, logger="tint")
    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert held.wait(60)
    threads.append(threading.Thread(target=second))
    threads[1].start()
    for _ in range(1200):  # until the second run reports that it waits (not a timing check)
        if any("waiting for it" in r.getMessage() for r in caplog.records):
            break
        time.sleep(0.05)
    assert not (run_dir / "second.txt").exists()  # blocked while the first holds the dir
    release.set()
    for thread in threads:
        thread.join(60)
    assert (run_dir / "second.txt").read_text() == "ran" and len(waited) == 1
    # Issue 22: said once, as a warning (shown before the run's log exists), with the holder's pid
    says = [r for r in caplog.records if "waiting for it" in r.getMessage()]
    assert len(says) == 1 and says[0].levelno == logging.WARNING
    assert f"(pid {os.getpid()})" in says[0].getMessage()


def test_ctrl_c_during_a_run_is_one_line_and_exit_130(data_root, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", data_root, tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tint.cli", "run", str(config)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    seen = []
    try:
        for line in proc.stderr:  # wait until a stage is running, then press Ctrl-C
            seen.append(line)
            if ": running" in line:
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    stderr = "".join(seen) + err
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr + out
    notices = [line for line in stderr.splitlines() if "interrupted" in line]
    assert notices == [stderr.strip().splitlines()[-1]]
    assert "run the same command again to resume" in notices[0]


# ----------------------------------------------------------------------------- plan


PLAN = ["plan", "--accuracy", "0.9", "--sigma", "0.05", "--queries", "75"]
PLAN_CASES = {
    "target-ci-1e-200": ([*PLAN, "--target-ci", "1e-200"], ["--target-ci 1e-200", "10^"]),
    "target-variance-1e-320": ([*PLAN, "--target-variance", "1e-320"],
                               ["--target-variance 1e-320", "larger target"]),
    "target-variance-1e-30": ([*PLAN, "--target-variance", "1e-30"], ["--target-variance 1e-30"]),
    "target-variance-nan": ([*PLAN, "--target-variance", "nan"], ["--target-variance", "finite"]),
    "sigma-nan": (["plan", "--accuracy", "0.9", "--sigma", "nan", "--queries", "75",
                   "--episodes", "10"], ["--sigma", "finite"]),
    "accuracy-inf": (["plan", "--accuracy", "inf", "--sigma", "0.05", "--queries", "75",
                      "--episodes", "10"], ["--accuracy", "finite"]),
    "episodes-1e12": ([*PLAN, "--episodes", str(10**12)], ["--episodes 1000000000000"]),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_plan_refuses_non_finite_and_unreachable_inputs(case, capsys):
    argv, needles = PLAN_CASES[case]
    captured_code = run_main(argv)
    captured = capsys.readouterr()
    assert_one_line_error(captured_code, 2, captured, *needles)
    assert "nan" not in captured.out.lower() and "inf " not in captured.out.lower()


# ----------------------------------------------------------------------------- images


def test_nearly_constant_image_warns_naming_the_file(tmp_path, caplog):
    flat = tmp_path / "damaged.jpg"
    Image.new("RGB", (40, 30), (128, 128, 128)).save(flat)  # what a broken JPEG decodes to
    noisy = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(noisy)
    with caplog.at_level(logging.WARNING, logger="tint"):
        load_image(noisy, 16)
        assert not caplog.records
        load_image(flat, 16)
        load_image(flat, 16)  # once per file
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert str(flat) in caplog.records[0].getMessage()
    assert "nearly constant" in caplog.records[0].getMessage()


def test_garbled_jpeg_warns_naming_the_file(tmp_path, caplog):
    """Issue 22: a damaged JPEG that PIL decodes without a word (libjpeg's "Corrupt JPEG data"
    warnings are not passed on) was used silently; the marker scan now warns, once per file,
    on the training path and in `tint predict` alike (both decode with tint.imaging)."""
    from tint.imaging import open_image

    arr = np.zeros((48, 48, 3), np.uint8)
    arr[:, :24] = 200
    good = tmp_path / "good.jpg"
    Image.fromarray(arr).save(good)
    data = good.read_bytes()
    k = data.find(b"\xff\xc4")  # the first Huffman table: junk bytes before it
    garbled = tmp_path / "garbled.jpg"
    garbled.write_bytes(data[:k] + b"junk!" + data[k:])
    Image.open(garbled).load()  # PIL alone: decodes, no warning, no error
    with caplog.at_level(logging.WARNING, logger="tint"):
        open_image(good)
        assert not caplog.records
        load_image(garbled, 16)
        open_image(garbled)  # once per file
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    message = caplog.records[0].getMessage()
    assert str(garbled) in message and "corrupt JPEG data" in message and "5 extraneous bytes" in message


def test_garbled_compressed_data_is_found_by_the_huffman_check(tmp_path, caplog):
    """Bytes overwritten inside the compressed data: PIL decodes a garbled picture without a
    word; tint's Huffman check of baseline JPEGs (tint.jpeg_check) finds the damage in most
    such files, and never flags an intact one (restart markers, grey, 4:2:0, 4:4:4)."""
    import io
    import warnings as python_warnings

    from tint.jpeg_check import jpeg_problem

    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4 % 256, y * 5 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)
    for i, options in enumerate([{}, {"subsampling": 0}, {"restart_marker_blocks": 2},
                                 {"optimize": True}]):
        for mode in ("RGB", "L"):
            path = tmp_path / f"intact-{i}-{mode}.jpg"
            Image.fromarray(pixels).convert(mode).save(path, quality=90, **options)
            assert jpeg_problem(path) is None, (options, mode)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    found = garbled = 0
    for k, at in enumerate(range(len(data) // 2, len(data) - 10, 97)):
        damaged = bytearray(data)
        damaged[at:at + 4] = b"\x12\x34\x56\x78"
        path = tmp_path / f"garbled-{k}.jpg"
        path.write_bytes(bytes(damaged))
        with python_warnings.catch_warnings():
            python_warnings.simplefilter("error")  # PIL itself: no warning, no error
            decoded = np.asarray(Image.open(path).convert("RGB")).astype(int)
        if np.abs(decoded - np.asarray(Image.open(io.BytesIO(data))).astype(int)).mean() < 5:
            continue
        garbled += 1
        with caplog.at_level(logging.WARNING, logger="tint"):
            load_image(path, 16)
        found += any(str(path) in r.getMessage() and "corrupt JPEG data" in r.getMessage()
                     for r in caplog.records)
    assert garbled >= 3 and found >= garbled - 1, (found, garbled)


def test_full_disk_during_a_tensor_write_is_one_line(tmp_path, monkeypatch, capsys):
    """Issue 22: safetensors reports a full disk as SafetensorError, not OSError, so the CLI
    showed a traceback; save_tensors now raises the OSError it is, naming the file."""
    import torch
    from safetensors import SafetensorError

    from tint.cli import os_error_message

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(tint.io, "save_file", full_disk)
    path = tmp_path / "artifacts" / "student.safetensors"
    with pytest.raises(OSError) as caught:
        tint.io.save_tensors(path, {"w": torch.zeros(2)})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    line = os_error_message(caught.value)
    assert line.startswith(f"{path}: No space left on device; free disk space")
    assert not list(path.parent.iterdir())  # no temp file left behind


def test_ray_address_implies_the_ray_executor(capsys):
    """Issue 22: `--ray-address` without `--executor ray` was ignored (the run went local)."""
    assert run_main(["run", "--ray-address", "10.0.0.1:6379", "--print-config"]) == 0
    executor = yaml.safe_load(capsys.readouterr().out)["executor"]
    assert executor["name"] == "ray" and executor["address"] == "10.0.0.1:6379"


def test_episode_object_check_names_filed_and_real_class(data_root):
    from tint.data.episodes import check_episodes

    dataset = load_dataset(f"folder:{data_root}", resolution=32)
    wrong = Episode(classes=["class5", "class6"], support=[["class5/00.png"], ["class6/00.png"]],
                    query=[["class6/01.png"], ["class6/02.png"]])
    with pytest.raises(TintError, match="query item 'class6/01.png' is filed under class 'class5' "
                                        "but belongs to class 'class6'"):
        check_episodes([wrong], dataset, "eps.json")
