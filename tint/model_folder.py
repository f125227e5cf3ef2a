"""The model folder of `tint fit` (``--out``), treated as an artifact like any other.

`tint fit` writes into a folder the user names, which may already hold the user's own
files. Three rules keep it from destroying or mixing anything (docs/reliability.md,
"The model folder"):

- **Only a tint model folder is written to.** A non-empty ``--out`` must be one that
  `tint fit` made (it holds `RECORD`, or an older fit's labels.json/work); otherwise the
  fit is refused before any work, naming the files found there.
- **A file tint did not write is never overwritten.** `RECORD` lists the SHA-256 of every
  output file fit wrote (`output_file` records it before the file is renamed into place); an output file (report.html, MODEL_CARD.md, ...) that is not
  listed with its current content was put there or edited by the user, and the fit is
  refused naming it, instead of replacing it without a word.
- **One fit per folder.** A fit holds an exclusive lock (`LOCK`, tint.io.folder_lock)
  on the folder for its whole length. The lock file records what the holder fits: the
  data's content hash and a hash of its settings. A second fit of the same data and
  settings waits (saying so once, with the holder's pid) and then finds everything done;
  a fit of other data or settings is refused at once, since the two would leave a folder
  whose model, labels and card come from different fits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tint.errors import TintError
from tint.io import atomic_path, folder_lock, write_json
from tint.predict import LABELS_FILE, LABELS_FORMAT, file_sha256

LOGGER = logging.getLogger("tint")
LOCK = ".tint-fit.lock"
RECORD = ".tint-fit.json"
RECORD_FORMAT = "tint-fit/1"
# Files and folders `tint fit` writes at the top of the model folder.
OUTPUT_FILES = ("model.onnx", "model.pt", LABELS_FILE, "MODEL_CARD.md", "report.html")
OUTPUT_FOLDERS = ("report", "work")
MAX_LISTED = 5


@contextmanager
def claim_model_folder(out: Path, identity: dict) -> Iterator[Path]:
    """Check `out` (a tint model folder or empty) and hold its lock for the `with` block.

    `identity` says what this fit computes (data content hash, settings hash); a fit
    holding the folder with another identity makes this one fail at once, one with the
    same identity makes it wait."""
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)

    def busy(holder: dict) -> None:
        pid = f" (pid {holder['pid']})" if holder.get("pid") else ""
        if holder.get("identity") not in (None, identity):
            raise TintError(f"--out {out}: in use by another tint fit{pid} of different data or "
                            "settings; the two would mix their models in one folder: wait for it "
                            "to finish or choose another --out")
        LOGGER.warning("--out %s is in use by another tint fit%s of the same data and settings: "
                       "waiting for it to finish (then this one resumes from its results)", out, pid)

    with folder_lock(out, name=LOCK, on_busy=busy, holder={"identity": identity}):
        check_out_folder(out)  # again, under the lock: the other fit may have changed it
        record_outputs(out)  # what is there now is tint's (checked): a kill keeps it claimed
        yield out


def check_out_folder(out: Path) -> None:
    """Refuse an --out that is a file, a non-empty folder tint did not make, or a tint
    folder holding output files tint did not write (the user's own report.html, ...)."""
    if out.exists() and not out.is_dir():
        raise TintError(f"--out {out}: is a file, not a folder; give a new or empty folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not [name for name in entries if name != LOCK]:
        return
    if not is_model_folder(out):
        raise TintError(f"--out {out}: is not empty and not a tint model folder (it holds "
                        f"{_listing(entries)}); tint fit would overwrite files there: choose a new "
                        "or empty folder for --out")
    foreign = foreign_outputs(out)
    if foreign:
        raise TintError(f"--out {out}: {_listing(foreign)} was not written by tint fit, or was "
                        "changed since; tint fit never overwrites your files: move it elsewhere "
                        "(or delete it), or choose another --out")


def is_model_folder(out: Path) -> bool:
    """Made by `tint fit`: it holds the record, or (an older tint's fit) a tint labels.json,
    or only fit's names with fit's work folder."""
    if (out / RECORD).is_file():
        return True
    try:
        labels = json.loads((out / LABELS_FILE).read_text())
        if isinstance(labels, dict) and labels.get("format") == LABELS_FORMAT:
            return True
    except (OSError, ValueError):
        pass
    names = {p.name for p in out.iterdir()} - {LOCK}
    known = set(OUTPUT_FILES) | set(OUTPUT_FOLDERS)
    return names <= known and any((out / "work" / name).is_file() for name in ("config.yaml", "log.txt"))


def foreign_outputs(out: Path) -> list[str]:
    """Output files present in `out` that the record does not list with their content.
    A folder without a record (an older tint's fit) is taken as tint's own."""
    recorded = read_record(out)
    if recorded is None:
        return []
    return [name for name in OUTPUT_FILES
            if (out / name).is_file() and file_sha256(out / name) not in recorded.get(name, [])]


def read_record(out: Path) -> dict[str, list[str]] | None:
    """{file name: [SHA-256, ...]} of the output files fit wrote; None without a record."""
    try:
        record = json.loads((out / RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: nothing is vouched for
    files = record.get("files") if isinstance(record, dict) else None
    return files if isinstance(files, dict) else {}


def record_outputs(out: Path) -> None:
    """Record the SHA-256 of the output files now in `out` (at the claim, after they were
    checked as tint's)."""
    files = {name: [file_sha256(out / name)] for name in OUTPUT_FILES if (out / name).is_file()}
    write_json(out / RECORD, {"format": RECORD_FORMAT, "files": files})


@contextmanager
def output_file(out: Path, name: str) -> Iterator[Path]:
    """Write the output file `out/name` through a temporary path. The record vouches for the
    new content before it is renamed into place and forgets the old content after, so a
    fit killed at any moment leaves no file of its own that the next fit would take for
    the user's."""
    with atomic_path(out / name) as tmp:
        yield tmp
        _vouch(out, name, file_sha256(tmp), keep_old=True)
    _vouch(out, name, file_sha256(out / name), keep_old=False)


def _vouch(out: Path, name: str, digest: str, keep_old: bool) -> None:
    files = read_record(out) or {}
    files[name] = ([*files.get(name, []), digest] if keep_old else [digest])
    write_json(out / RECORD, {"format": RECORD_FORMAT, "files": files})


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")
