"""One run directory: one run at a time, and results from one config only.

Everything `tint run` writes at the top of a run directory (results.json, report.html,
results/, episodes/, export/) is derived from the resolved config saved beside it as
``config.yaml``. Two runs with different settings sharing one run dir would leave a
config.yaml that contradicts results.json, so a run first *claims* its run dir:

- it holds an exclusive lock (``.run.lock``, fcntl) for the length of the run; the OS
  drops it when the holder dies, so a killed run never leaves the dir stuck. A second
  run with the same settings waits for the first and then resumes (every stage done);
  one with different settings is refused at once;
- it compares the saved config.yaml with the new resolved config, ignoring the keys
  that only say where and how the run executes (`EXECUTION_KEYS`, none of which enters
  an artifact key), and refuses a difference unless the caller allows it
  (``tint run --allow-config-change``); then the old config's derived outputs
  (`DERIVED_OUTPUTS`, e.g. stale ``export/epNNN`` folders) are removed first. The
  keyed artifacts under ``artifacts/`` are kept: their folder names are hashes of
  everything they depend on, so they are never stale and the new run reuses them.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tint.errors import TintError
from tint.io import folder_lock, write_text

LOGGER = logging.getLogger("tint")
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".run.lock"
ALLOW_FLAG = "--allow-config-change"
# Where and how a run executes, not what it computes: a resume may change them.
EXECUTION_KEYS = ("run_dir", "threads", "device", "precision", "executor")
# Written at the top of a run dir from one config; removed when the config changes.
DERIVED_OUTPUTS = ("results.json", "results", "report.html", "report", "episodes", "export")
MAX_LISTED = 4


@contextmanager
def claim_run_dir(run_dir: str | Path, resolved_config_text: str, allow_change: bool = False,
                  on_wait: Callable[[float], Any] | None = None) -> Iterator[Path]:
    """Lock `run_dir` for the length of the `with` block and save the config in it.

    Refuses (TintError) a path that is a file, a run dir in use by a run with other
    settings, and a run dir whose saved config differs (unless `allow_change`).
    """
    run_dir = Path(run_dir)
    make_run_dir(run_dir)
    with _run_lock(run_dir, resolved_config_text, on_wait):
        differences = config_differences(run_dir, resolved_config_text)
        if differences and not allow_change:
            raise TintError(
                f"{run_dir}: holds the results of a different config ({CONFIG_FILE} differs in "
                f"{_listing(differences)}); use another --run-dir, or pass {ALLOW_FLAG} to "
                "replace its results (finished artifacts are kept and reused)"
            )
        if differences:
            clear_derived_outputs(run_dir)
        write_text(run_dir / CONFIG_FILE, resolved_config_text)
        yield run_dir


def make_run_dir(run_dir: Path) -> None:
    """Create the run dir, naming the path when it (or a parent) is a file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TintError(f"run dir {run_dir}: is an existing file, not a folder; give a folder "
                        "(--run-dir or run_dir in the config)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocking = next((p for p in run_dir.parents if p.exists() and not p.is_dir()), None)
        raise TintError(f"run dir {run_dir}: {blocking or err.filename} is a file, not a "
                        "folder; choose another --run-dir") from err


def _run_lock(run_dir: Path, config_text: str, on_wait: Callable[[float], Any] | None):
    def busy(holder: dict) -> None:
        _refuse_if_other_settings(run_dir, config_text)
        # A warning, not info: the command line shows warnings before the run's log is set up,
        # and a wait of minutes without a word looks like a hang.
        LOGGER.warning("run dir %s is in use by %s with the same settings: waiting for it to "
                       "finish (then this run resumes from its results)", run_dir, holder_words(holder))

    return folder_lock(run_dir, on_wait=on_wait, name=LOCK_FILE, on_busy=busy)


def holder_words(holder: dict) -> str:
    """'another tint process (pid 1234)', or without the pid when the lock file has none."""
    pid = holder.get("pid")
    return f"another tint process (pid {pid})" if pid else "another tint process"


def _refuse_if_other_settings(run_dir: Path, config_text: str) -> None:
    """A busy run dir: waiting only makes sense for a run with the same settings."""
    differences = config_differences(run_dir, config_text)
    if differences:
        raise TintError(
            f"{run_dir}: in use by another tint run with different settings ({CONFIG_FILE} "
            f"differs in {_listing(differences)}); wait for it to finish or use another --run-dir"
        )


# ----------------------------------------------------------------------------- config


def config_differences(run_dir: Path, new_text: str) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every result-relevant key that differs.

    The saved config is re-resolved by this tint first, so defaults added since it was
    written do not count as differences. No saved config: no difference.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return []
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        saved = None
    if not isinstance(saved, dict):
        return [(CONFIG_FILE, "unreadable", "a tint config")]
    new = yaml.safe_load(new_text)
    old, new = _flatten(_resolved(saved)), _flatten(_resolved(new))
    keys = sorted(set(old) | set(new), key=_key_order(list(new)))
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in keys
            if old.get(k, "<absent>") != new.get(k, "<absent>")
            and k.split(".", 1)[0] not in EXECUTION_KEYS]


def _resolved(data: dict) -> dict:
    """`data` with every default filled in by this tint (as saved when it can be read)."""
    from tint.config import config_from_dict, config_to_dict

    try:
        return config_to_dict(config_from_dict(data))
    except TintError:
        return data


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        out = {f"{prefix}count": len(node)}  # students: a list of mappings
        for i, value in enumerate(node):
            out |= _flatten(value, f"{prefix}{i}.")
        return out
    return {prefix.rstrip("."): node}


def _key_order(new_keys: list[str]) -> Callable[[str], tuple[int, str]]:
    """Keys in the order the config lists them; keys only the saved config has last."""
    position = {k: i for i, k in enumerate(new_keys)}
    return lambda k: (position.get(k, len(position)), k)


def _listing(differences: list[tuple[str, Any, Any]]) -> str:
    shown = [f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:MAX_LISTED]]
    more = len(differences) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


# ----------------------------------------------------------------------------- outputs


def clear_derived_outputs(run_dir: Path) -> list[str]:
    """Remove what the previous config wrote at the top of the run dir; keep artifacts/."""
    removed = []
    for name in DERIVED_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        LOGGER.info("config changed: removed the old results in %s (%s)", run_dir, ", ".join(removed))
    return removed
