"""The stage bodies of `tint run`: what each unit of work computes, and its key.

This module knows how to compute an artifact, never where the graph puts it: every
function gets its output folder and the artifacts of the units it needs (`Artifact`:
folder + marker) from the stage table (tint.stages), which declares the graph once.
Read top to bottom it follows the data::

    RunContext, prepare     the run's context; episodes, base pool, support PNGs
    teacher                 meta-train once per run
    specialize, generate    TI (+ NTI for "tint") per class; synthetic images (Alg. 2)
    label_base, pseudo_label  teacher probabilities of base (+ synthetic) images
    distill                 student s (repeat r), CE + KL or the consistent recipe
    evaluate, export        teacher and students on the queries; TorchScript + ONNX
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from tint.config import RunConfig, StudentConfig
from tint.engine import (
    DONE,
    check_finite,
    run_stage,
    seed_everything,
    stage_seed,
    weights_fingerprint,
)
from tint.errors import TintError
from tint.io import write_json

LOGGER = logging.getLogger("tint")


@dataclass(frozen=True)
class Artifact:
    """A finished unit as the units after it see it: its folder and its marker."""

    folder: Path
    marker: dict


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


def train_teacher(ctx: RunContext, folder: Path) -> dict:
    """Meta-train (pmf) or base-pretrain (labelhalluc) once per run; cached by its key."""
    from tint.teachers.recipes import teacher_recipe

    return teacher_recipe(ctx.config.teacher.name).train_for_run(teacher_inputs(ctx), folder)


def fitted_teacher(ctx: RunContext, episode: EpisodeData, trained: Artifact):
    """The trained teacher fitted to this episode's support (loaded once per process)."""
    from tint.teachers.recipes import teacher_recipe

    folder = trained.folder
    model = ctx.cached(f"teacher:{folder}", lambda: teacher_recipe(ctx.config.teacher.name)
                       .load_for_run(teacher_inputs(ctx), folder))
    if ctx.cache.get("teacher_fitted_for") != (str(folder), episode.index):
        items, labels = episode.support_items()
        seed_everything(stage_seed(ctx.config.seed, "teacher-fit", episode.key))
        model.fit(ctx.dataset.load_tensor(items), torch.tensor(labels), ids=items)
        ctx.cache["teacher_fitted_for"] = (str(folder), episode.index)
    return model


# ----------------------------------------------------------------------------- specialize, generate


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

        weights = backbone_fingerprint(gen.backbone)  # a local folder: its content, wherever it lies
        return {"name": gen.name, **({"weights": weights} if weights else {"backbone": gen.backbone}),
                "specialize": settings_key(gen.specialize),
                "resolution": ctx.config.data.resolution}

    return {**ctx.cached("generator_key", generator_key), "class": episode.classes[c],
            "support": episode.support[c], "dataset": dataset_key(ctx.config)}


def generation_key(ctx: RunContext, episode: EpisodeData, c: int) -> dict:
    from tint.generators.base import settings_key

    gen = ctx.config.generator
    return {"specialization": specialization_key(ctx, episode, c), "seed": gen.seed,
            "generate": settings_key(gen.generate)}


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


def specialize(ctx: RunContext, episode: EpisodeData, c: int, folder: Path) -> dict:
    """Specialise the generator to class c's support images (TI + NTI for "tint")."""
    from tint.generators import create_generator

    gen = ctx.config.generator
    support = ctx.dataset.load_tensor(episode.support[c])
    path = create_generator(gen.name).specialize(_backbone(ctx, fresh=True), episode.classes[c], support,
                                                 folder, gen.specialize)
    return {"artifact": Path(path).name}


