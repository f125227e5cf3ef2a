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
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tint.errors import TintError

LOGGER = logging.getLogger("tint")

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
    shared: dict[str, str] = field(default_factory=dict)  # id -> the unit that made its artifact
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
          on_submit: Callable[[Task], None] | None = None,
          share_key: Callable[[Task], str] | None = None) -> DriveReport:
    """Run `tasks` (in plan order) through the Ray remote function `remote`.

    `remote(*shared_args, task.payload)` runs on a worker. A task is submitted only when all
    it needs are done, and only if `is_done(task)` says its result does not exist yet. Ready
    tasks with the same `share_key` (the same artifact, e.g. one teacher for every cell of an
    experiment) run once: the others finish when that one does. An exception raised by a
    unit is not retried (a dead worker is, `max_retries` times): it fails that unit and blocks
    everything downstream; without `keep_going` nothing new is submitted after it, but the
    units in flight still finish and keep their results.
    """
    import ray

    start = time.monotonic()
    graph, report = Graph(tasks), DriveReport()
    progress = _Progress(tasks, status_every, log)
    in_flight: dict[Any, Task] = {}  # Ray object ref -> its task
    owner_of: dict[str, str] = {}  # share key -> the task computing it
    followers: dict[str, list[str]] = defaultdict(list)  # task -> tasks waiting on its artifact
    stopped = False

    def finish_followers(task: Task, failed: bool) -> None:
        for follower_id in followers.pop(task.id, []):
            follower = graph.tasks[follower_id]
            if failed:
                report.blocked.extend([follower_id, *graph.downstream(follower_id)])
                continue
            report.shared[follower_id] = task.id
            progress.skipped(follower.stage)
            graph.complete(follower_id)

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
            key = share_key(task) if share_key is not None else None
            if key is not None and key in owner_of:
                followers[owner_of[key]].append(task.id)
                continue
            if key is not None:
                owner_of[key] = task.id
            options = dict(task.resources, max_retries=max_retries, retry_exceptions=False)
            ref = remote.options(**options).remote(*shared_args, task.payload)
            in_flight[ref] = task
            report.submitted += 1
            progress.submitted(task.stage)
            if on_submit is not None:
                on_submit(task)

    fill()
    while in_flight:
        timeout = max(0.0, progress.next_status - time.monotonic())
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout)
        for ref in ready:
            task = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # an application error or a worker that died for good
                report.failed[task.id] = _error_text(err)
                report.blocked.extend(graph.downstream(task.id))
                log(f"FAILED {task.id}: {report.failed[task.id]}")
                finish_followers(task, failed=True)
                stopped = stopped or not keep_going
                continue
            report.results[task.id] = result
            progress.finished(task, result, quiet)
            if on_finish is not None:
                on_finish(task, result)
            graph.complete(task.id)
            finish_followers(task, failed=False)
        progress.maybe_status(len(in_flight))
        fill()
    blocked = set(report.blocked)
    report.blocked = [t.id for t in tasks if t.id in blocked]
    report.seconds = time.monotonic() - start
    accounted = len(report.results) + len(report.skipped) + len(report.shared) + len(report.failed)
    if accounted + len(blocked) < len(tasks):
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


# ----------------------------------------------------------------------------- tint's units on Ray

# Workers draw no progress bars (tqdm reads this when imported, before a task starts).
WORKER_ENV = {"TQDM_DISABLE": "1"}
FAULTS_ENV = "TINT_RAY_TEST_FAULTS"  # tests: a folder of one-shot fault files (see _test_fault)
LAST_REPORT: DriveReport | None = None  # the last run's DriveReport (tests count submissions)


@dataclass
class Cell:
    """One run's share of the graph: its context (absolute paths), episodes and units."""

    ctx: Any
    episodes: list
    units: list
    prefix: str = ""  # unit ids of `tint experiment` cells are "<cell>:<unit id>"


