"""What the integrity check costs: hashing every artifact a run wrote (issue 15, item 1).

The stage engine records the SHA-256 of every file a stage writes (once, when the stage
finishes) and checks them when a later stage or a resume reads the stage (once per
process). This measures both on a finished run dir against the seconds its stages took::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_hashing.py runs/demo

It prints one JSON object: files, bytes, seconds to hash them all (median of --repeats),
the sum of the stages' own seconds, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from tint.engine import DONE, damaged_files, hash_files


def stage_folders(run_dir: Path) -> list[Path]:
    return sorted(p.parent for p in run_dir.rglob(DONE))


def measure(run_dir: Path, repeats: int) -> dict:
    folders = stage_folders(run_dir)
    markers = [json.loads((f / DONE).read_text()) for f in folders]
    files = sum(len(m.get("files", {})) for m in markers)
    size = sum((f / name).stat().st_size for f, m in zip(folders, markers, strict=True)
               for name in m.get("files", {}) if (f / name).is_file())
    write_times, verify_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for folder in folders:
            hash_files(folder)
        write_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        damaged = [damaged_files(f, m.get("files", {})) for f, m in zip(folders, markers, strict=True)]
        verify_times.append(time.perf_counter() - start)
    stage_seconds = sum(float(m.get("seconds", 0.0)) for m in markers)
    hashing = statistics.median(write_times)
    return {"run_dir": str(run_dir), "stages": len(folders), "files": files, "bytes": size,
            "hash_seconds": round(hashing, 3), "verify_seconds": round(statistics.median(verify_times), 3),
            "damaged": sum(len(d) for d in damaged), "stage_seconds": round(stage_seconds, 1),
            "hash_over_stages": round(hashing / stage_seconds, 5) if stage_seconds else None,
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 thread"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run dir (its artifacts/ store inside)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.run_dir, args.repeats), indent=2))


if __name__ == "__main__":
    main()