def generate(ctx: RunContext, episode: EpisodeData, c: int, folder: Path, specialization: Artifact) -> dict:
    """New images of class c from its specialisation (Algorithm 2)."""
    from tint.generators import create_generator

    gen_cfg = ctx.config.generator
    gen_settings = gen_cfg.generate
    if getattr(gen_settings, "cache_dir", "unset") is None:
        # One feature cache per store (keyed inside by pool, scorer and resolution), not
        # one per class folder: mining 5 classes scores the pool once. Not part of the key.
        gen_settings = replace(gen_settings, cache_dir=str(ctx.store / "pool-features"))
    wanted = gen_cfg.images_per_class
    artifact = specialization.folder / specialization.marker["artifact"]
    generator = create_generator(gen_cfg.name)
    made = len(generator.generate(_backbone(ctx), artifact, wanted, folder, gen_cfg.seed, gen_settings))
    if made < wanted and not getattr(generator, "MAY_RETURN_FEWER", False):
        raise TintError(f"stage generate ({episode.label}/c{c:02d}): {gen_cfg.name} made {made} of {wanted} "
                        f"images in {folder}")
    # exhausted: a capped source (real-data mining) has no more for this key
    return {"n_images": made, "class": episode.classes[c], "exhausted": made < wanted}


def has_all_images(ctx: RunContext) -> Callable[[dict], bool]:
    """A generate marker is complete when it holds the images asked for (more may be asked
    later under the same key) or its source ran out."""
    wanted = ctx.config.generator.images_per_class
    return lambda marker: marker.get("n_images", 0) >= wanted or marker.get("exhausted", False)


def generated_paths(ctx: RunContext, episode: EpisodeData, generated: list[Artifact]) -> list[list[str]]:
    """The generated images of every class of the episode, from its generate artifacts."""
    from tint.generators.base import manifest_paths

    wanted = ctx.config.generator.images_per_class
    paths = []
    for c, (name, artifact) in enumerate(zip(episode.classes, generated, strict=True)):
        available = min(wanted, int(artifact.marker["n_images"]))
        found = manifest_paths(artifact.folder, name, available)
        if len(found) < available:
            raise TintError(f"stage generate ({episode.label}/c{c:02d}): {artifact.folder} holds {len(found)} of "
                            f"{available} images; delete {artifact.folder / DONE} and run again")
        if available < wanted:
            LOGGER.info("%-12s %s/c%02d: %s has %d of the %d images asked for", "generate", episode.label,
                        c, ctx.config.generator.name, available, wanted)
        paths.append([str(p) for p in found])
    return paths


# ----------------------------------------------------------------------------- pseudo-labels


def base_labels_key(ctx: RunContext, episode: EpisodeData) -> dict:
    return {"teacher": teacher_key(ctx), "episode": episode.key}


def label_base(ctx: RunContext, episode: EpisodeData, folder: Path, teacher: Artifact) -> dict:
    """Teacher probabilities of the base images. They depend on the teacher and the
    episode only: one file per (teacher, episode) serves every generator of an experiment
    and every student that reads no synthetic image."""
    probs = _probabilities(ctx, fitted_teacher(ctx, episode, teacher), episode.base, ctx.dataset.load_tensor,
                           folder / "base_probs.safetensors")
    check_finite("pseudo-label", episode.label, "teacher probabilities (base)", probs)
    return {"n_base": len(probs), "labels": "base_probs.safetensors"}


def store_relative(ctx: RunContext, synthetic: list[list[str]]) -> list[str]:
    """The synthetic images as keys see them: by their place in the store, so a moved
    store keeps its keys."""
    return [str(Path(p).relative_to(ctx.store)) for paths in synthetic for p in paths]


def pseudo_label_key(ctx: RunContext, episode: EpisodeData, synthetic: list[list[str]]) -> dict:
    return {"teacher": teacher_key(ctx), "episode": episode.key, "synthetic": store_relative(ctx, synthetic)}