def run_units(ctx, episodes, units) -> None:
    """The `ray` executor of `tint run`: the run's units on a Ray cluster."""
    run_cells([Cell(ctx, episodes, units)])


def run_experiment_cells(configs: list, store: Path, hooks: dict | None = None) -> DriveReport:
    """`tint experiment --executor ray`: prepare every cell here, then run all cells' units
    as one graph, so an artifact several cells share (the teacher, a specialisation) is one
    task. The cells' reports are then made by the local executor, which finds every unit done."""
    from contextlib import ExitStack

    from tint.config import dump_config
    from tint.rundir import claim_run_dir
    from tint.stage_bodies import make_context, prepare
    from tint.stages import plan_units

    with ExitStack() as claimed:  # each cell's run dir, as its own `tint run` would claim it
        cells = []
        for config in configs:
            claimed.enter_context(claim_run_dir(config.run_dir, dump_config(config), True))
            ctx = make_context(config, store, hooks)
            episodes = prepare(ctx)
            cells.append(Cell(ctx, episodes, plan_units(ctx, episodes), prefix=f"{config.name}:"))
        return run_cells(cells)


def run_cells(cells: list[Cell]) -> DriveReport:
    """Run the units of one or many runs (sharing a store) as one graph on a Ray cluster
    (executor.address, RAY_ADDRESS, or one started on this machine). Units of different
    cells that make the same artifact run once."""
    global LAST_REPORT
    LAST_REPORT = None
    ray = _import_ray()
    given, cells = cells, [_absolute(cell) for cell in cells]
    executor = cells[0].ctx.config.executor
    for cell in cells:
        check_model_folders(cell.ctx.config)
    # Plan order: episode by episode, and within an episode cell by cell (an experiment's
    # cells then finish their first episodes together).
    planned = sorted(((-1 if u.episode is None else u.episode, i, n), i, u)
                     for i, cell in enumerate(cells) for n, u in enumerate(cell.units))
    for cell in cells:  # before connecting: a bad executor.gpus key fails at once
        check_gpu_stages(cell.ctx.config.executor)
    started_here = _connect(ray, executor.address)
    try:
        cluster_gpus = _cluster_gpus(ray)
        tasks = [Task(cells[i].prefix + u.id, u.stage, tuple(cells[i].prefix + n for n in u.needs),
                      stage_resources(cells[i].ctx.config.executor, u.stage,
                                      cells[i].ctx.config.device, cluster_gpus), (i, u))
                 for _order, i, u in planned]
        check_resources(ray, tasks)
        check_shared_store(ray, [cells[0].ctx.store, *{c.ctx.run_dir for c in cells}])
        _warn_if_few_in_flight(ray, executor.max_in_flight)
        submit_hook = cells[0].ctx.hooks.get("ray-submit")
        shared = (ray.put([(_config_dict(c.ctx), str(c.ctx.run_dir), c.episodes) for c in cells]),
                  str(cells[0].ctx.store))
        report = drive(
            tasks, ray.remote(runtime_env={"env_vars": WORKER_ENV})(_run_unit_on_worker), shared,
            is_done=lambda task: unit_done(cells[task.payload[0]], task.payload[1]),
            share_key=lambda task: artifact_folder(cells[task.payload[0]], task.payload[1]),
            max_in_flight=executor.max_in_flight, max_retries=executor.max_retries,
            keep_going=executor.keep_going, log=LOGGER.info,
            on_submit=(lambda task: submit_hook(task.id)) if submit_hook else None,
            on_finish=_on_finish(cells),
        )
    finally:
        if started_here:
            ray.shutdown()
        for before, after in zip(given, cells, strict=True):
            _rekey_markers(before.ctx, after.ctx)
    LAST_REPORT = report
    LOGGER.info("ray: %d unit(s) run, %d already done, %d shared, %d failed, in %.1f s",
                len(report.results), len(report.skipped), len(report.shared), len(report.failed),
                report.seconds)
    if report.failed:
        raise _failure(cells[0].ctx, report)
    return report


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise TintError("executor.name: ray needs the Ray extra: pip install 'tint-fewshot[ray]' "
                        "(or choose --executor local)") from err
    return ray


