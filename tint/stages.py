"""The stage table: the graph of `tint run`, declared once.

One `Stage` record per stage holds everything the graph needs: its name, the units it
needs, its key, its artifact folder, the compute function (tint.stage_bodies) and whether
it asks for a GPU. Everything else reads this table: `plan_units` (the unit graph as
data), `locate` / `unit_done` / `run_unit` (what the executors call), the Ray adapter
(resources), the results (stage timings). Layers, top to bottom::

    CLI / driver (tint.pipeline, tint.fitting)  ->  executors  ->  this table
        ->  stage bodies (tint.stage_bodies)  ->  engine / io

A unit's inputs are the artifacts of the units it needs: the table runs each of them
(skipped when finished, so any process can run any unit once its needs are done) and
hands their folders and markers to the compute function, which never looks one up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from tint import stage_bodies as bodies
from tint.engine import finished_marker, run_stage, stable_hash
from tint.errors import TintError
from tint.stage_bodies import Artifact, EpisodeData, RunContext

# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """One unit of work: a stage at one place of the run, and the units it needs first."""

    stage: str
    episode: int | None = None
    index: int | None = None  # class index (specialize, generate) or student index
    repeat: int = 0  # distill: which of `distill.repeats` students
    needs: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        parts = [self.stage] + ([f"ep{self.episode:03d}"] if self.episode is not None else [])
        if self.index is not None:
            parts.append(f"{STAGES[self.stage].scope.index_prefix}{self.index:02d}")
        return "/".join(parts) + (f"/r{self.repeat}" if self.repeat else "")


@dataclass(frozen=True)
class Scope:
    """How many units a stage has: one per run, per episode, per class or per student."""

    name: str
    index_prefix: str = ""  # unit ids: c01 (class), s01 (student)

    def places(self, ctx: RunContext, episode: EpisodeData | None) -> Iterator[tuple[int | None, int]]:
        """(index, repeat) of each unit of this scope in an episode, in the local order."""
        if self.name in ("run", "episode"):
            yield None, 0
        elif self.name == "class":
            yield from ((c, 0) for c in range(episode.n_way))
        else:  # "student" (every repeat) or "model" (the first repeat: what is exported)
            repeats = ctx.config.distill.repeats if self.name == "student" else 1
            yield from ((s, r) for s in range(len(ctx.config.students)) for r in range(repeats))


RUN, EPISODE, CLASS = Scope("run"), Scope("episode"), Scope("class", "c")
STUDENT, MODEL = Scope("student", "s"), Scope("model", "s")

# ----------------------------------------------------------------------------- the record

KeyFn = Callable[[RunContext, EpisodeData | None, Unit], Any]
FolderFn = Callable[[RunContext, EpisodeData | None, Unit, Any], Path]
NeedsFn = Callable[[RunContext, EpisodeData | None, Unit], tuple[Unit, ...]]
ComputeFn = Callable[[RunContext, EpisodeData | None, Unit, Path, list[Artifact]], dict]


def in_store(name: str) -> FolderFn:
    """A keyed artifact folder: <store>/<name>/<hash of the key>. The one place a store
    path is built, so a stage's folder is found from its key alone."""
    return lambda ctx, episode, unit, key: ctx.store / name / stable_hash(key)


def always(ctx: RunContext) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """Everything the graph knows about one stage."""

    name: str  # unit ids
    scope: Scope
    needs: NeedsFn
    key: KeyFn
    folder: FolderFn
    compute: ComputeFn  # (ctx, episode, unit, folder, the needs' artifacts) -> marker fields
    label: Callable[[RunContext, EpisodeData | None, Unit], str]  # log lines
    gpu: bool  # the default of executor.gpus.<engine_name> (Ray)
    engine_name: str = ""  # seeds, log lines, timings, executor.gpus; default: name
    wanted: Callable[[RunContext], bool] = always  # planned in this run at all
    complete: Callable[[RunContext], Callable[[dict], bool]] | None = None  # beyond the key

    @property
    def runs_as(self) -> str:
        return self.engine_name or self.name

    def completeness(self, ctx: RunContext) -> Callable[[dict], bool] | None:
        """What a marker with the right key must also say to count as finished."""
        return self.complete(ctx) if self.complete else None


# ----------------------------------------------------------------------------- the graph


def no_needs(ctx: RunContext, episode: EpisodeData | None, unit: Unit) -> tuple[Unit, ...]:
    return ()


def the_teacher(ctx: RunContext, episode: EpisodeData | None, unit: Unit) -> tuple[Unit, ...]:
    return (Unit("teacher"),)