def pseudo_label(ctx: RunContext, episode: EpisodeData, folder: Path, teacher: Artifact,
                 base_labels: Artifact, synthetic: list[list[str]]) -> dict:
    """Soft teacher probabilities over the episode's classes for base + synthetic images."""
    from tint.io import save_tensors

    base = read_labels(base_labels, "base")
    flat = [p for paths in synthetic for p in paths]
    syn = _probabilities(ctx, fitted_teacher(ctx, episode, teacher), flat, _load_generated(ctx),
                         folder / "synthetic_probs.safetensors")
    check_finite("pseudo-label", episode.label, "teacher probabilities (synthetic)", syn)
    save_tensors(folder / "pseudo_labels.safetensors", {"base": base, "synthetic": syn},
                 {"classes": episode.classes, "base_items": episode.base,
                  "synthetic_items": store_relative(ctx, synthetic)})
    return {"n_base": len(base), "n_synthetic": len(syn)}


def read_labels(labels: Artifact, source: str) -> torch.Tensor:
    """Teacher probabilities of the base or synthetic images from a label artifact: the
    base labels' file, or the pseudo-labels' file (which holds both)."""
    from tint.io import load_tensors

    if "labels" in labels.marker:  # the base labels alone
        return load_tensors(labels.folder / labels.marker["labels"])[0]["probs"]
    return load_tensors(labels.folder / "pseudo_labels.safetensors")[0][source]


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
    """The student's DistillConfig. Its seed (batches, augmentations, mixing) comes from the
    episode and the repeat, never from the student's name or the synthetic set: students
    of one episode draw the same random numbers for what they share. Their initial weights
    are not drawn from it: the engine seeds the distill stage from its key, which differs
    between sources (docs/pipeline.md, "Students share their batch randomness")."""
    config = ctx.config.distill
    sources = student_sources(ctx, student_cfg)
    if not has_synthetic(ctx):  # no synthetic images: the same student as `generator: none`
        sources = tuple(s for s in sources if s != "synthetic")
    seed = stage_seed(config.seed, "distill", [episode.key, repeat]) % (2**31)
    return replace(config, sources=sources, seed=seed, device=str(ctx.device), repeats=1)


NOT_IN_DISTILL_KEY = ("device", "repeats", "progress")  # execution only


def reads_synthetic(ctx: RunContext, s: int) -> bool:
    """Whether student s reads generated images (it wants them and the run makes them)."""
    return has_synthetic(ctx) and "synthetic" in student_sources(ctx, ctx.config.students[s])


def distill_key(ctx: RunContext, episode: EpisodeData, s: int, repeat: int, labels: str | None,
                synthetic: list[list[str]]) -> dict:
    """Keyed on what the student reads: the label artifact (`labels`, its store-relative
    folder) for the paper recipe; for the consistent one, the teacher and the images."""
    from tint.students.distill import trajectory_settings

    student_cfg = ctx.config.students[s]
    config = distill_config(ctx, episode, student_cfg, repeat)
    settings = {k: v for k, v in trajectory_settings(config).items() if k not in NOT_IN_DISTILL_KEY}
    if config.consistent:  # labelled online: keyed on the teacher and the images themselves
        return {"teacher": teacher_key(ctx), "synthetic": store_relative(ctx, synthetic), "arch": student_cfg.arch,
                "distill": settings, "episode": episode.key}
    return {"labels": labels, "arch": student_cfg.arch, "distill": settings, "episode": episode.key}