def _absolute(cell: Cell) -> Cell:
    """Workers start wherever `ray start` ran: every path they see must be absolute."""
    from dataclasses import replace

    # markers stay shared: the run's stage timings count the units the workers ran
    ctx = replace(cell.ctx, run_dir=cell.ctx.run_dir.resolve(), store=cell.ctx.store.resolve())
    ctx.config = replace(ctx.config, run_dir=str(ctx.run_dir))
    episodes = [replace(ep, folder=ep.folder.resolve()) for ep in cell.episodes]
    return Cell(ctx, episodes, cell.units, cell.prefix)


def _rekey_markers(given, absolute) -> None:
    """File the markers seen under absolute paths under the run's own paths, as the local
    executor would have (the report then neither re-verifies nor counts them twice)."""
    prefixes = [(str(absolute.store), str(given.store)), (str(absolute.run_dir), str(given.run_dir))]
    for key in list(given.markers):
        for old, new in prefixes:
            if key.startswith(old + "/") and old != new:
                given.markers[new + key[len(old):]] = given.markers.pop(key)
                break


def _config_dict(ctx) -> dict:
    from tint.config import config_to_dict

    return config_to_dict(ctx.config)


def _connect(ray, address: str | None) -> bool:
    """Join the cluster (or start one here); True if this call started it."""
    import os

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address)  # ray.init retries an address nobody answers at for ever
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address is None:  # the size of a cluster started here (default: what the machine has)
        for kind in ("cpus", "gpus"):
            if os.environ.get(f"TINT_RAY_NUM_{kind.upper()}"):
                kwargs[f"num_{kind}"] = int(os.environ[f"TINT_RAY_NUM_{kind.upper()}"])
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise TintError(f"executor.address {address!r}: cannot connect to a Ray cluster ({err}); "
                        "start one with `ray start --head` (docs/cluster.md) or leave it unset "
                        "for a cluster on this machine") from err
    LOGGER.info("ray: %s cluster with %s", "connected to a" if address else "started a local",
                _describe(ray.cluster_resources()))
    return True


CONNECT_TIMEOUT_ENV = "TINT_RAY_CONNECT_TIMEOUT"
CONNECT_TIMEOUT = 20.0  # seconds: a head node that is still starting gets this long


def check_reachable(address: str, timeout: float | None = None) -> None:
    """Something must accept a TCP connection at `address` (host:port, or ray://host:port)
    within `timeout` seconds (retried each second: a head node may be starting up).

    `ray.init(address=...)` retries an address where nothing answers for ever, printing only
    Ray's own log lines; this turns that into a clear error within about `timeout` seconds.
    Addresses without a port ("auto", "local") are left to Ray."""
    import os
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    if timeout is None:
        try:
            timeout = float(os.environ.get(CONNECT_TIMEOUT_ENV) or CONNECT_TIMEOUT)
        except ValueError as err:
            raise TintError(f"{CONNECT_TIMEOUT_ENV}={os.environ[CONNECT_TIMEOUT_ENV]!r}: expected "
                            "seconds, e.g. 20") from err
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as err:
            last = err
        if time.monotonic() + 1.0 > deadline:
            break
        time.sleep(1.0)
    reason = getattr(last, "strerror", None) or str(last) or type(last).__name__
    raise TintError(f"executor.address {address}: no Ray cluster answers there (nothing accepted "
                    f"a connection within {timeout:g} s: {reason}); start one with `ray start "
                    "--head` (docs/cluster.md), fix --ray-address/RAY_ADDRESS, or leave both unset "
                    "for a cluster on this machine")