def its_specialization(ctx: RunContext, episode: EpisodeData, unit: Unit) -> tuple[Unit, ...]:
    return (Unit("specialize", unit.episode, unit.index),)


def every_generate(ctx: RunContext, episode: EpisodeData) -> tuple[Unit, ...]:
    return tuple(Unit("generate", episode.index, c) for c in range(episode.n_way))


def labels_inputs(ctx: RunContext, episode: EpisodeData, unit: Unit) -> tuple[Unit, ...]:
    return (Unit("teacher"), Unit("label-base", episode.index), *every_generate(ctx, episode))


def student_inputs(ctx: RunContext, episode: EpisodeData, unit: Unit) -> tuple[Unit, ...]:
    """paper: the label artifact it reads; consistent: the teacher (+ the images it reads)."""
    reads_synthetic = bodies.reads_synthetic(ctx, unit.index)
    if ctx.config.distill.consistent:  # the teacher labels each batch: no label stages
        return (Unit("teacher"), *(every_generate(ctx, episode) if reads_synthetic else ()))
    return (Unit("pseudo-label" if reads_synthetic else "label-base", episode.index),)


def every_student(ctx: RunContext, episode: EpisodeData, unit: Unit) -> tuple[Unit, ...]:
    return (Unit("teacher"), *(Unit("distill", episode.index, s, r)
                               for s, r in STUDENT.places(ctx, episode)))


def first_repeat(ctx: RunContext, episode: EpisodeData, unit: Unit) -> tuple[Unit, ...]:
    return (Unit("distill", episode.index, unit.index, 0),)


# ----------------------------------------------------------------------------- keys


def student_key(ctx: RunContext, episode: EpisodeData, unit: Unit) -> dict:
    labels = None
    if not ctx.config.distill.consistent:  # keyed on the label artifact it reads
        (reads,) = student_inputs(ctx, episode, unit)
        labels = str(locate(ctx, episode, reads)[0].relative_to(ctx.store))
    return bodies.distill_key(ctx, episode, unit.index, unit.repeat, labels, student_images(ctx, episode, unit))


def student_images(ctx: RunContext, episode: EpisodeData, unit: Unit) -> list[list[str]]:
    """The generated images a student reads: none (and nothing generated on their behalf,
    e.g. by a Ray driver asking whether the student is done) unless it reads them."""
    if not bodies.reads_synthetic(ctx, unit.index):
        return [[] for _ in episode.classes]
    return synthetic_paths(ctx, episode)


def student_folders(ctx: RunContext, episode: EpisodeData) -> list[list[Path]]:
    """The artifact folder of each repeat of each student."""
    repeats = range(ctx.config.distill.repeats)
    return [[locate(ctx, episode, Unit("distill", episode.index, s, r))[0] for r in repeats]
            for s in range(len(ctx.config.students))]


def evaluation_key(ctx: RunContext, episode: EpisodeData, unit: Unit) -> dict:
    return bodies.evaluation_key(ctx, episode, student_folders(ctx, episode))


def export_key(ctx: RunContext, episode: EpisodeData, unit: Unit) -> dict:
    (student,) = first_repeat(ctx, episode, unit)
    return bodies.export_key(ctx, locate(ctx, episode, student)[0])


# ----------------------------------------------------------------------------- compute


def evaluate(ctx: RunContext, episode: EpisodeData, unit: Unit, folder: Path, inputs: list[Artifact]) -> dict:
    teacher, *trained = inputs
    repeats = ctx.config.distill.repeats
    students = [trained[i:i + repeats] for i in range(0, len(trained), repeats)]
    return bodies.evaluate(ctx, episode, folder, teacher, students)


def distill(ctx: RunContext, episode: EpisodeData, unit: Unit, folder: Path, inputs: list[Artifact]) -> dict:
    consistent = ctx.config.distill.consistent
    return bodies.distill(ctx, episode, unit.index, unit.repeat, folder,
                          labels=None if consistent else inputs[0], teacher=inputs[0] if consistent else None,
                          synthetic=student_images(ctx, episode, unit))


def class_label(ctx: RunContext, episode: EpisodeData, unit: Unit) -> str:
    return f"{episode.label}/c{unit.index:02d}"


# ----------------------------------------------------------------------------- the table