def distill(ctx: RunContext, episode: EpisodeData, s: int, repeat: int, folder: Path,
            labels: Artifact | None, teacher: Artifact | None, synthetic: list[list[str]]) -> dict:
    """Distil student s (repeat `repeat`) for this episode; resumes from its own checkpoints.
    `labels`: the paper recipe's label artifact; `teacher`: the consistent recipe's."""
    from tint.students import create_student
    from tint.students.distill import distill as distill_loop

    student_cfg = ctx.config.students[s]
    config = distill_config(ctx, episode, student_cfg, repeat)
    label = student_label(ctx, episode, s, repeat)
    sources = _distill_sources(ctx, episode, config.sources, labels, synthetic)
    query = _query_tensor(ctx, episode)
    student = create_student(student_cfg.arch, episode.n_way, image_size=ctx.config.data.resolution)
    if config.base_init_steps:
        pretrain_on_base_classes(ctx, student, student_cfg.arch, config, folder / "base-init")
    if "student-init" in ctx.hooks:  # tests read the weights before the first step
        ctx.hooks["student-init"](label, student)
    online = online_teacher(ctx, episode, teacher, config.teacher_size) if config.consistent else None
    hook = ctx.hooks.get("distill-step")
    result = distill_loop(
        student, sources, config, folder, eval_fn=lambda m: _accuracy(m, *query),
        progress=True, on_step=(lambda step, loss: hook(label, step, loss)) if hook else None,
        student_meta={"arch": student_cfg.arch, "num_classes": episode.n_way,
                      "image_size": ctx.config.data.resolution, "classes": episode.classes},
        precision=ctx.precision, teacher=online,
    )
    curve = [[e["step"], e["accuracy"]] for e in result.history if "accuracy" in e]
    return {"weights": result.final_path.name, "curve": curve}


