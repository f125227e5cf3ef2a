"""How well tint's Ray driver scales: the real scheduler loop on stand-in units.

The driver loop of tint/executors/ray_executor.py (`drive`: plan order, bounded in flight,
ray.wait) runs the unit graph of the paper's protocol (per episode: 5 specialise, 5 generate,
1 pseudo-label, 2 distil, 1 evaluate, 2 export) on a local Ray cluster with W logical GPUs.
Each stand-in unit sleeps for its real duration times a scale factor, so 64 "GPUs" fit on two
cores. Real durations come from the paper's Table 6 (one A40, 1 s per image: TI 0.30 s + NTI
0.05 s per image -> specialise 1,400 s per class; generation 0.66 s per image -> 2,640 s per
class; distillation 0.82 h per student); pseudo-label (120 s), evaluate (30 s) and export (15 s)
are estimates. The episode count grows with W (weak scaling, 600 episodes = 9,600 units at
W=64), so every W has the same work per worker.

Reported per W: wall time; efficiency against perfect linear scaling (work / (W x wall));
the same policy simulated with zero overhead (what the graph's shape alone allows: the tail of
the last episodes); scheduler overhead per unit in worker-seconds ((wall - simulated) x W /
units) and the driver's own CPU time per unit.

Stand-ins reuse their worker process (`max_calls=0`); tint's real GPU units get a fresh worker
each (Ray's default for GPU tasks, so CUDA state never leaks between GPUs): that start-up
(imports and model loading, seconds) is part of a real unit's duration, paid on its own node.

    python benchmarks/ray_scaling.py                 # W = 1, 8, 64 (about 15 min here)
    python benchmarks/ray_scaling.py --workers 64 --target 120
    python benchmarks/ray_scaling.py --table         # wall-time table for docs/cluster.md
    python benchmarks/ray_scaling.py --tiny          # the real tiny pipeline, 1 vs 2 workers
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque

from tint.executors.ray_executor import Graph, Task, drive

CLASSES, STUDENTS = 5, 2
IMAGES_PER_CLASS = 4000


def real_durations(seconds_per_image: float = 1.0) -> dict[str, float]:
    """Seconds per unit on one GPU; specialise + generate scale with the paper's 1.01 s/image."""
    share = seconds_per_image / 1.01
    return {
        "specialize": 0.35 * IMAGES_PER_CLASS * share,
        "generate": 0.66 * IMAGES_PER_CLASS * share,
        "pseudo-label": 120.0,
        "distill": 0.82 * 3600,
        "evaluate": 30.0,
        "export": 15.0,
    }


def protocol_tasks(episodes: int, durations: dict[str, float]) -> list[Task]:
    """The unit graph of `episodes` episodes, in the local plan order (episode by episode)."""
    tasks: list[Task] = []
    gpu = {"num_gpus": 1.0, "num_cpus": 0.0}

    def add(stage: str, unit_id: str, needs: list[str]) -> str:
        tasks.append(Task(unit_id, stage, tuple(needs), gpu, durations[stage]))
        return unit_id

    for e in range(episodes):
        ep = f"ep{e:03d}"
        specs = [add("specialize", f"specialize/{ep}/c{c:02d}", []) for c in range(CLASSES)]
        gens = [add("generate", f"generate/{ep}/c{c:02d}", [s]) for c, s in enumerate(specs)]
        labels = add("pseudo-label", f"pseudo-label/{ep}", gens)
        students = [add("distill", f"distill/{ep}/s{s}", [labels]) for s in range(STUDENTS)]
        add("evaluate", f"evaluate/{ep}", students)
        for s, student in enumerate(students):
            add("export", f"export/{ep}/s{s}", [student])
    return tasks


def simulate(tasks: list[Task], slots: int, max_in_flight: int) -> float:
    """Wall time of the driver's policy with zero overhead: plan order, bounded in flight,
    and Ray's first-in first-out queue when more units are in flight than slots."""
    graph, clock = Graph(tasks), 0.0
    running: list[tuple[float, str]] = []
    queued: deque[str] = deque()
    in_flight = 0
    while True:
        while in_flight < max_in_flight and (task_id := graph.pop_ready()) is not None:
            queued.append(task_id)
            in_flight += 1
        while queued and len(running) < slots:
            task_id = queued.popleft()
            heapq.heappush(running, (clock + graph.tasks[task_id].payload, task_id))
        if not running:
            return clock
        clock, task_id = heapq.heappop(running)
        in_flight -= 1
        graph.complete(task_id)


def stand_in(seconds: float) -> dict:
    """A unit that holds its slot for `seconds` and returns a marker-sized answer."""
    start = time.perf_counter()
    time.sleep(seconds)
    return {"node": socket.gethostname(), "seconds": time.perf_counter() - start}