TABLE = (
    Stage("teacher", RUN, no_needs, key=lambda ctx, ep, u: bodies.teacher_key(ctx), folder=in_store("teacher"),
          compute=lambda ctx, ep, u, f, inputs: bodies.train_teacher(ctx, f),
          label=lambda ctx, ep, u: "meta-train", gpu=True),
    Stage("specialize", CLASS, no_needs, key=lambda ctx, ep, u: bodies.specialization_key(ctx, ep, u.index),
          folder=in_store("specialize"), compute=lambda ctx, ep, u, f, inputs: bodies.specialize(ctx, ep, u.index, f),
          label=class_label, gpu=True, wanted=bodies.uses_synthetic),
    Stage("generate", CLASS, its_specialization, key=lambda ctx, ep, u: bodies.generation_key(ctx, ep, u.index),
          folder=in_store("generate"),
          compute=lambda ctx, ep, u, f, inputs: bodies.generate(ctx, ep, u.index, f, inputs[0]),
          label=class_label, gpu=True, wanted=bodies.uses_synthetic, complete=bodies.has_all_images),
    # the base images' labels: timed, seeded and given GPUs as part of pseudo-labelling
    Stage("label-base", EPISODE, the_teacher, key=lambda ctx, ep, u: bodies.base_labels_key(ctx, ep),
          folder=in_store("pseudo-base"), compute=lambda ctx, ep, u, f, inputs: bodies.label_base(ctx, ep, f, inputs[0]),
          label=lambda ctx, ep, u: f"{ep.label}/base", gpu=True, engine_name="pseudo-label",
          wanted=lambda ctx: not ctx.config.distill.consistent),
    Stage("pseudo-label", EPISODE, labels_inputs,
          key=lambda ctx, ep, u: bodies.pseudo_label_key(ctx, ep, synthetic_paths(ctx, ep)), folder=in_store("pseudo"),
          compute=lambda ctx, ep, u, f, inputs: bodies.pseudo_label(ctx, ep, f, inputs[0], inputs[1],
                                                                    synthetic_paths(ctx, ep)),
          label=lambda ctx, ep, u: ep.label, gpu=True,
          wanted=lambda ctx: not ctx.config.distill.consistent and bodies.uses_synthetic(ctx)),
    Stage("distill", STUDENT, student_inputs, key=student_key, folder=in_store("distill"), compute=distill,
          label=lambda ctx, ep, u: bodies.student_label(ctx, ep, u.index, u.repeat), gpu=False),
    Stage("evaluate", EPISODE, every_student, key=evaluation_key,
          folder=lambda ctx, ep, u, key: ep.folder / "evaluate", compute=evaluate,
          label=lambda ctx, ep, u: ep.label, gpu=False),
    Stage("export", MODEL, first_repeat, key=export_key,
          folder=lambda ctx, ep, u, key: ctx.run_dir / "export" / ep.label / ctx.config.students[u.index].name,
          compute=lambda ctx, ep, u, f, inputs: bodies.export(ctx, f, inputs[0]),
          label=lambda ctx, ep, u: f"{ep.label}/{ctx.config.students[u.index].name}", gpu=False,
          wanted=lambda ctx: ctx.config.export.enabled),
)
STAGES: dict[str, Stage] = {stage.name: stage for stage in TABLE}
# Stages the driver runs itself, before and after the graph (tint.stage_bodies.prepare, the report).
DRIVER_STAGES = ("prepare", "report")


def timed_stages() -> tuple[str, ...]:
    """The stage names results.json times, in the order of the run."""
    return tuple(dict.fromkeys([DRIVER_STAGES[0], *(s.runs_as for s in TABLE), DRIVER_STAGES[1]]))


def default_gpus() -> dict[str, float]:
    """executor.gpus by default: one GPU for each stage that wants one."""
    return {s.runs_as: 1.0 if s.gpu else 0.0 for s in TABLE}


# ----------------------------------------------------------------------------- reading the table


def plan_units(ctx: RunContext, episodes: list[EpisodeData]) -> list[Unit]:
    """Every unit of the run with what it needs, in the local executor's order: the run's
    units, then per episode the table's stages by scope (a class's specialise and generate
    together, then the labels, the students, the evaluation, the exports)."""
    units = [planned(ctx, None, Unit(s.name)) for s in TABLE if s.scope is RUN and s.wanted(ctx)]
    for episode in episodes:
        for scope, group in groupby((s for s in TABLE if s.scope is not RUN), key=lambda s: s.scope):
            wanted = [s for s in group if s.wanted(ctx)]
            for index, repeat in scope.places(ctx, episode):
                units += [planned(ctx, episode, Unit(s.name, episode.index, index, repeat)) for s in wanted]
    return units


def planned(ctx: RunContext, episode: EpisodeData | None, unit: Unit) -> Unit:
    needs = STAGES[unit.stage].needs(ctx, episode, unit)
    return Unit(unit.stage, unit.episode, unit.index, unit.repeat, tuple(n.id for n in needs))


