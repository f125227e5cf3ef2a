"""`tint run`: every stage of the method for one or many episodes, as units of work.

`run_pipeline` reads from the top as the method's steps::

    1. resolve the context (device, store, log) and claim the run dir
    2. prepare       episodes, base pool, support PNGs              episodes/epNNN/
    3. plan_units    the unit graph below, as data
    4. execute       each unit through the engine (local order, or a Ray cluster)
    5. report        results.json, per-model results, report.html

One function per unit of work, named after its stage (docs/pipeline.md has the table
stage -> function -> artifact -> key)::

    teacher()                 meta-train once per run                 artifacts/teacher/
    specialize(episode, c)    TI (+ NTI for "tint") per class          artifacts/specialize/
    generate(episode, c)      synthetic images, Eq. 3-4 (Alg. 2)       artifacts/generate/
    label_base(episode)       teacher probabilities of base images    artifacts/pseudo-base/
    pseudo_label(episode)     ... and of the synthetic images         artifacts/pseudo/
    distill(episode, s, r)    student s (repeat r), CE + KL           artifacts/distill/
    evaluate(episode)         teacher and students on the queries     episodes/epNNN/evaluate/
    export(episode, s)        TorchScript + ONNX                      export/epNNN/<student>/

Each unit takes resolved inputs, computes its key, runs through the stage engine
(tint.engine: verified markers, locks, per-stage seeds) and returns its marker. A unit
finds its inputs by calling the units it needs, which are skipped when finished: any
process can run any unit once its needs are done, which is what lets a cluster
(tint.executors) or `tint fit` schedule them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from tint.config import RunConfig, StudentConfig, dump_config
from tint.engine import (
    DONE,
    NonFiniteError,
    check_finite,
    run_stage,
    seed_everything,
    stable_hash,
    stage_seed,
    weights_fingerprint,
)
from tint.errors import TintError
from tint.io import set_threads, write_json

LOGGER = logging.getLogger("tint")
STAGES = (
    "prepare", "specialize", "generate", "teacher", "pseudo-label",
    "distill", "evaluate", "export", "report",
)
__all__ = [
    "DONE", "NonFiniteError", "RunContext", "Unit", "check_finite", "make_context", "plan_units",
    "run_pipeline", "run_stage", "run_unit", "stable_hash", "stage_seed", "unit_done",
]


# ----------------------------------------------------------------------------- top level


def run_pipeline(config: RunConfig, store: str | Path | None = None,
                 hooks: dict[str, Callable[..., None]] | None = None,
                 allow_config_change: bool = False) -> dict:
    """Run (or resume) every stage of `config`; return the results dict (results.json).

    The run dir is locked for the whole run and must hold this config's results or none
    (tint.rundir; `allow_config_change` replaces another config's results)."""
    from tint.rundir import claim_run_dir

    validate_components(config)  # before anything is written
    ctx = make_context(config, store, hooks)
    with claim_run_dir(ctx.run_dir, dump_config(config), allow_config_change):
        handler = _attach_log(ctx.run_dir / "log.txt")
        try:
            set_threads(config.threads)
            LOGGER.info("tint run %s -> %s (device %s)", config.name, ctx.run_dir, ctx.device)
            episodes = prepare(ctx)
            units = plan_units(ctx, episodes)
            execute(ctx, episodes, units)
            return report(ctx, episodes)
        finally:
            LOGGER.removeHandler(handler)
            handler.close()


def execute(ctx: RunContext, episodes: list[EpisodeData], units: list[Unit]) -> None:
    """Hand the unit graph to the executor named by `config.executor.name`."""
    from tint.executors import get_executor

    get_executor(ctx.config.executor.name)(ctx, episodes, units)


def _attach_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    return handler


def validate_components(config: RunConfig) -> None:
    """Check names and component settings before any work, each error naming its key (a
    loaded config was checked already; one built in code is checked here)."""
    from tint.config import check_components

    check_components(config)


# ----------------------------------------------------------------------------- run context


@dataclass
class RunContext:
    """What every unit can see: the config, where things go, lazily loaded models."""

    config: RunConfig
    run_dir: Path
    store: Path  # keyed artifacts; `tint experiment` shares one store between runs
    hooks: dict[str, Callable[..., None]] = field(default_factory=dict)  # tests inject faults
    markers: dict[str, dict] = field(default_factory=dict)  # stage markers this run used
    cache: dict[str, Any] = field(default_factory=dict)  # models and tensors loaded once
    device_override: str | None = None  # a Ray worker's assigned device

    @property
    def seed(self) -> int:
        return self.config.seed

    def cached(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self.cache:
            self.cache[name] = make()
        return self.cache[name]

    @cached_property
    def device(self) -> torch.device:
        """Where every stage but export runs; execution only, never in a key."""
        from tint.devices import resolve_device

        return resolve_device(self.device_override or self.config.device)

    @cached_property
    def precision(self) -> str:
        """fp32 / bf16 / fp16 from `config.precision` on this device (auto: fp32 on the
        CPU, bf16 on CUDA); each stage applies it as docs/diffusion.md says. Never in a key."""
        from tint.devices import resolve_precision

        return resolve_precision(self.config.precision, self.device)

    @property
    def dataset(self):
        from tint.data.datasets import load_dataset

        return self.cached("dataset", lambda: load_dataset(
            self.config.data.dataset, resolution=self.config.data.resolution))


def make_context(config: RunConfig, store: str | Path | None = None,
                 hooks: dict[str, Callable[..., None]] | None = None) -> RunContext:
    """The context of a run (or of one worker running its units).

    The run dir and the store are made absolute here, once, before anything uses them:
    every path derived from them (markers, episode folders, synthetic image lists) is then
    absolute in the driver, on a Ray worker that started in another directory, and in the
    report, so paths from the two never meet as relative against absolute."""
    run_dir = Path(config.run_dir).expanduser().resolve()
    store_dir = Path(store).expanduser().resolve() if store else run_dir / "artifacts"
    config = replace(config, run_dir=str(run_dir))
    return RunContext(config, run_dir, store_dir, dict(hooks or {}))


# ----------------------------------------------------------------------------- the unit graph


@dataclass(frozen=True)
class Unit:
    """One unit of work: a call of a unit function, and the units it needs first."""

    stage: str
    episode: int | None = None
    index: int | None = None  # class index (specialize, generate) or student index
    repeat: int = 0  # distill: which of `distill.repeats` students
    needs: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return unit_id(self.stage, self.episode, self.index, self.repeat)


def unit_id(stage: str, episode: int | None = None, index: int | None = None, repeat: int = 0) -> str:
    parts = [stage] + ([f"ep{episode:03d}"] if episode is not None else [])
    if index is not None:
        parts.append(f"{'c' if stage in ('specialize', 'generate') else 's'}{index:02d}")
    return "/".join(parts) + (f"/r{repeat}" if repeat else "")


def plan_units(ctx: RunContext, episodes: list[EpisodeData]) -> list[Unit]:
    """Every unit of the run with what it needs, in the local executor's order."""
    units = [Unit("teacher")]
    teacher_id = units[0].id
    synthetic = uses_synthetic(ctx)
    for ep in episodes:
        e = ep.index
        generated: list[str] = []
        if synthetic:
            for c in range(ep.n_way):
                units.append(Unit("specialize", e, c))
                units.append(Unit("generate", e, c, needs=(unit_id("specialize", e, c),)))
                generated.append(units[-1].id)
        online = ctx.config.distill.consistent  # the teacher labels each batch: no label stages
        if not online:
            units.append(Unit("label-base", e, needs=(teacher_id,)))
            if synthetic:
                units.append(Unit("pseudo-label", e, needs=(teacher_id, unit_id("label-base", e), *generated)))
        students = []
        for s, student in enumerate(ctx.config.students):
            reads_synthetic = synthetic and "synthetic" in student_sources(ctx, student)
            if online:
                needs = (teacher_id, *(generated if reads_synthetic else ()))
            else:
                needs = (unit_id("pseudo-label" if reads_synthetic else "label-base", e),)
            for r in range(ctx.config.distill.repeats):
                units.append(Unit("distill", e, s, r, needs=needs))
                students.append(units[-1].id)
        units.append(Unit("evaluate", e, needs=(teacher_id, *students)))
        if ctx.config.export.enabled:
            for s in range(len(ctx.config.students)):
                units.append(Unit("export", e, s, needs=(unit_id("distill", e, s),)))
    return units


def run_unit(ctx: RunContext, episodes: list[EpisodeData], unit: Unit) -> dict:
    """Call the unit's function (any process can, once its needs are done)."""
    episode = episodes[unit.episode] if unit.episode is not None else None
    if unit.stage == "teacher":
        return teacher(ctx)
    if unit.stage in ("specialize", "generate"):
        return UNIT_FUNCTIONS[unit.stage](ctx, episode, unit.index)
    if unit.stage in ("label-base", "pseudo-label", "evaluate"):
        return UNIT_FUNCTIONS[unit.stage](ctx, episode)
    if unit.stage == "distill":
        return distill(ctx, episode, unit.index, unit.repeat)
    if unit.stage == "export":
        return export(ctx, episode, unit.index)
    raise TintError(f"unknown unit {unit.id}")


def unit_done(ctx: RunContext, episodes: list[EpisodeData], unit: Unit) -> bool:
    """Whether the unit is finished (verified), without running anything."""
    from tint.engine import finished_marker

    episode = episodes[unit.episode] if unit.episode is not None else None
    folder, key, is_done = unit_location(ctx, episode, unit)
    return finished_marker(ctx, unit.stage, folder, key, unit.id, is_done) is not None


def unit_location(ctx: RunContext, episode: EpisodeData | None, unit: Unit) -> tuple[Path, Any, Any]:
    """The folder, key and completeness test of a unit (what the engine checks)."""
    if unit.stage == "teacher":
        return teacher_dir(ctx), teacher_key(ctx), None
    assert episode is not None
    if unit.stage == "specialize":
        key = specialization_key(ctx, episode, unit.index)
        return ctx.store / "specialize" / stable_hash(key), key, None
    if unit.stage == "generate":
        key = generation_key(ctx, episode, unit.index)
        wanted = ctx.config.generator.images_per_class
        return (ctx.store / "generate" / stable_hash(key), key,
                lambda m: m.get("n_images", 0) >= wanted or m.get("exhausted", False))
    if unit.stage == "label-base":
        key = base_labels_key(ctx, episode)
        return ctx.store / "pseudo-base" / stable_hash(key), key, None
    if unit.stage == "pseudo-label":
        key = pseudo_label_key(ctx, episode)
        return ctx.store / "pseudo" / stable_hash(key), key, None
    if unit.stage == "distill":
        key = distill_key(ctx, episode, unit.index, unit.repeat)
        return ctx.store / "distill" / stable_hash(key), key, None
    if unit.stage == "evaluate":
        return episode.folder / "evaluate", evaluation_key(ctx, episode), None
    if unit.stage == "export":
        return export_location(ctx, episode, unit.index)
    raise TintError(f"unknown unit {unit.id}")


# ----------------------------------------------------------------------------- prepare


@dataclass
class EpisodeData:
    """One prepared episode: its index, item lists and the key downstream stages hash."""

    index: int
    folder: Path
    classes: list[str]
    support: list[list[str]]
    query: list[list[str]]
    base: list[str]
    key: dict

    @property
    def label(self) -> str:
        return f"ep{self.index:03d}"

    @property
    def n_way(self) -> int:
        return len(self.classes)

    def support_items(self) -> tuple[list[str], list[int]]:
        return _flatten(self.support)

    def query_items(self) -> tuple[list[str], list[int]]:
        return _flatten(self.query)


def _flatten(rows: list[list[str]]) -> tuple[list[str], list[int]]:
    return [i for row in rows for i in row], [c for c, row in enumerate(rows) for _ in row]


def prepare(ctx: RunContext) -> list[EpisodeData]:
    """Episodes from the episode file (or sampled), the base pool, support PNGs."""
    from tint.data.episodes import check_episodes

    episodes = _load_or_sample_episodes(ctx)
    base = select_base_items(ctx)
    cfg = ctx.config.data
    source = cfg.episodes or f"episodes sampled from data.split={cfg.split!r}"
    check_episodes(episodes, ctx.dataset, source, base_items=base,
                   base_split=cfg.base_split)  # before any stage runs
    prepared = []
    for index, episode in enumerate(episodes):
        folder = ctx.run_dir / "episodes" / f"ep{index:03d}"
        key = {
            "dataset": dataset_key(ctx.config),
            "resolution": ctx.config.data.resolution,
            "classes": list(episode.classes),
            "support": [list(s) for s in episode.support],
            "query": [list(q) for q in episode.query],
            "base": base,
        }
        data = EpisodeData(index, folder, list(episode.classes), key["support"], key["query"], base, key)
        run_stage(ctx, "prepare", folder, key, data.label, lambda f, d=data: _write_episode(ctx, d, f))
        prepared.append(data)
    return prepared


def dataset_key(config: RunConfig) -> str:
    """The dataset as artifact keys see it: `data.dataset_key` when set (`tint fit`: its
    snapshot's content hash, not the folder it lies in), else the `data.dataset` spec."""
    return config.data.dataset_key or config.data.dataset


def _load_or_sample_episodes(ctx: RunContext) -> list:
    from tint.data.episodes import load_episodes, sample_episodes

    cfg = ctx.config.data
    dataset = ctx.dataset
    if cfg.episodes is not None:
        episodes, _meta = load_episodes(resolve_episode_file(cfg.episodes))
        if cfg.first_episodes is not None:
            episodes = episodes[: cfg.first_episodes]
    else:
        episodes = sample_episodes(dataset, split=cfg.split, n_way=cfg.n_way, k_shot=cfg.k_shot,
                                   n_query=cfg.n_query, n_episodes=cfg.n_episodes, seed=cfg.episode_seed)
    if not episodes:
        raise TintError("data.episodes: no episodes to run (empty episode file or first_episodes=0)")
    for i, episode in enumerate(episodes):
        for name in episode.classes:
            if name not in dataset.items:
                raise TintError(f"data.episodes: episode {i} names class {name!r}, which dataset "
                                f"{cfg.dataset!r} does not have; use the episode file made for it")
        if not any(episode.query):
            raise TintError(f"data.episodes: episode {i} has no query images to evaluate on")
    return episodes


def resolve_episode_file(spec: str) -> Path:
    """``builtin:<name>`` -> the packaged tint/assets/episodes/<name>.json; else a path."""
    if spec.startswith("builtin:"):
        from importlib import resources

        name = spec.removeprefix("builtin:")
        path = Path(str(resources.files("tint").joinpath("assets", "episodes", f"{name}.json")))
        if not path.is_file():
            raise TintError(f"data.episodes: no packaged episode file {name!r} ({path})")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TintError(f"data.episodes: episode file {path} not found; make one with `tint episodes`")
    return path


def select_base_items(ctx: RunContext) -> list[str]:
    """The base-class images the student distils on (seeded subset per class)."""
    return ctx.cached("base_items", lambda: _select_base_items(ctx))


def _select_base_items(ctx: RunContext) -> list[str]:
    cfg = ctx.config.data
    dataset = ctx.dataset
    base_classes = dataset.classes(cfg.base_split)
    total = sum(len(dataset.items[c]) for c in base_classes)
    if len(base_classes) < cfg.min_base_classes or total < cfg.min_base_images:
        raise TintError(
            f"dataset {cfg.dataset!r}: split {cfg.base_split!r} has {len(base_classes)} classes and "
            f"{total} images, but the teacher's meta-training and distillation need at least "
            f"{cfg.min_base_classes} classes and {cfg.min_base_images} images (data.min_base_classes, "
            "data.min_base_images): add base classes/images or choose another data.base_split"
        )
    needed = ctx.config.teacher.meta_train
    if needed.epochs > 0 and len(base_classes) < needed.n_way:
        raise TintError(
            f"teacher.meta_train.n_way: {needed.n_way}-way meta-training needs {needed.n_way} base "
            f"classes, but split {cfg.base_split!r} has {len(base_classes)}; lower it or add classes"
        )
    rng = random.Random(cfg.episode_seed)
    items: list[str] = []
    for name in base_classes:
        pool = list(dataset.items[name])
        rng.shuffle(pool)
        items += pool if cfg.base_images_per_class is None else pool[: cfg.base_images_per_class]
    return items


def _write_episode(ctx: RunContext, data: EpisodeData, folder: Path) -> dict:
    from tint.data.images import to_pil
    from tint.io import atomic_path

    support_files = []
    for c, items in enumerate(data.support):
        images = ctx.dataset.load_tensor(items)
        row = []
        for k, image in enumerate(images):
            path = folder / "support" / f"c{c:02d}_{k:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                to_pil(image).save(tmp, format="PNG")
            row.append(str(path.relative_to(ctx.run_dir)))
        support_files.append(row)
    write_json(folder / "episode.json", {
        "index": data.index, "classes": data.classes, "support": data.support,
        "query": data.query, "n_base": len(data.base), "support_png": support_files,
    })
    return {"support_png": support_files}


# ----------------------------------------------------------------------------- teacher


def teacher_inputs(ctx: RunContext):
    from tint.teachers.recipes import TeacherInputs

    data = ctx.config.data
    return TeacherInputs(ctx.config.teacher, ctx.dataset, dataset_key(ctx.config), data.resolution, data.base_split,
                         select_base_items(ctx), ctx.config.seed, ctx.config.students[0].arch, ctx.device)


def teacher_key(ctx: RunContext) -> dict:
    from tint.teachers.recipes import teacher_recipe

    return ctx.cached("teacher_key", lambda: teacher_recipe(ctx.config.teacher.name).run_key(teacher_inputs(ctx)))


def teacher_dir(ctx: RunContext) -> Path:
    return ctx.store / "teacher" / stable_hash(teacher_key(ctx))


def teacher(ctx: RunContext) -> dict:
    """Meta-train (pmf) or base-pretrain (labelhalluc) once per run; cached by its key."""
    from tint.teachers.recipes import teacher_recipe

    recipe = teacher_recipe(ctx.config.teacher.name)
    return run_stage(ctx, "teacher", teacher_dir(ctx), teacher_key(ctx), "meta-train",
                     lambda f: recipe.train_for_run(teacher_inputs(ctx), f))


def fitted_teacher(ctx: RunContext, episode: EpisodeData):
    """The trained teacher fitted to this episode's support (loaded once per process)."""
    from tint.teachers.recipes import teacher_recipe

    teacher(ctx)  # finished: verified and skipped
    folder = teacher_dir(ctx)
    model = ctx.cached(f"teacher:{folder}", lambda: teacher_recipe(ctx.config.teacher.name)
                       .load_for_run(teacher_inputs(ctx), folder))
    if ctx.cache.get("teacher_fitted_for") != (str(folder), episode.index):
        items, labels = episode.support_items()
        seed_everything(stage_seed(ctx.config.seed, "teacher-fit", episode.key))
        model.fit(ctx.dataset.load_tensor(items), torch.tensor(labels), ids=items)
        ctx.cache["teacher_fitted_for"] = (str(folder), episode.index)
    return model


# ----------------------------------------------------------------------------- specialize, generate


def generator_settings(config: RunConfig) -> tuple[Any, Any]:
    """The generator's (SpecializeSettings, GenerateSettings), validated; errors name the key."""
    from tint.generators import resolve_settings

    gen = config.generator
    return resolve_settings(gen.name, gen.specialize, gen.generate)


def backbone_fingerprint(spec: str) -> str | None:
    """The content identity of a local generator (tint.engine.weights_fingerprint), so
    that re-trained weights under the same name never reuse old artifacts."""
    from tint.diffusion.backbone import EMBEDDED_GENERATOR, EMBEDDED_GENERATOR_DIR

    folder = EMBEDDED_GENERATOR_DIR if spec == EMBEDDED_GENERATOR else Path(spec).expanduser()
    if not folder.is_dir():
        return None  # "tiny" (seeded), or a hub id
    return weights_fingerprint(folder)


def has_synthetic(ctx: RunContext) -> bool:
    gen = ctx.config.generator
    return gen.name != "none" and gen.images_per_class > 0


def uses_synthetic(ctx: RunContext) -> bool:
    wanted = any("synthetic" in student_sources(ctx, s) for s in ctx.config.students)
    return wanted and has_synthetic(ctx)


def specialization_key(ctx: RunContext, episode: EpisodeData, c: int) -> dict:
    gen = ctx.config.generator

    def generator_key() -> dict:
        from tint.generators.base import settings_key

        spec_settings, _ = generator_settings(ctx.config)
        weights = backbone_fingerprint(gen.backbone)  # a local folder: its content, wherever it lies
        return {"name": gen.name, **({"weights": weights} if weights else {"backbone": gen.backbone}),
                "specialize": settings_key(spec_settings),
                "resolution": ctx.config.data.resolution}

    return {**ctx.cached("generator_key", generator_key), "class": episode.classes[c],
            "support": episode.support[c], "dataset": dataset_key(ctx.config)}


def generation_key(ctx: RunContext, episode: EpisodeData, c: int) -> dict:
    from tint.generators.base import settings_key

    _, gen_settings = generator_settings(ctx.config)
    gen = ctx.config.generator
    return {"specialization": specialization_key(ctx, episode, c), "seed": gen.seed,
            "generate": settings_key(gen_settings)}


def _backbone(ctx: RunContext, fresh: bool = False):
    """The generator's diffusion backbone: shared for generation, fresh for specialisation.

    Specialisation adds the class token to the tokenizer; a backbone that has already
    specialised other classes (or the same class for another episode) would give the new
    token another name and id, so the artifact would depend on which stages ran before
    in this process. A fresh backbone keeps each specialisation a function of its inputs,
    whatever was skipped on a resume.
    """
    from tint.devices import sampling_dtype
    from tint.diffusion.backbone import load_backbone

    spec = ctx.config.generator.backbone
    # specialisation: float32 weights (TI autocasts to ctx.precision, NTI stays float32);
    # generation: weights in the sampling precision (fp16/bf16 on CUDA)
    kwargs = {"device": ctx.device, "precision": ctx.precision}
    if fresh:
        return load_backbone(spec, dtype=torch.float32, **kwargs)
    return ctx.cached(f"backbone:{spec}", lambda: load_backbone(
        spec, dtype=sampling_dtype(ctx.precision), **kwargs))


def specialize(ctx: RunContext, episode: EpisodeData, c: int) -> dict:
    """Specialise the generator to class c's support images (TI + NTI for "tint")."""
    from tint.generators import create_generator

    key = specialization_key(ctx, episode, c)
    spec_settings, _ = generator_settings(ctx.config)

    def work(folder: Path) -> dict:
        generator = create_generator(ctx.config.generator.name)
        support = ctx.dataset.load_tensor(episode.support[c])
        path = generator.specialize(_backbone(ctx, fresh=True), episode.classes[c], support, folder,
                                    spec_settings)
        return {"artifact": Path(path).name}

    return run_stage(ctx, "specialize", ctx.store / "specialize" / stable_hash(key), key,
                     f"{episode.label}/c{c:02d}", work)


def generate(ctx: RunContext, episode: EpisodeData, c: int) -> dict:
    """New images of class c from its specialisation (Algorithm 2)."""
    from tint.generators import create_generator

    gen_cfg = ctx.config.generator
    artifact = ctx.store / "specialize" / stable_hash(specialization_key(ctx, episode, c))
    artifact = artifact / specialize(ctx, episode, c)["artifact"]
    _, gen_settings = generator_settings(ctx.config)
    if getattr(gen_settings, "cache_dir", "unset") is None:
        # One feature cache per store (keyed inside by pool, scorer and resolution), not
        # one per class folder: mining 5 classes scores the pool once. Not part of the key.
        gen_settings = replace(gen_settings, cache_dir=str(ctx.store / "pool-features"))
    wanted = gen_cfg.images_per_class
    label = f"{episode.label}/c{c:02d}"
    name = episode.classes[c]

    def work(folder: Path) -> dict:
        generator = create_generator(gen_cfg.name)
        made = len(generator.generate(_backbone(ctx), artifact, wanted, folder, gen_cfg.seed, gen_settings))
        if made < wanted and not getattr(generator, "MAY_RETURN_FEWER", False):
            raise TintError(f"stage generate ({label}): {gen_cfg.name} made {made} of {wanted} "
                            f"images in {folder}")
        # exhausted: a capped source (real-data mining) has no more for this key
        return {"n_images": made, "class": name, "exhausted": made < wanted}

    folder, key, is_done = unit_location(ctx, episode, Unit("generate", episode.index, c))
    return run_stage(ctx, "generate", folder, key, label, work, is_done=is_done)


def synthetic_paths(ctx: RunContext, episode: EpisodeData) -> list[list[str]]:
    """The generated images of every class of the episode (empty lists without synthetic data).
    Read once per process: the keys of the labels, students and evaluation all need them."""
    if not uses_synthetic(ctx):
        return [[] for _ in episode.classes]
    return ctx.cached(f"synthetic:{episode.index}", lambda: _read_synthetic_paths(ctx, episode))


def _read_synthetic_paths(ctx: RunContext, episode: EpisodeData) -> list[list[str]]:
    from tint.generators.base import manifest_paths

    wanted = ctx.config.generator.images_per_class
    paths = []
    for c, name in enumerate(episode.classes):
        marker = generate(ctx, episode, c)
        folder = ctx.store / "generate" / stable_hash(generation_key(ctx, episode, c))
        available = min(wanted, int(marker["n_images"]))
        found = manifest_paths(folder, name, available)
        if len(found) < available:
            raise TintError(f"stage generate ({episode.label}/c{c:02d}): {folder} holds {len(found)} of "
                            f"{available} images; delete {folder / DONE} and run again")
        if available < wanted:
            LOGGER.info("%-12s %s/c%02d: %s has %d of the %d images asked for", "generate", episode.label,
                        c, ctx.config.generator.name, available, wanted)
        paths.append([str(p) for p in found])
    return paths


# ----------------------------------------------------------------------------- pseudo-labels


def base_labels_key(ctx: RunContext, episode: EpisodeData) -> dict:
    return {"teacher": teacher_key(ctx), "episode": episode.key}


def label_base(ctx: RunContext, episode: EpisodeData) -> dict:
    """Teacher probabilities of the base images. They depend on the teacher and the
    episode only: one file per (teacher, episode) serves every generator of an experiment
    and every student that reads no synthetic image."""
    key = base_labels_key(ctx, episode)

    def work(folder: Path) -> dict:
        probs = _probabilities(ctx, fitted_teacher(ctx, episode), episode.base, ctx.dataset.load_tensor,
                               folder / "base_probs.safetensors")
        check_finite("pseudo-label", episode.label, "teacher probabilities (base)", probs)
        return {"n_base": len(probs), "labels": "base_probs.safetensors"}

    return run_stage(ctx, "pseudo-label", ctx.store / "pseudo-base" / stable_hash(key), key,
                     f"{episode.label}/base", work)


def pseudo_label_key(ctx: RunContext, episode: EpisodeData) -> dict:
    # Keyed by the images' place in the store, so a moved store keeps its keys.
    relative = [str(Path(p).relative_to(ctx.store)) for paths in synthetic_paths(ctx, episode) for p in paths]
    return {"teacher": teacher_key(ctx), "episode": episode.key, "synthetic": relative}


def pseudo_label(ctx: RunContext, episode: EpisodeData) -> dict:
    """Soft teacher probabilities over the episode's classes for base + synthetic images."""
    from tint.io import load_tensors, save_tensors

    key = pseudo_label_key(ctx, episode)
    base_dir = ctx.store / "pseudo-base" / stable_hash(base_labels_key(ctx, episode))

    def work(f: Path) -> dict:
        base = load_tensors(base_dir / label_base(ctx, episode)["labels"])[0]["probs"]
        flat = [p for paths in synthetic_paths(ctx, episode) for p in paths]
        syn = _probabilities(ctx, fitted_teacher(ctx, episode), flat, _load_generated(ctx),
                             f / "synthetic_probs.safetensors")
        check_finite("pseudo-label", episode.label, "teacher probabilities (synthetic)", syn)
        save_tensors(f / "pseudo_labels.safetensors", {"base": base, "synthetic": syn},
                     {"classes": episode.classes, "base_items": episode.base,
                      "synthetic_items": key["synthetic"]})
        return {"n_base": len(base), "n_synthetic": len(syn)}

    return run_stage(ctx, "pseudo-label", ctx.store / "pseudo" / stable_hash(key), key, episode.label, work)


def _probabilities(ctx: RunContext, teacher, items: list[str], load, cache: Path) -> torch.Tensor:
    """The teacher module's cached, chunked labelling (resumes mid-list after a kill)."""
    from tint.teachers.pseudo_labels import pseudo_label as label_items

    if not items:
        return torch.zeros(0, teacher.num_classes)
    return label_items(teacher, items, cache, load=load,
                       chunk_size=max(ctx.config.teacher.batch_size * 4, 1), progress=False)


def _load_generated(ctx: RunContext) -> Callable[[list[str]], torch.Tensor]:
    from tint.data.images import load_image, to_tensor

    resolution = ctx.config.data.resolution
    return lambda paths: to_tensor([load_image(p, resolution) for p in paths])


# ----------------------------------------------------------------------------- distill


def student_sources(ctx: RunContext, student_cfg: StudentConfig) -> tuple[str, ...]:
    """A student's own `sources`, else `distill.sources`."""
    if student_cfg.sources is not None:
        return tuple(student_cfg.sources)
    return tuple(ctx.config.distill.sources)


def distill_config(ctx: RunContext, episode: EpisodeData, student_cfg: StudentConfig, repeat: int = 0):
    """The student's DistillConfig. Its seed comes from the episode and the repeat, never
    from the student's name or the synthetic set: students of one episode start from
    the same initialisation and draw the same random numbers for what they share, so a
    paired difference between them measures their data, not their seeds."""
    config = ctx.config.distill
    sources = student_sources(ctx, student_cfg)
    if not has_synthetic(ctx):  # no synthetic images: the same student as `generator: none`
        sources = tuple(s for s in sources if s != "synthetic")
    seed = stage_seed(config.seed, "distill", [episode.key, repeat]) % (2**31)
    return replace(config, sources=sources, seed=seed, device=str(ctx.device), repeats=1)


NOT_IN_DISTILL_KEY = ("device", "repeats", "progress")  # execution only


def distill_key(ctx: RunContext, episode: EpisodeData, s: int, repeat: int = 0) -> dict:
    """Keyed on what the student reads: base labels only, or base + synthetic labels."""
    from tint.students.distill import trajectory_settings

    student_cfg = ctx.config.students[s]
    config = distill_config(ctx, episode, student_cfg, repeat)
    settings = {k: v for k, v in trajectory_settings(config).items() if k not in NOT_IN_DISTILL_KEY}
    if config.consistent:  # labelled online: keyed on the teacher and the images themselves
        synthetic = pseudo_label_key(ctx, episode)["synthetic"] if "synthetic" in config.sources else []
        return {"teacher": teacher_key(ctx), "synthetic": synthetic, "arch": student_cfg.arch,
                "distill": settings, "episode": episode.key}
    if "synthetic" in config.sources:
        labels = "pseudo/" + stable_hash(pseudo_label_key(ctx, episode))
    else:
        labels = "pseudo-base/" + stable_hash(base_labels_key(ctx, episode))
    return {"labels": labels, "arch": student_cfg.arch, "distill": settings, "episode": episode.key}


def distill(ctx: RunContext, episode: EpisodeData, s: int, repeat: int = 0) -> dict:
    """Distil student s (repeat `repeat`) for this episode; resumes from its own checkpoints."""
    student_cfg = ctx.config.students[s]
    config = distill_config(ctx, episode, student_cfg, repeat)
    key = distill_key(ctx, episode, s, repeat)
    label = f"{episode.label}/{student_cfg.name}" + (f"/r{repeat}" if repeat else "")

    def work(f: Path) -> dict:
        from tint.students import create_student
        from tint.students.distill import distill as distill_loop

        sources = _distill_sources(ctx, episode, config.sources, online=config.consistent)
        query = _query_tensor(ctx, episode)
        student = create_student(student_cfg.arch, episode.n_way, image_size=ctx.config.data.resolution)
        teacher = online_teacher(ctx, episode, config.teacher_size) if config.consistent else None
        hook = ctx.hooks.get("distill-step")
        result = distill_loop(
            student, sources, config, f, eval_fn=lambda m: _accuracy(m, *query),
            progress=True, on_step=(lambda step, loss: hook(label, step, loss)) if hook else None,
            student_meta={"arch": student_cfg.arch, "num_classes": episode.n_way,
                          "image_size": ctx.config.data.resolution, "classes": episode.classes},
            precision=ctx.precision, teacher=teacher,
        )
        curve = [[e["step"], e["accuracy"]] for e in result.history if "accuracy" in e]
        return {"weights": result.final_path.name, "curve": curve}

    return run_stage(ctx, "distill", ctx.store / "distill" / stable_hash(key), key, label, work)


def _distill_sources(ctx: RunContext, episode: EpisodeData, wanted: tuple[str, ...],
                     online: bool = False) -> dict:
    """The student's sources: supports with their labels; base and synthetic images with
    the pseudo-label stages' probabilities, or unlabelled when the teacher is `online`."""
    from tint.students.distill import DistillSource

    sources = {}
    if "support" in wanted:
        items, targets = episode.support_items()
        sources["support"] = DistillSource(torch.tensor(targets), images=ctx.dataset.load_tensor(items))
    if "synthetic" in wanted:
        flat = [p for paths in synthetic_paths(ctx, episode) for p in paths]
        if flat:
            labels = None if online else _stored_labels(ctx, episode, "synthetic")
            sources["synthetic"] = DistillSource(labels, images=_load_generated(ctx)(flat))
    if "base" in wanted and episode.base:
        labels = None if online else _stored_labels(ctx, episode, "base")
        sources["base"] = DistillSource(labels, images=_base_tensor(ctx))
    return sources


def _stored_labels(ctx: RunContext, episode: EpisodeData, source: str) -> torch.Tensor:
    """The pseudo-label stages' teacher probabilities of the base or synthetic images."""
    from tint.io import load_tensors

    if source == "synthetic":
        pseudo_label(ctx, episode)
        folder = ctx.store / "pseudo" / stable_hash(pseudo_label_key(ctx, episode))
        return load_tensors(folder / "pseudo_labels.safetensors")[0]["synthetic"]
    folder = ctx.store / "pseudo-base" / stable_hash(base_labels_key(ctx, episode))
    return load_tensors(folder / label_base(ctx, episode)["labels"])[0]["probs"]


def online_teacher(ctx: RunContext, episode: EpisodeData, size: int | None):
    """The episode's fitted teacher as a function of a batch (consistent recipe)."""
    items, labels = episode.support_items()
    return fitted_teacher(ctx, episode).online(ctx.dataset.load_tensor(items), torch.tensor(labels), size)


def _base_tensor(ctx: RunContext) -> torch.Tensor:
    """Base images in memory once per process (shared by every episode and student)."""
    return ctx.cached("base_images", lambda: ctx.dataset.load_tensor(select_base_items(ctx)))


def _query_tensor(ctx: RunContext, episode: EpisodeData) -> tuple[torch.Tensor, torch.Tensor]:
    def make():
        items, labels = episode.query_items()
        return ctx.dataset.load_tensor(items), torch.tensor(labels)

    return ctx.cached(f"query:{episode.index}", make)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    from tint.evaluation.evaluate import evaluate_on_episode

    model.eval()
    return evaluate_on_episode(model, images, labels)


def student_folders(ctx: RunContext, episode: EpisodeData, s: int) -> list[Path]:
    """The artifact folder of each repeat of student s."""
    return [ctx.store / "distill" / stable_hash(distill_key(ctx, episode, s, r))
            for r in range(ctx.config.distill.repeats)]


# ----------------------------------------------------------------------------- evaluate, export


def evaluation_key(ctx: RunContext, episode: EpisodeData) -> dict:
    students: dict[str, Any] = {}
    for s, student in enumerate(ctx.config.students):
        names = [f.name for f in student_folders(ctx, episode, s)]
        students[student.name] = names[0] if len(names) == 1 else names
    key = {"teacher": teacher_key(ctx), "students": students, "episode": episode.key}
    if ctx.config.distill.consistent:  # + the online teacher's own accuracy (its size, precision)
        key["online_teacher"] = {"size": ctx.config.distill.teacher_size, "bf16": ctx.config.distill.bf16}
    return key


ONLINE_TEACHER = "teacher-online"  # the consistent recipe's teacher, as the student saw it


def online_teacher_accuracy(ctx: RunContext, episode: EpisodeData, images: torch.Tensor,
                            labels: torch.Tensor) -> float:
    """Query accuracy of the teacher at `distill.teacher_size` in the student's precision:
    the teacher a consistent student learnt from (the gap to it is what distillation lost)."""
    from tint.students.distill import teacher_probabilities

    config = ctx.config.distill
    teacher = online_teacher(ctx, episode, config.teacher_size)
    device_config = replace(config, device=str(ctx.device))
    predictions = torch.cat([teacher_probabilities(teacher, images[i:i + 256].to(ctx.device), device_config,
                                                   ctx.precision).argmax(1).cpu()
                             for i in range(0, len(images), 256)])
    return float((predictions == labels).float().mean())


def evaluate(ctx: RunContext, episode: EpisodeData) -> dict:
    """Teacher and student accuracy on this episode's queries (episodes/epNNN/evaluate/).
    A student with repeats scores the mean of its repeats (each kept in `repeats`)."""
    from tint.students.distill import load_student

    key = evaluation_key(ctx, episode)

    def work(f: Path) -> dict:
        images, labels = _query_tensor(ctx, episode)
        model = fitted_teacher(ctx, episode)
        items, _ = episode.query_items()
        accuracy = {"teacher": float((model.predict_proba(images, ids=items).argmax(1).cpu() == labels)
                                     .float().mean())}
        if ctx.config.distill.consistent:
            accuracy[ONLINE_TEACHER] = online_teacher_accuracy(ctx, episode, images, labels)
        curves, repeats = {}, {}
        for s, student in enumerate(ctx.config.students):
            scores = []
            for r, folder in enumerate(student_folders(ctx, episode, s)):
                marker = distill(ctx, episode, s, r)  # finished: verified and skipped
                model, _meta = load_student(folder / marker["weights"])
                scores.append(_accuracy(model.to(ctx.device), images.to(ctx.device), labels.to(ctx.device)))
                curves.setdefault(student.name, marker.get("curve", []))
            accuracy[student.name] = sum(scores) / len(scores)
            repeats[student.name] = scores
        write_json(f / "evaluation.json", {"accuracy": accuracy, "repeats": repeats,
                                            "n_query": len(labels), "curves": curves})
        return {"accuracy": accuracy, "repeats": repeats, "curves": curves}

    return run_stage(ctx, "evaluate", episode.folder / "evaluate", key, episode.label, work)


def export_location(ctx: RunContext, episode: EpisodeData, s: int) -> tuple[Path, dict, None]:
    # Keyed by the student's artifact (not its absolute path): the same export wherever
    # the store is mounted (a cluster's driver and workers, a moved run dir).
    name = ctx.config.students[s].name
    key = {"student": student_folders(ctx, episode, s)[0].name, "onnx": ctx.config.export.onnx}
    return ctx.run_dir / "export" / episode.label / name, key, None


def export(ctx: RunContext, episode: EpisodeData, s: int) -> dict:
    """TorchScript + ONNX of student s (its first repeat), checked by onnxruntime; on CPU."""
    from tint.export import export_student
    from tint.students.distill import load_student

    folder, key, _ = export_location(ctx, episode, s)
    weights = student_folders(ctx, episode, s)[0] / "student.safetensors"

    def work(f: Path) -> dict:
        distill(ctx, episode, s)  # finished: verified and skipped
        model, meta = load_student(weights)
        report = export_student(model.cpu(), f, int(meta.get("image_size") or ctx.config.data.resolution),
                                onnx=ctx.config.export.onnx)
        return {"export": report}

    return run_stage(ctx, "export", folder, key, f"{episode.label}/{ctx.config.students[s].name}", work)


UNIT_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "teacher": teacher, "specialize": specialize, "generate": generate, "label-base": label_base,
    "pseudo-label": pseudo_label, "distill": distill, "evaluate": evaluate, "export": export,
}


# ----------------------------------------------------------------------------- report


def report(ctx: RunContext, episodes: list[EpisodeData]) -> dict:
    """results.json, one result file per model, report.html; returns the results."""
    from tint.report import summary_lines, write_report
    from tint.results import collect_results, public_results, write_model_results

    evaluations = [{**evaluate(ctx, ep), "synthetic": synthetic_paths(ctx, ep)} for ep in episodes]
    results = collect_results(ctx, episodes, evaluations)
    write_model_results(ctx, results)
    if ctx.config.report.enabled:
        start = time.perf_counter()
        write_report(ctx.run_dir, results, dump_config(ctx.config), ctx.config.report.grid_images)
        results["timings"]["report"] = round(time.perf_counter() - start, 2)
    write_json(ctx.run_dir / "results.json", public_results(results))
    LOGGER.info("results: %s", "; ".join(summary_lines(results)[1:]))
    return results