def warm_up(ray, remote, workers: int) -> None:
    """Start one worker process per slot before timing (this machine starts them slowly)."""
    @ray.remote(max_calls=0)
    def pid(seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()

    seen: set[int] = set()
    for _ in range(30):
        seen |= set(ray.get([pid.options(num_gpus=1, num_cpus=0).remote(1.0)
                             for _ in range(workers)]))
        if len(seen) >= workers:
            return


def measure(workers: int, target: float, in_flight_factor: float) -> dict:
    """Run the weak-scaled protocol on `workers` logical GPUs; compare with the simulation."""
    import ray

    episodes = max(1, round(600 * workers / 64))
    real = real_durations()
    per_worker = episodes * sum(n * real[s] for s, n in _UNITS_PER_EPISODE.items()) / workers
    scale = target / per_worker
    tasks = protocol_tasks(episodes, {s: d * scale for s, d in real.items()})
    max_in_flight = max(1, round(workers * in_flight_factor))
    ray.init(num_cpus=workers, num_gpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(max_calls=0)(stand_in)
        warm_up(ray, remote, workers)
        cpu0 = time.process_time()
        report = drive(tasks, remote, max_in_flight=max_in_flight, quiet=True,
                       status_every=3600, log=lambda line: None)
        driver_cpu = time.process_time() - cpu0
    finally:
        ray.shutdown()
    work = sum(t.payload for t in tasks)
    simulated = simulate(tasks, workers, max_in_flight)
    return {
        "workers": workers, "episodes": episodes, "units": len(tasks),
        "max_in_flight": max_in_flight, "scale": scale, "work_s": round(work, 1),
        "wall_s": round(report.seconds, 2), "simulated_s": round(simulated, 2),
        "efficiency": round(work / (workers * report.seconds), 4),
        "efficiency_simulated": round(work / (workers * simulated), 4),
        "overhead_per_unit_ms": round(1000 * (report.seconds - simulated) * workers / len(tasks), 2),
        "driver_cpu_per_unit_ms": round(1000 * driver_cpu / len(tasks), 3),
        "submitted": report.submitted, "failed": len(report.failed),
    }


_UNITS_PER_EPISODE = {"specialize": CLASSES, "generate": CLASSES, "pseudo-label": 1,
                      "distill": STUDENTS, "evaluate": 1, "export": STUDENTS}


def wall_time_table(efficiency: float, gpus: list[int], per_image: list[float]) -> list[dict]:
    """Hours for the paper's 600 episodes: the zero-overhead simulation divided by the
    measured efficiency ratio (measured / simulated) of the driver on stand-ins."""
    rows = []
    for g in gpus:
        row = {"gpus": g}
        for s in per_image:
            tasks = protocol_tasks(600, real_durations(s))
            row[f"{s} s/image"] = round(simulate(tasks, g, max(g, 1) * 2) / efficiency / 3600, 1)
        rows.append(row)
    return rows


def tiny_pipeline(workers_list: list[int]) -> list[dict]:
    """The real tiny pipeline (configs/tiny.yaml, 2 episodes, 28 units) run by the local
    executor and by `tint run --executor ray` on a local cluster of 1 or 2 CPU workers (every
    stage on CPU workers, one torch thread each); a fresh run dir each, wall time of the command."""
    rows = []
    for workers in [0, *workers_list]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "tint.cli", "run", "configs/tiny.yaml", "--run-dir", tmp,
                   "--set", "report.enabled=false"]
            if workers:
                cmd += ["--executor", "ray", "--set", "executor.cpus=1"]
                for stage in ("teacher", "specialize", "generate", "pseudo-label"):
                    cmd += ["--set", f"executor.gpus.{stage}=0"]
            env = dict(os.environ, TINT_RAY_NUM_CPUS=str(workers), OMP_NUM_THREADS="1")
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            rows.append({"executor": "ray" if workers else "local", "workers": workers or 1,
                         "wall_s": round(time.perf_counter() - start, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,8,64", help="logical GPU counts, comma-separated")
    parser.add_argument("--target", type=float, default=180.0,
                        help="seconds of stand-in work per worker (sets the scale factor)")
    parser.add_argument("--in-flight", type=float, default=1.0,
                        help="max_in_flight as a multiple of the workers")
    parser.add_argument("--table", type=float, default=None, metavar="EFFICIENCY_RATIO",
                        help="print the wall-time table given measured/simulated efficiency")
    parser.add_argument("--tiny", action="store_true", help="real tiny pipeline, 1 vs 2 workers")
    args = parser.parse_args()
    print(f"# {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}",
          flush=True)
    if args.table is not None:
        for row in wall_time_table(args.table, [1, 8, 64, 256, 1024, 3000], [1.0, 0.5, 0.2]):
            print(json.dumps(row))
        return
    if args.tiny:
        for row in tiny_pipeline([1, 2]):
            print(json.dumps(row), flush=True)
        return
    for workers in [int(w) for w in args.workers.split(",")]:
        print(json.dumps(measure(workers, args.target, args.in_flight)), flush=True)


if __name__ == "__main__":
    main()
