"""Atomic, resumable artifact I/O shared by every stage.

Everything a stage writes goes through these helpers: data is written to a temporary
file in the same folder and renamed into place, so a killed process never leaves a
half-written artifact that a resumed run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tint.errors import TintError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are shared files
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise TintError(f"{path}: file not found") from err
    except json.JSONDecodeError as err:
        raise TintError(f"{path}: not valid JSON ({err}); delete it to recompute") from err


class DamagedFileError(TintError):
    """A tensor file that is truncated, unreadable or no longer matches its checksum.

    `problem` says what is wrong with `path` without advice: the caller that knows what
    made the file (a checkpoint the loop restarts, a student `tint export` was given)
    says what to do instead of the generic "delete it and run the same command again"."""

    def __init__(self, path: Path, problem: str,
                 advice: str = "delete it and run the same command again to recompute it"):
        super().__init__(f"{path}: {problem}; {advice}")
        self.path, self.problem = path, problem


CHECKSUM_KEY = "tint_sha256"  # files written before tint/v2 (two keys)
# One metadata key holding checksum and metadata as one JSON value: safetensors writes its
# metadata map in a per-process order, so two keys gave identical tensors different bytes.
METADATA_KEY = "tint/v2"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes: what a flipped bit or a truncation changes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save tensors as safetensors with `metadata` (JSON-able) and a checksum of the tensors,
    verified by `load_tensors`, in one metadata value: the same tensors and metadata give
    the same bytes in any process (tests/test_engine.py)."""
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    record = {"sha256": tensors_sha256(contiguous), "metadata": metadata}
    meta = {METADATA_KEY: json.dumps(record, default=str, sort_keys=True)}
    with atomic_path(path) as tmp:
        _save_file(contiguous, tmp, Path(path), meta)


def _save_file(tensors: dict[str, torch.Tensor], tmp: Path, path: Path, meta: dict) -> None:
    """safetensors' save_file, with its I/O failures as what they are: a full disk raises
    SafetensorError, which is not an OSError, so without this the user saw a traceback."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(tmp), metadata=meta)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)|code: (\d+)", str(err))
        if code:  # the CLI turns an OSError into one line with advice for its errno
            number = int(code.group(1) or code.group(2))
            raise OSError(number, os.strerror(number), str(path)) from err
        raise TintError(f"{path}: could not write the tensor file ({err}); check the disk "
                        "and run the same command again to resume") from err


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Load a safetensors file and the metadata saved by `save_tensors` (never unpickles).

    A truncated file or one whose tensors no longer match their checksum raises
    `DamagedFileError` (a TintError naming the file), never a raw library error.
    """
    path = Path(path)
    if not path.is_file():
        raise TintError(f"{path}: file not found")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
        tensors = load_file(str(path))
        meta, checksum = read_metadata(raw)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DamagedFileError(path, f"damaged or truncated tensor file ({err})") from err
    if checksum is not None and tensors_sha256(tensors) != checksum:
        raise DamagedFileError(path, "its tensors no longer match their checksum (the file was "
                               "changed or damaged)")
    return tensors, meta


def read_metadata(raw: dict[str, str]) -> tuple[dict | None, str | None]:
    """(metadata, checksum) of a file written now (one key) or before tint/v2 (two keys)."""
    if METADATA_KEY in raw:
        record = json.loads(raw[METADATA_KEY])
        return record.get("metadata"), record.get("sha256")
    return (json.loads(raw["tint"]) if "tint" in raw else None), raw.get(CHECKSUM_KEY)


@contextmanager
def folder_lock(folder: str | Path, on_wait: Any = None, name: str = ".lock",
                on_busy: Any = None, holder: dict | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (the file `name` in it) across processes.

    Two runs that share an artifact store (two `tint experiment` processes) must not
    compute the same artifact at once: the second waits here, then finds it done. The
    OS drops the lock when the holder dies, so a killed run never leaves it stuck.
    `on_busy(holder)` is called before waiting for a busy lock (it may raise instead) with
    what the holder wrote in the lock file (`lock_holder`), and `on_wait(seconds)` after.
    The holder writes its pid and `holder` (JSON) into the lock file once it has the lock,
    so that a process waiting for it can say who it waits for. Without fcntl (Windows) it
    is a no-op: one process per store there.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_busy is not None:
                on_busy(lock_holder(folder / name))
            start = perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            if on_wait is not None:
                on_wait(perf_counter() - start)
        _write_holder(handle, holder)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_holder(handle: Any, holder: dict | None) -> None:
    """Record who holds the lock (pid, and what it is doing) in the lock file itself."""
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), **(holder or {})}).encode())
        handle.flush()
    except OSError:  # a read-only or full store: the lock still works without the record
        pass


def lock_holder(path: str | Path) -> dict:
    """What the holder of the lock file `path` wrote: at least its pid when known ({} if not)."""
    try:
        record = json.loads(Path(path).read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def set_threads(n: int | None) -> None:
    """Pin torch's intra-op threads (tests use 1: two busy 2-thread processes thrash)."""
    if n:
        torch.set_num_threads(n)
