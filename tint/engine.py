"""The stage engine: content-keyed, verified, locked, seeded units of work.

Every stage of `tint run`, `tint experiment` and `tint fit` (and a Ray worker running one
unit) goes through `run_stage`::

    folder/done.json says "finished for this key" and every file it lists still has
    its SHA-256?  -> return the marker (skip)
    else: lock the folder (other processes sharing the store wait), look again,
          drop files that fail their hash, seed from (run seed, stage, key), run the
          work, hash what it wrote, write done.json atomically.

So a changed setting never reuses a stale artifact (the key differs), a killed process
redoes at most the stage it was in, a flipped bit or a truncated file in a finished
artifact is recomputed instead of trusted (one log line says why), and skipping finished
stages on a resume cannot change the random numbers the remaining ones draw.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tint.errors import TintError
from tint.io import folder_lock, read_json, write_json

DONE = "done.json"
LOGGER = logging.getLogger("tint")


class NonFiniteError(TintError):
    """A loss or output became NaN/inf; the message names the stage."""


class StageContext(Protocol):
    """What the engine needs from a run: its seed, test hooks and the markers it used."""

    seed: int
    hooks: dict[str, Callable[..., None]]
    markers: dict[str, dict]
    run_dir: Path


@dataclass
class StoreContext:
    """A StageContext for stages outside a run (e.g. the FID cache of `tint experiment`)."""

    run_dir: Path
    seed: int = 0
    hooks: dict[str, Callable[..., None]] = field(default_factory=dict)
    markers: dict[str, dict] = field(default_factory=dict)


# ----------------------------------------------------------------------------- keys and seeds


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def stable_hash(obj: Any, length: int = 12) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def stage_seed(run_seed: int, stage: str, key: Any) -> int:
    """The seed a stage starts from: independent of which other stages ran before."""
    return int(stable_hash([run_seed, stage, key], 15), 16)


# ----------------------------------------------------------------------------- file hashes


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx")
_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def cached_file_sha256(path: Path) -> str:
    """file_sha256, remembered per (path, inode, size, mtime) for the life of the process:
    a Stable Diffusion folder (~5 GB) is hashed once per process, in seconds."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        _FILE_DIGESTS[memo] = file_sha256(path)
    return _FILE_DIGESTS[memo]


def weights_fingerprint(folder: Path) -> str:
    """The identity of a local model folder by content (its JSON configs and the bytes of
    its weight files), independent of where it lies: re-trained weights of the same shape
    and size get a new key, a copied folder keeps its key."""
    parts = []
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.suffix == ".json":
            parts.append((name, path.read_text()))
        elif path.suffix in WEIGHT_SUFFIXES:
            parts.append((name, cached_file_sha256(path)))
    return stable_hash(parts)


def stage_files(folder: Path) -> list[Path]:
    """The files a stage owns: everything in its folder but the marker, locks and temp
    files, not descending into sub-folders that are stages of their own."""
    owned = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith(".") or path.name == DONE:
            continue
        if path.is_dir():
            if not (path / DONE).exists():
                owned += stage_files(path)
        elif path.is_file():
            owned.append(path)
    return owned


def hash_files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in stage_files(folder)}


def damaged_files(folder: Path, recorded: dict[str, str]) -> list[str]:
    """Files the marker lists that are missing or no longer have their recorded hash."""
    damaged = []
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            damaged.append(name)
    return damaged


# ----------------------------------------------------------------------------- the engine


def environment() -> dict[str, Any]:
    """What computed an artifact, beyond its key: library versions, CPU and threads.

    A key fixes an artifact only within one environment: float-level differences between
    installs (image decoding, kernels) grow over hundreds of SGD steps, so the same key can
    give another student elsewhere. Each marker records this to make such a difference visible.
    """
    return {**installed_environment(), "torch_threads": torch.get_num_threads()}