def _cluster_gpus(ray) -> float:
    """GPUs of the largest node that is up (0: a cluster without GPUs)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return max((n.get("GPU", 0.0) for n in nodes), default=0.0)


def _describe(resources: dict[str, float]) -> str:
    return f"{resources.get('GPU', 0):g} GPU(s), {resources.get('CPU', 0):g} CPU(s)"


def stage_resources(executor, stage: str, device: str = "auto",
                    cluster_gpus: float | None = None) -> dict[str, float]:
    """What one unit of `stage` asks of a node: executor.cpus CPUs and its stage's GPUs.

    The GPU request follows the device the run resolves to: `device: cpu` asks for none, and
    so does `device: auto` on a cluster without GPUs (`cluster_gpus` 0), where it would run
    on the CPU anyway; Ray would otherwise wait for ever for a GPU no node has (or, before
    that, check_resources refuses it). An explicit `cuda` keeps its request, so a cluster
    without GPUs refuses it clearly."""
    check_gpu_stages(executor)
    gpus = float(executor.gpus.get(resource_name(stage), 0.0))
    if device == "cpu" or (device == "auto" and cluster_gpus == 0):
        gpus = 0.0
    return {"num_cpus": float(executor.cpus), "num_gpus": gpus}


# ----------------------------------------------------------------------------- fail fast


def check_gpu_stages(executor) -> None:
    """Every executor.gpus entry must name a stage of the table (as the engine knows it)."""
    from tint.stages import default_gpus

    unknown = sorted(set(executor.gpus) - set(default_gpus()))
    if unknown:
        raise TintError(f"executor.gpus.{unknown[0]}: unknown stage; choose from "
                        f"{', '.join(sorted(default_gpus()))}")


def resource_name(stage: str) -> str:
    """The executor.gpus entry a unit of `stage` asks by (the stage table's engine name)."""
    from tint.stages import STAGES

    return STAGES[stage].runs_as if stage in STAGES else stage


def check_resources(ray, tasks: list[Task]) -> None:
    """Ray waits forever for a request no node can meet: refuse it before submitting."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    seen: set[tuple[str, float, float]] = set()
    for task in tasks:
        cpus, gpus = task.resources["num_cpus"], task.resources["num_gpus"]
        if (task.stage, cpus, gpus) in seen:
            continue
        seen.add((task.stage, cpus, gpus))
        if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
            largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            option = f"executor.gpus.{resource_name(task.stage)}"
            no_gpu = ""
            if not any(n.get("GPU", 0) for n in nodes):  # only an explicit cuda device asks
                no_gpu = ("; this cluster has no GPUs: run with --device auto (or cpu), which asks "
                          "for none and runs every stage on CPU workers")
            raise TintError(
                f"{option}={gpus:g} (with executor.cpus={cpus:g}): a {task.stage} unit asks for "
                f"{gpus:g} GPU(s) and {cpus:g} CPU(s), but no node of the Ray cluster has that "
                f"(largest node: {_describe(largest)}); lower it or add a larger node{no_gpu}")


def check_shared_store(ray, folders: list[Path]) -> None:
    """Every node must see the driver's store and run dirs at the same paths (a shared
    filesystem): the driver writes a sentinel file in each, one tiny task per node reads them."""
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tint.io import write_text

    token = uuid.uuid4().hex
    sentinels = [Path(folder) / f".ray-sentinel-{token}" for folder in folders]
    for path in sentinels:
        write_text(path, token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(_read_sentinels)
        refs = {probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote([str(p) for p in sentinels], token): n for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=120)
        for ref in ready:
            missing = ray.get(ref)
            if missing:
                node = refs[ref].get("NodeManagerAddress")
                raise TintError(
                    f"store: node {node} does not see {missing[0]}, written by the driver; put "
                    "the run dir and store on a filesystem shared by every node at the same "
                    "path (NFS, EFS, Lustre; docs/cluster.md)")
        if pending:
            raise TintError(f"ray: {len(pending)} node(s) did not answer a file check within "
                            "120 s; check `ray status`")
    finally:
        for path in sentinels:
            path.unlink(missing_ok=True)


def _read_sentinels(paths: list[str], token: str) -> list[str]:
    """On a worker: the sentinel files it cannot read back (empty: all visible)."""
    missing = []
    for path in paths:
        try:
            if Path(path).read_text() != token:
                missing.append(path)
        except OSError:
            missing.append(path)
    return missing


def check_model_folders(config) -> None:
    """A model given as a folder must exist on the driver: its fingerprint is part of the
    keys, and a folder the driver cannot read would silently change every key."""
    specs = {"generator.backbone": config.generator.backbone,
             "teacher.backbone": config.teacher.backbone.removeprefix("vit:")}
    for option, spec in specs.items():
        if _looks_like_path(spec) and not Path(spec).expanduser().exists():
            raise TintError(f"{option}: {spec} does not exist on the driver; the driver "
                            "fingerprints model folders for the keys, so mount the same folder "
                            "at the same path here and on every node (docs/cluster.md)")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~"))


def _warn_if_few_in_flight(ray, max_in_flight: int) -> None:
    slots = ray.cluster_resources().get("GPU", 0)
    if max_in_flight < slots:
        LOGGER.warning("ray: executor.max_in_flight=%d is below the cluster's %g GPUs: some will "
                       "idle; raise it to at least the number of GPUs", max_in_flight, slots)


# ----------------------------------------------------------------------------- on a worker


_WORKER_CONTEXT: dict[str, Any] = {}  # in a worker process: the last run's context


def _run_unit_on_worker(cells: list, store: str, payload: tuple) -> dict:
    """Run one unit in a Ray worker (cells: each run's config, run dir and episodes);
    return a few numbers, never data."""
    import socket

    cell, unit = payload
    _test_fault(unit.id)
    from tint.config import config_from_dict
    from tint.engine import stable_hash
    from tint.io import set_threads
    from tint.stage_bodies import make_context
    from tint.stages import run_unit

    start = time.perf_counter()
    config_data, run_dir, episodes = cells[cell]
    config = config_from_dict(config_data)
    config.run_dir = run_dir
    set_threads(config.executor.threads)  # a reused worker keeps whatever it had
    device, gpu = assigned_device(config.device)
    # A reused (CPU) worker keeps the run's context, as the local executor's one process
    # does: the dataset and models load once per worker, not once per unit.
    cache_key = stable_hash([config_data, run_dir, store, device])
    ctx = _WORKER_CONTEXT.get(cache_key)
    if ctx is None:
        ctx = make_context(config, store)
        ctx.device_override = device
        _WORKER_CONTEXT.clear()
        _WORKER_CONTEXT[cache_key] = ctx
    stalled = _test_stall(unit.id, ctx)
    try:
        marker = run_unit(ctx, episodes, unit)
    finally:
        if stalled:
            ctx.hooks.pop("distill-step", None)
    return {"unit": unit.id, "node": socket.gethostname(), "gpu": gpu, "device": device,
            "seconds": time.perf_counter() - start, "stage_seconds": marker.get("seconds")}


def assigned_device(setting: str) -> tuple[str, str | None]:
    """The device of this task from the GPU Ray assigned to it (not from what the node has:
    a CPU task on a GPU node sees every GPU). A logical GPU without CUDA (tests) -> cpu."""
    import ray
    import torch

    gpus = [str(g) for g in ray.get_gpu_ids()]
    gpu = ",".join(gpus) or None
    if gpu is None or setting == "cpu" or not torch.cuda.is_available():
        return "cpu", gpu
    return "cuda:0", gpu  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)


def _test_fault(unit_id: str) -> None:
    """Tests inject one-shot faults: with TINT_RAY_TEST_FAULTS=<folder>, a file
    <folder>/crash--<unit id with / as -> kills this worker once, raise--<...> raises once."""
    import os

    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return
    name = unit_id.replace("/", "-")
    for kind in ("crash", "raise"):
        path = Path(folder) / f"{kind}--{name}"
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        if kind == "crash":
            os._exit(1)
        raise RuntimeError(f"injected test fault in {unit_id}")


def _test_stall(unit_id: str, ctx) -> bool:
    """Tests remove a node in the middle of a unit: with <faults>/stall--<unit id>, this
    worker consumes the file, and at the unit's step 4 of distillation (after its step-3
    checkpoint) writes its Ray node id to <faults>/stalled--<unit id> and waits to be killed
    with its node. Returns whether it armed the stall."""
    import os

    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return False
    name = unit_id.replace("/", "-")
    try:
        (Path(folder) / f"stall--{name}").unlink()
    except FileNotFoundError:
        return False

    def stall(label: str, step: int, loss: float) -> None:
        import ray

        from tint.io import write_text

        if step == 4:
            write_text(Path(folder) / f"stalled--{name}", ray.get_runtime_context().get_node_id())
            time.sleep(600)  # the test removes this node meanwhile

    ctx.hooks["distill-step"] = stall
    return True


# ----------------------------------------------------------------------------- driver side


def unit_done(cell: Cell, unit) -> bool:
    from tint.stages import unit_done as done

    return done(cell.ctx, cell.episodes, unit)


def artifact_folder(cell: Cell, unit) -> str:
    """Where the unit's artifact goes (content-keyed): equal folders are one artifact."""
    from tint.stages import artifact_folder as folder

    return str(folder(cell.ctx, cell.episodes, unit))


