"""Run a unit graph on a Ray cluster: the driver is the only scheduler.

The driver walks the graph in plan (episode) order. A unit becomes *ready* when every unit it
needs is done; the driver then asks whether its artifact already exists (a finished unit is
skipped without submitting anything) and otherwise submits it, keeping at most
``max_in_flight`` units in flight with ``ray.wait``. Workers return only a small marker: the
data stays on the shared filesystem, never in Ray's object store.

The first half of this module is the generic loop (`Task`, `drive`), also used by
benchmarks/ray_scaling.py with stand-in units; the second half adapts tint's units to it.
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------------------- the generic loop


@dataclass(frozen=True)
class Task:
    """One unit of work as the driver sees it: what it needs and what it asks of a node."""

    id: str
    stage: str
    needs: tuple[str, ...]
    resources: dict[str, float]  # Ray options: num_cpus, num_gpus
    payload: Any  # the last argument of the remote function


@dataclass
class DriveReport:
    """What happened: finished and skipped units, failures and what they blocked."""

    results: dict[str, Any] = field(default_factory=dict)  # id -> what the worker returned
    skipped: list[str] = field(default_factory=list)  # done before this run: not submitted
    failed: dict[str, str] = field(default_factory=dict)  # id -> error message
    blocked: list[str] = field(default_factory=list)  # not run: a unit they need failed
    submitted: int = 0
    seconds: float = 0.0


class Graph:
    """Dependency bookkeeping: which units are ready, in plan order."""

    def __init__(self, tasks: list[Task]):
        self.tasks = {t.id: t for t in tasks}
        if len(self.tasks) != len(tasks):
            raise ValueError("task ids must be unique")
        self.order = {t.id: i for i, t in enumerate(tasks)}
        self.waiting_on = {t.id: len(set(t.needs)) for t in tasks}
        self.dependents: dict[str, list[str]] = defaultdict(list)
        for t in tasks:
            for need in set(t.needs):
                if need not in self.tasks:
                    raise ValueError(f"{t.id} needs {need}, which is not in the graph")
                self.dependents[need].append(t.id)
        self.ready: list[tuple[int, str]] = [(self.order[t.id], t.id) for t in tasks if not t.needs]
        heapq.heapify(self.ready)

    def complete(self, task_id: str) -> None:
        for dep in self.dependents[task_id]:
            self.waiting_on[dep] -= 1
            if self.waiting_on[dep] == 0:
                heapq.heappush(self.ready, (self.order[dep], dep))

    def pop_ready(self) -> str | None:
        return heapq.heappop(self.ready)[1] if self.ready else None

    def downstream(self, task_id: str) -> list[str]:
        """Every unit that needs `task_id`, directly or not."""
        seen: set[str] = set()
        stack = list(self.dependents[task_id])
        while stack:
            dep = stack.pop()
            if dep not in seen:
                seen.add(dep)
                stack.extend(self.dependents[dep])
        return sorted(seen, key=self.order.__getitem__)


class _Progress:
    """A line per finished unit and a status line with an ETA per stage every `every` s."""

    def __init__(self, tasks: list[Task], every: float, log: Callable[[str], None]):
        self.total = defaultdict(int)
        for t in tasks:
            self.total[t.stage] += 1
        self.done: dict[str, int] = defaultdict(int)
        self.ran: dict[str, int] = defaultdict(int)
        self.first_submit: dict[str, float] = {}
        self.every, self.log = every, log
        self.next_status = time.monotonic() + every

    def submitted(self, stage: str) -> None:
        self.first_submit.setdefault(stage, time.monotonic())

    def skipped(self, stage: str) -> None:
        self.done[stage] += 1

    def finished(self, task: Task, result: Any, quiet: bool) -> None:
        self.done[task.stage] += 1
        self.ran[task.stage] += 1
        if not quiet and isinstance(result, dict):
            where = result.get("node", "?")
            gpu = f" gpu {result['gpu']}" if result.get("gpu") is not None else ""
            self.log(f"done {task.id} on {where}{gpu} in {result.get('seconds', 0.0):.1f} s")

    def maybe_status(self, in_flight: int) -> None:
        now = time.monotonic()
        if now >= self.next_status:
            self.next_status = now + self.every
            self.log(self.status_line(in_flight))

    def status_line(self, in_flight: int) -> str:
        parts = []
        for stage, total in self.total.items():
            parts.append(f"{stage} {self.done[stage]}/{total}{self._eta(stage, total)}")
        done = sum(self.done.values())
        return f"status: {done}/{sum(self.total.values())} done, {in_flight} running; " + ", ".join(parts)

    def _eta(self, stage: str, total: int) -> str:
        left = total - self.done[stage]
        if left == 0 or not self.ran[stage]:
            return ""
        rate = self.ran[stage] / max(time.monotonic() - self.first_submit[stage], 1e-9)
        return f" (ETA {_duration(left / rate)})"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def drive(tasks: list[Task], remote: Any, shared_args: tuple = (), *,
          is_done: Callable[[Task], bool] = lambda task: False, max_in_flight: int = 64,
          max_retries: int = 3, keep_going: bool = False,
          on_finish: Callable[[Task, Any], None] | None = None, status_every: float = 30.0,
          log: Callable[[str], None] = print, quiet: bool = False,
          on_submit: Callable[[Task], None] | None = None) -> DriveReport:
    """Run `tasks` (in plan order) through the Ray remote function `remote`.

    `remote(*shared_args, task.payload)` runs on a worker. A task is submitted only when all
    it needs are done, and only if `is_done(task)` says its result does not exist yet. An
    exception raised by a unit is not retried (a dead worker is, `max_retries` times): it
    fails that unit and blocks everything downstream; without `keep_going` nothing new is
    submitted after it, but the units in flight still finish and keep their results.
    """
    import ray

    start = time.monotonic()
    graph, report = Graph(tasks), DriveReport()
    progress = _Progress(tasks, status_every, log)
    in_flight: dict[Any, tuple[Task, float]] = {}
    stopped = False

    def fill() -> None:
        while not stopped and len(in_flight) < max_in_flight:
            task_id = graph.pop_ready()
            if task_id is None:
                return
            task = graph.tasks[task_id]
            if is_done(task):
                report.skipped.append(task.id)
                progress.skipped(task.stage)
                graph.complete(task.id)
                continue
            options = dict(task.resources, max_retries=max_retries, retry_exceptions=False)
            ref = remote.options(**options).remote(*shared_args, task.payload)
            in_flight[ref] = (task, time.monotonic())
            report.submitted += 1
            progress.submitted(task.stage)
            if on_submit is not None:
                on_submit(task)

    fill()
    while in_flight:
        timeout = max(0.0, progress.next_status - time.monotonic())
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout)
        for ref in ready:
            task, _submitted_at = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # an application error or a worker that died for good
                report.failed[task.id] = _error_text(err)
                report.blocked.extend(graph.downstream(task.id))
                log(f"FAILED {task.id}: {report.failed[task.id]}")
                stopped = stopped or not keep_going
                continue
            report.results[task.id] = result
            progress.finished(task, result, quiet)
            if on_finish is not None:
                on_finish(task, result)
            graph.complete(task.id)
        progress.maybe_status(len(in_flight))
        fill()
    blocked = set(report.blocked)
    report.blocked = [t.id for t in tasks if t.id in blocked]
    report.seconds = time.monotonic() - start
    if len(report.results) + len(report.skipped) + len(report.failed) + len(blocked) < len(tasks):
        if not stopped:  # only a stop leaves units unvisited; anything else is a bug
            raise RuntimeError("scheduler ended with units neither run, skipped nor blocked")
    return report


def _error_text(err: BaseException) -> str:
    """The user's exception, not Ray's wrapper around it."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0] if first else ''}"


def gpu_and_cpu_slots(resources: Iterable[dict[str, float]]) -> dict[str, float]:
    """The largest request per resource kind (to compare with what the cluster has)."""
    largest: dict[str, float] = defaultdict(float)
    for request in resources:
        for kind, amount in request.items():
            largest[kind] = max(largest[kind], amount)
    return dict(largest)