@functools.cache
def installed_environment() -> dict[str, Any]:
    """The part of `environment` that cannot change within a process (looked up once)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("torch", "numpy", "pillow", "diffusers", "onnxruntime"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"python": platform.python_version(), **packages, "machine": platform.machine(),
            "cpu": cpu_model()}


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo; else what platform knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or None


def run_stage(ctx: StageContext, stage: str, folder: Path, key: Any, label: str,
              work: Callable[[Path], dict | None],
              is_done: Callable[[dict], bool] | None = None) -> dict:
    """Run `work(folder)` unless `folder/done.json` says it is complete for `key`.

    Returns the marker: the key, the seconds the work took, the SHA-256 of every file the stage wrote, and whatever `work`
    returned.
    """
    marker = finished_marker(ctx, stage, folder, key, label, is_done)
    if marker is not None:
        return marker
    # Another process sharing the store may be computing this very artifact: wait for
    # it, then look again (it is usually done by then).
    with folder_lock(folder, on_wait=lambda s: LOGGER.info(
            "%-12s %s: waited %.0f s for another process", stage, label, s)):
        marker = finished_marker(ctx, stage, folder, key, label, is_done, repair=True)
        if marker is not None:
            return marker
        return _compute_stage(ctx, stage, folder, key, label, work)


def read_marker(folder: Path) -> dict | None:
    """The marker in `folder`, or None when there is none or it is unreadable."""
    path = folder / DONE
    if not path.is_file():
        return None
    try:
        marker = read_json(path)
    except TintError:
        return None
    return marker if isinstance(marker, dict) else None


def finished_marker(ctx: StageContext, stage: str, folder: Path, key: Any, label: str,
                    is_done: Callable[[dict], bool] | None = None,
                    repair: bool = False) -> dict | None:
    """The marker if the stage is finished for `key` and its files are intact.

    With `repair` (only under the folder lock), damaged files are deleted so that the
    stage's own resume logic (manifest, checkpoints) redoes exactly what they held.
    """
    marker_path = folder / DONE
    if str(marker_path) in ctx.markers and ctx.markers[str(marker_path)].get("key") == jsonable(key):
        return ctx.markers[str(marker_path)]  # verified earlier in this process
    marker = read_marker(folder)
    if marker is None or marker.get("key") != jsonable(key):
        return None
    if is_done is not None and not is_done(marker):
        return None
    damaged = damaged_files(folder, marker.get("files", {}))
    if damaged:
        if repair:  # said once, by the process that will recompute it
            LOGGER.warning("%-12s %s: %s changed or missing since it was written (%s); recomputing",
                           stage, label, damaged[0], f"{len(damaged)} file(s)")
            for name in damaged:
                (folder / name).unlink(missing_ok=True)
            marker_path.unlink(missing_ok=True)
        return None
    LOGGER.info("%-12s %s: done, skipped", stage, label)
    ctx.markers[str(marker_path)] = marker
    return marker


def _compute_stage(ctx: StageContext, stage: str, folder: Path, key: Any, label: str,
                   work: Callable[[Path], dict | None]) -> dict:
    marker_path = folder / DONE
    LOGGER.info("%-12s %s: running", stage, label)
    seed_everything(stage_seed(ctx.seed, stage, key))
    if "*" in ctx.hooks:  # called for every stage that is computed (not skipped)
        ctx.hooks["*"](stage, label)
    if stage in ctx.hooks:
        ctx.hooks[stage](label)
    start = time.perf_counter()
    try:
        info = work(folder) or {}
    except NonFiniteError:
        raise
    except (TintError, FloatingPointError, ValueError, RuntimeError) as err:
        if _mentions_nan(str(err)):
            raise _nan_error(stage, label, ctx, str(err)) from err
        raise
    seconds = time.perf_counter() - start
    marker = {"stage": stage, "label": label, "key": jsonable(key), "seconds": seconds,
              "finished": datetime.now(UTC).isoformat(timespec="seconds"),
              "environment": environment(), **info, "files": hash_files(folder)}
    write_json(marker_path, marker)
    ctx.markers[str(marker_path)] = marker
    LOGGER.info("%-12s %s: finished in %.1f s", stage, label, seconds)
    return marker


def _mentions_nan(text: str) -> bool:
    return re.search(r"\bnan\b|\binf\b|infinity|non-finite|not finite", text.lower()) is not None


def _nan_error(stage: str, label: str, ctx: StageContext, detail: str) -> NonFiniteError:
    return NonFiniteError(
        f"stage {stage} ({label}) stopped: a loss or output became NaN/inf ({detail}). "
        f"Finished artifacts are kept in {ctx.run_dir}; lower the learning rate of this stage "
        "(e.g. --set distill.lr=...) and run the same command again to resume."
    )


def check_finite(stage: str, label: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise NonFiniteError(
            f"stage {stage} ({label}) stopped: {name} contains NaN/inf. Finished artifacts are "
            "kept; fix the setting named above and run the same command again to resume."
        )