def _on_finish(cells: list[Cell]) -> Callable[[Task, Any], None]:
    """Record each finished unit's marker (the run's stage timings), and for a single run
    rewrite the results as episodes finish."""
    from tint.engine import DONE, read_marker

    partial_report = _report_as_episodes_finish(cells) if len(cells) == 1 else None

    def on_finish(task: Task, result: Any) -> None:
        cell = cells[task.payload[0]]
        folder = Path(artifact_folder(cell, task.payload[1]))
        marker = read_marker(folder)
        if marker is not None:
            cell.ctx.markers[str(folder / DONE)] = marker
        if partial_report is not None:
            partial_report(task, result)

    return on_finish


def _report_as_episodes_finish(cells: list[Cell]) -> Callable[[Task, Any], None]:
    """Rewrite results.json and the report when an episode's evaluation finishes (at most
    once a minute), over the episodes finished so far, in order."""
    from tint.results import report
    from tint.stages import evaluation_unit, is_evaluation

    cell = cells[0]
    last = [time.monotonic()]

    def on_finish(task: Task, result: Any) -> None:
        if not is_evaluation(task.stage) or time.monotonic() - last[0] < 60:
            return
        finished = []
        for ep in cell.episodes:
            if not unit_done(cell, evaluation_unit(ep)):
                break
            finished.append(ep)
        if finished and len(finished) < len(cell.episodes):
            last[0] = time.monotonic()
            try:
                report(cell.ctx, finished)
            except TintError as err:  # a partial report is a convenience, never a failure
                LOGGER.warning("ray: partial report skipped (%s)", err)

    return on_finish


def _failure(ctx, report: DriveReport) -> TintError:
    unit, message = next(iter(report.failed.items()))
    more = f" (and {len(report.failed) - 1} more failed unit(s))" if len(report.failed) > 1 else ""
    blocked = f"; {len(report.blocked)} unit(s) that need it did not run" if report.blocked else ""
    return TintError(
        f"unit {unit} failed on a Ray worker: {message}{more}{blocked}. Finished units are kept "
        f"in {ctx.store}; fix the cause and run the same command again to resume")