def locate(ctx: RunContext, episode: EpisodeData | None, unit: Unit) -> tuple[Path, Any]:
    """The unit's artifact folder and key."""
    stage = STAGES[unit.stage]
    key = stage.key(ctx, episode, unit)
    return stage.folder(ctx, episode, unit, key), key


def run(ctx: RunContext, episode: EpisodeData | None, unit: Unit) -> Artifact:
    """Run the unit through the engine (skipped when finished); its needs run first, in
    the order the table lists them, and their artifacts are the compute function's inputs."""
    stage = STAGES[unit.stage]
    folder, key = locate(ctx, episode, unit)

    def work(out: Path) -> dict:
        inputs = [run(ctx, episode if need.episode is not None else None, need)
                  for need in stage.needs(ctx, episode, unit)]
        return stage.compute(ctx, episode, unit, out, inputs)

    marker = run_stage(ctx, stage.runs_as, folder, key, stage.label(ctx, episode, unit), work,
                       is_done=stage.completeness(ctx))
    return Artifact(folder, marker)


def episode_of(episodes: list[EpisodeData], unit: Unit) -> EpisodeData | None:
    return episodes[unit.episode] if unit.episode is not None else None


def run_unit(ctx: RunContext, episodes: list[EpisodeData], unit: Unit) -> dict:
    """Run one planned unit (any process can, once its needs are done); its marker."""
    if unit.stage not in STAGES:
        raise TintError(f"unknown unit {unit.id}")
    return run(ctx, episode_of(episodes, unit), unit).marker


def unit_done(ctx: RunContext, episodes: list[EpisodeData], unit: Unit) -> bool:
    """Whether the unit is finished (verified), without running it."""
    stage = STAGES[unit.stage]
    episode = episode_of(episodes, unit)
    folder, key = locate(ctx, episode, unit)
    return finished_marker(ctx, stage.runs_as, folder, key, unit.id, stage.completeness(ctx)) is not None


def artifact_folder(ctx: RunContext, episodes: list[EpisodeData], unit: Unit) -> Path:
    """Where the unit's artifact goes: units with equal folders make one artifact."""
    return locate(ctx, episode_of(episodes, unit), unit)[0]


# ----------------------------------------------------------------------------- what drivers read


def synthetic_paths(ctx: RunContext, episode: EpisodeData) -> list[list[str]]:
    """The generated images of every class of the episode (empty lists without synthetic
    data), generating them if needed. Read once per process: the keys of the labels,
    students and evaluation all need them."""
    if not bodies.uses_synthetic(ctx):
        return [[] for _ in episode.classes]
    return ctx.cached(f"synthetic:{episode.index}", lambda: bodies.generated_paths(
        ctx, episode, [run(ctx, episode, unit) for unit in every_generate(ctx, episode)]))


def teacher_key(ctx: RunContext) -> Any:
    return locate(ctx, None, Unit("teacher"))[1]


def fitted_teacher(ctx: RunContext, episode: EpisodeData):
    """The run's teacher (trained if needed) fitted to the episode's support."""
    return bodies.fitted_teacher(ctx, episode, run(ctx, None, Unit("teacher")))


def trained_student(ctx: RunContext, episode: EpisodeData, s: int, repeat: int = 0) -> Artifact:
    """Student s (repeat `repeat`) of the episode, distilled if needed."""
    return run(ctx, episode, Unit("distill", episode.index, s, repeat))


def student_location(ctx: RunContext, episode: EpisodeData, s: int, repeat: int = 0) -> tuple[Path, Any]:
    return locate(ctx, episode, Unit("distill", episode.index, s, repeat))


def generation_folder(ctx: RunContext, episode: EpisodeData, c: int) -> Path:
    return locate(ctx, episode, Unit("generate", episode.index, c))[0]


def export_folder(ctx: RunContext, episode: EpisodeData, s: int) -> Path:
    return locate(ctx, episode, Unit("export", episode.index, s))[0]


def evaluation(ctx: RunContext, episode: EpisodeData) -> dict:
    """The episode's evaluation marker (computed if needed)."""
    return run(ctx, episode, evaluation_unit(episode)).marker


def evaluation_unit(episode: EpisodeData) -> Unit:
    return Unit("evaluate", episode.index)


def is_evaluation(stage: str) -> bool:
    return stage == "evaluate"


def units_without_queries(units: list[Unit]) -> list[Unit]:
    """The plan without its evaluations (`tint fit` has no query set)."""
    return [u for u in units if not is_evaluation(u.stage)]