def pretrain_on_base_classes(ctx: RunContext, student: torch.nn.Module, arch: str, config,
                             folder: Path) -> None:
    """Give `student` the features of a classifier of the base classes, trained on their true
    labels (`distill.base_init_steps` steps, the distillation's optimiser, batch and
    augmentation, lr drop at 3/4), so that distillation starts from features of clip-art
    classes instead of random ones. Resumable from `folder`'s own checkpoints."""
    from tint.students import create_student
    from tint.students.distill import DistillSource
    from tint.students.distill import distill as distill_loop

    classes = [ctx.dataset.class_of(item) for item in select_base_items(ctx)]
    names = sorted(set(classes))
    labels = torch.tensor([names.index(name) for name in classes])
    base = create_student(arch, len(names), image_size=ctx.config.data.resolution)
    steps = config.base_init_steps
    settings = replace(config, sources=("support",), iterations=steps, lr_drop_at=(3 * steps) // 4,
                       recipe="paper", eval_every=steps, checkpoint_every=max(steps // 4, 1),
                       seed=stage_seed(config.seed, "base-init", arch) % (2**31))
    distill_loop(base, {"support": DistillSource(labels, images=_base_tensor(ctx))}, settings, folder,
                 progress=True, student_meta={"arch": arch, "num_classes": len(names), "classes": names})
    student.backbone.load_state_dict(base.backbone.state_dict())


def student_label(ctx: RunContext, episode: EpisodeData, s: int, repeat: int = 0) -> str:
    """How logs and hooks name a student: ep000/with-tint (/r1 ...)."""
    return f"{episode.label}/{ctx.config.students[s].name}" + (f"/r{repeat}" if repeat else "")


def _distill_sources(ctx: RunContext, episode: EpisodeData, wanted: tuple[str, ...],
                     labels: Artifact | None, synthetic: list[list[str]]) -> dict:
    """The student's sources: supports with their labels; base and synthetic images with
    the label artifact's probabilities, or unlabelled without one (consistent recipe)."""
    from tint.students.distill import DistillSource

    sources = {}
    if "support" in wanted:
        items, targets = episode.support_items()
        sources["support"] = DistillSource(torch.tensor(targets), images=ctx.dataset.load_tensor(items))
    if "synthetic" in wanted:
        flat = [p for paths in synthetic for p in paths]
        if flat:
            probs = None if labels is None else read_labels(labels, "synthetic")
            sources["synthetic"] = DistillSource(probs, images=_load_generated(ctx)(flat))
    if "base" in wanted and episode.base:
        probs = None if labels is None else read_labels(labels, "base")
        sources["base"] = DistillSource(probs, images=_base_tensor(ctx))
    return sources


def online_teacher(ctx: RunContext, episode: EpisodeData, trained: Artifact, size: int | None):
    """The episode's fitted teacher as a function of a batch (consistent recipe)."""
    items, labels = episode.support_items()
    return fitted_teacher(ctx, episode, trained).online(ctx.dataset.load_tensor(items), torch.tensor(labels), size)


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


# ----------------------------------------------------------------------------- evaluate, export


def evaluation_key(ctx: RunContext, episode: EpisodeData, student_folders: list[list[Path]]) -> dict:
    """Keyed on the teacher and each student's artifact folder(s) (one per repeat)."""
    students: dict[str, Any] = {}
    for student, folders in zip(ctx.config.students, student_folders, strict=True):
        names = [f.name for f in folders]
        students[student.name] = names[0] if len(names) == 1 else names
    key = {"teacher": teacher_key(ctx), "students": students, "episode": episode.key}
    if ctx.config.distill.consistent:  # + the online teacher's own accuracy (its size, precision)
        key["online_teacher"] = {"size": ctx.config.distill.teacher_size, "bf16": ctx.config.distill.bf16}
    return key


ONLINE_TEACHER = "teacher-online"  # the consistent recipe's teacher, as the student saw it


def online_teacher_accuracy(ctx: RunContext, episode: EpisodeData, trained: Artifact, images: torch.Tensor,
                            labels: torch.Tensor) -> float:
    """Query accuracy of the teacher at `distill.teacher_size` in the student's precision:
    the teacher a consistent student learnt from (the gap to it is what distillation lost)."""
    from tint.students.distill import teacher_probabilities

    config = ctx.config.distill
    teacher = online_teacher(ctx, episode, trained, config.teacher_size)
    device_config = replace(config, device=str(ctx.device))
    predictions = torch.cat([teacher_probabilities(teacher, images[i:i + 256].to(ctx.device), device_config,
                                                   ctx.precision).argmax(1).cpu()
                             for i in range(0, len(images), 256)])
    return float((predictions == labels).float().mean())


def evaluate(ctx: RunContext, episode: EpisodeData, folder: Path, teacher: Artifact,
             students: list[list[Artifact]]) -> dict:
    """Teacher and student accuracy on this episode's queries (students: each student's
    repeats). A student with repeats scores the mean of its repeats (each kept in `repeats`)."""
    from tint.students.distill import load_student

    images, labels = _query_tensor(ctx, episode)
    model = fitted_teacher(ctx, episode, teacher)
    items, _ = episode.query_items()
    accuracy = {"teacher": float((model.predict_proba(images, ids=items).argmax(1).cpu() == labels)
                                 .float().mean())}
    if ctx.config.distill.consistent:
        accuracy[ONLINE_TEACHER] = online_teacher_accuracy(ctx, episode, teacher, images, labels)
    curves, repeats = {}, {}
    for student, trained in zip(ctx.config.students, students, strict=True):
        scores = []
        for artifact in trained:
            model, _meta = load_student(artifact.folder / artifact.marker["weights"])
            scores.append(_accuracy(model.to(ctx.device), images.to(ctx.device), labels.to(ctx.device)))
            curves.setdefault(student.name, artifact.marker.get("curve", []))
        accuracy[student.name] = sum(scores) / len(scores)
        repeats[student.name] = scores
    write_json(folder / "evaluation.json", {"accuracy": accuracy, "repeats": repeats,
                                             "n_query": len(labels), "curves": curves})
    return {"accuracy": accuracy, "repeats": repeats, "curves": curves}


def export_key(ctx: RunContext, student_folder: Path) -> dict:
    # Keyed by the student's artifact (not its absolute path): the same export wherever
    # the store is mounted (a cluster's driver and workers, a moved run dir).
    return {"student": student_folder.name, "onnx": ctx.config.export.onnx}


def export(ctx: RunContext, folder: Path, student: Artifact) -> dict:
    """TorchScript + ONNX of a student (its first repeat), checked by onnxruntime; on CPU."""
    from tint.export import export_student
    from tint.students.distill import load_student

    model, meta = load_student(student.folder / "student.safetensors")
    report = export_student(model.cpu(), folder, int(meta.get("image_size") or ctx.config.data.resolution),
                            onnx=ctx.config.export.onnx)
    return {"export": report}
