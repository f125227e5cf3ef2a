"""`tint run [CONFIG]`: every stage of the method for one or many episodes, resumable.

Data flow per episode (docs/pipeline.md has the run-directory layout)::

    prepare      support / query / base item lists, support PNGs     episodes/epNNN/
    specialise   one artifact per class (TI + NTI for "tint")         artifacts/specialize/
    generate     synthetic images + manifest per class                artifacts/generate/
    teacher      meta-trained once per run (cached), fit per episode  artifacts/teacher/
    pseudo-label soft teacher labels for base + synthetic images      artifacts/pseudo/
    distill      one student per `students:` entry, checkpointed      artifacts/distill/
    evaluate     teacher and student accuracy on the queries          episodes/epNNN/
    export       TorchScript + ONNX of each student                   export/
    report       report.html + PNGs, results.json, per-model results  run dir

Every stage is a function of (settings, input artifacts). Keyed stages live under
``artifacts/<stage>/<hash of everything they depend on>/``, so a changed setting never
reuses a stale artifact and `tint experiment` can share one artifact store between many
runs (one specialisation serves every generation setting). A stage is complete when its
``done.json`` marker exists; the marker is written atomically after the stage's own
outputs, so a run killed anywhere redoes at most the stage it was in, and the
sub-stages that checkpoint themselves (generation per image, distillation per
checkpoint) not even that. Each stage is seeded from (run seed, stage, key) before it
starts, so skipping finished stages on a resume cannot change the random numbers the
remaining ones draw: a resumed run ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tint.config import RunConfig, StudentConfig, dump_config, load_config, save_resolved
from tint.errors import TintError
from tint.io import folder_lock, read_json, set_threads, write_json

DONE = "done.json"
LOGGER = logging.getLogger("tint")
STAGES = (
    "prepare", "specialize", "generate", "teacher", "pseudo-label",
    "distill", "evaluate", "export", "report",
)


class NonFiniteError(TintError):
    """A loss or output became NaN/inf; the message names the stage."""


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="run config (YAML); default: the embedded demo (tint/configs/demo.yaml)")
    parser.add_argument("--run-dir", default=None, help="where results go (default: the config's run_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set distill.iterations=200 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config and exit without running")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.run_dir is not None:
        config.run_dir = str(args.run_dir)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("tint: %(message)s"))
    LOGGER.addHandler(console)
    try:
        results = run_pipeline(config)
    finally:
        LOGGER.removeHandler(console)
    print("\n".join(_summary_lines(results)))
    print(f"report: {Path(config.run_dir) / 'report.html'}")
    return 0


def _summary_lines(results: dict) -> list[str]:
    from tint.report import summary_lines

    return summary_lines(results)


# ----------------------------------------------------------------------------- run context


@dataclass
class RunContext:
    """What every stage can see: the config, where things go, lazily loaded models."""

    config: RunConfig
    run_dir: Path
    store: Path  # keyed artifacts; `tint experiment` shares one store between runs
    hooks: dict[str, Callable[..., None]] = field(default_factory=dict)  # tests inject faults
    markers: dict[str, dict] = field(default_factory=dict)  # stage markers this run used
    cache: dict[str, Any] = field(default_factory=dict)  # models and tensors loaded once

    def cached(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self.cache:
            self.cache[name] = make()
        return self.cache[name]

    @property
    def dataset(self):
        from tint.data.datasets import load_dataset

        return self.cached("dataset", lambda: load_dataset(
            self.config.data.dataset, resolution=self.config.data.resolution))


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


def run_stage(ctx: RunContext, stage: str, folder: Path, key: Any, label: str,
              work: Callable[[Path], dict | None],
              is_done: Callable[[dict], bool] | None = None) -> dict:
    """Run `work(folder)` unless `folder/done.json` says it is complete for `key`.

    Returns the marker: the key, the seconds the work took (kept from the first run
    across resumes) and whatever `work` returned.
    """
    marker = _finished_marker(ctx, stage, folder, key, label, is_done)
    if marker is not None:
        return marker
    # Another process sharing the store may be computing this very artifact: wait for
    # it, then look again (it is usually done by then).
    with folder_lock(folder, on_wait=lambda s: LOGGER.info(
            "%-12s %s: waited %.0f s for another process", stage, label, s)):
        marker = _finished_marker(ctx, stage, folder, key, label, is_done)
        if marker is not None:
            return marker
        return _compute_stage(ctx, stage, folder, key, label, work)


def _finished_marker(ctx: RunContext, stage: str, folder: Path, key: Any, label: str,
                     is_done: Callable[[dict], bool] | None) -> dict | None:
    marker_path = folder / DONE
    if marker_path.is_file():
        marker = read_json(marker_path)
        if marker.get("key") == _jsonable(key) and (is_done is None or is_done(marker)):
            LOGGER.info("%-12s %s: done, skipped", stage, label)
            ctx.markers[str(marker_path)] = marker
            return marker
    return None


def _compute_stage(ctx: RunContext, stage: str, folder: Path, key: Any, label: str,
                   work: Callable[[Path], dict | None]) -> dict:
    marker_path = folder / DONE
    LOGGER.info("%-12s %s: running", stage, label)
    seed_everything(stage_seed(ctx.config.seed, stage, key))
    if "*" in ctx.hooks:  # called for every stage that is computed (not skipped)
        ctx.hooks["*"](stage, label)
    if stage in ctx.hooks:
        ctx.hooks[stage](label)
    start = time.perf_counter()
    try:
        info = work(folder) or {}
    except NonFiniteError:
        raise
    except TintError as err:
        if _mentions_nan(str(err)):
            raise _nan_error(stage, label, ctx, str(err)) from err
        raise
    except (FloatingPointError, ValueError, RuntimeError) as err:
        if _mentions_nan(str(err)):
            raise _nan_error(stage, label, ctx, str(err)) from err
        raise
    seconds = time.perf_counter() - start
    marker = {"stage": stage, "label": label, "key": _jsonable(key), "seconds": seconds,
              "finished": datetime.now(UTC).isoformat(timespec="seconds"), **info}
    write_json(marker_path, marker)
    ctx.markers[str(marker_path)] = marker
    LOGGER.info("%-12s %s: finished in %.1f s", stage, label, seconds)
    return marker


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _mentions_nan(text: str) -> bool:
    return re.search(r"\bnan\b|\binf\b|infinity|non-finite|not finite", text.lower()) is not None


def _nan_error(stage: str, label: str, ctx: RunContext, detail: str) -> NonFiniteError:
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


# ----------------------------------------------------------------------------- top level


def run_pipeline(config: RunConfig, store: str | Path | None = None,
                 hooks: dict[str, Callable[..., None]] | None = None) -> dict:
    """Run (or resume) every stage of `config`; return the results dict (results.json)."""
    validate_components(config)  # before anything is written
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(config, run_dir, Path(store) if store else run_dir / "artifacts", dict(hooks or {}))
    handler = _attach_log(run_dir / "log.txt")
    try:
        set_threads(config.threads)
        save_resolved(config, run_dir / "config.yaml")
        LOGGER.info("tint run %s -> %s", config.name, run_dir)
        episodes = prepare(ctx)
        teacher_dir = train_teacher(ctx)
        evaluations = [run_episode(ctx, episode, teacher_dir) for episode in episodes]
        results = collect_results(ctx, episodes, evaluations)
        _write_model_results(ctx, results)
        if config.report.enabled:
            start = time.perf_counter()
            _write_report(ctx, results)
            results["timings"]["report"] = round(time.perf_counter() - start, 2)
        write_json(run_dir / "results.json", _public(results))
        LOGGER.info("results: %s", "; ".join(_summary_lines(results)[1:]))
        return results
    finally:
        LOGGER.removeHandler(handler)
        handler.close()


def _attach_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    return handler


def validate_components(config: RunConfig) -> None:
    """Check names and component settings before any work, each error naming its key."""
    from tint.generators import available_generators, create_generator
    from tint.generators.base import settings_from

    gen = config.generator
    if gen.name not in available_generators():
        raise TintError(f"generator.name: unknown generator {gen.name!r}; "
                        f"choose one of {', '.join(available_generators())}")
    try:
        module = create_generator(gen.name)
    except TintError as err:
        raise TintError(f"generator.name: {err}") from err
    for part, cls_name in (("specialize", "SpecializeSettings"), ("generate", "GenerateSettings")):
        cls = getattr(module, cls_name, None)
        values = getattr(gen, part)
        if cls is None:
            if values:
                raise TintError(f"generator.{part}: generator {gen.name!r} takes no settings here")
            continue
        try:
            settings_from(cls, values)
        except TintError as err:
            raise TintError(f"generator.{part}: {err}") from err
        except TypeError as err:
            raise TintError(f"generator.{part}: {err}") from err
    if gen.name != "none" and gen.backbone == "tint-clipart":
        from tint.diffusion.backbone import EMBEDDED_GENERATOR_DIR, SMALL_GENERATOR_MARKER

        if not (EMBEDDED_GENERATOR_DIR / SMALL_GENERATOR_MARKER).is_file():
            raise TintError(
                f"generator.backbone: the embedded generator 'tint-clipart' is missing from "
                f"{EMBEDDED_GENERATOR_DIR}; reinstall tint, or set generator.backbone to a "
                "generator folder (tint pretrain-generator) or a Stable Diffusion folder"
            )
    if config.teacher.name not in ("pmf", "labelhalluc"):
        raise TintError(f"teacher.name: unknown teacher {config.teacher.name!r}; choose pmf or labelhalluc")
    from tint.students.models import list_students

    for i, student in enumerate(config.students):
        if student.arch not in list_students():
            raise TintError(f"students[{i}].arch: unknown student {student.arch!r}; "
                            f"choose one of {', '.join(list_students())}")


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


def prepare(ctx: RunContext) -> list[EpisodeData]:
    """Episodes from the episode file (or sampled), the base pool, support PNGs."""
    episodes = _load_or_sample_episodes(ctx)
    base = select_base_items(ctx)
    prepared = []
    for index, episode in enumerate(episodes):
        folder = ctx.run_dir / "episodes" / f"ep{index:03d}"
        key = {
            "dataset": ctx.config.data.dataset,
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
    if ctx.config.teacher.meta_train.epochs > 0 and len(base_classes) < needed.n_way:
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


# ----------------------------------------------------------------------------- generator


def _generator_key(ctx: RunContext, spec_settings: Any) -> dict:
    gen = ctx.config.generator
    return {"name": gen.name, "backbone": gen.backbone, "weights": backbone_fingerprint(gen.backbone),
            "specialize": _settings_key(spec_settings, gen.specialize),
            "resolution": ctx.config.data.resolution}


def _settings_key(settings: Any, values: dict) -> dict:
    """Settings with every default filled in: a key must not tell `alpha: 1.0` (the
    default, written out) from no `alpha` at all, or equal cells would not share."""
    return values if settings is None else _jsonable(asdict(settings))


def backbone_fingerprint(spec: str) -> str | None:
    """A cheap identity of a local generator's weights (its config files and weight-file
    sizes), so that re-exported weights under the same name never reuse old artifacts."""
    from tint.diffusion.backbone import EMBEDDED_GENERATOR, EMBEDDED_GENERATOR_DIR

    folder = EMBEDDED_GENERATOR_DIR if spec == EMBEDDED_GENERATOR else Path(spec).expanduser()
    if not folder.is_dir():
        return None  # "tiny" (seeded), or a hub id
    parts = []
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".json":
            parts.append((str(path.relative_to(folder)), path.read_text()))
        elif path.suffix in (".safetensors", ".bin", ".pt", ".ckpt"):
            parts.append((str(path.relative_to(folder)), path.stat().st_size))
    return stable_hash(parts)


def _has_synthetic(ctx: RunContext) -> bool:
    gen = ctx.config.generator
    return gen.name != "none" and gen.images_per_class > 0


def _uses_synthetic(ctx: RunContext) -> bool:
    wanted = any("synthetic" in _student_sources(ctx, s) for s in ctx.config.students)
    return wanted and _has_synthetic(ctx)


def _backbone(ctx: RunContext, fresh: bool = False):
    """The generator's diffusion backbone: shared for generation, fresh for specialisation.

    Specialisation adds the class token to the tokenizer; a backbone that has already
    specialised other classes (or the same class for another episode) would give the new
    token another name and id, so the artifact would depend on which stages ran before
    in this process. A fresh backbone keeps each specialisation a function of its inputs,
    whatever was skipped on a resume.
    """
    from tint.diffusion.backbone import load_backbone

    spec = ctx.config.generator.backbone
    if fresh:
        return load_backbone(spec)
    return ctx.cached(f"backbone:{spec}", lambda: load_backbone(spec))


def specialize_and_generate(ctx: RunContext, episode: EpisodeData) -> list[list[str]]:
    """Per class: specialise, then generate; returns the synthetic image paths per class."""
    if not _uses_synthetic(ctx):
        return [[] for _ in episode.classes]
    from tint.generators import create_generator
    from tint.generators.base import manifest_paths

    gen_cfg = ctx.config.generator
    generator = create_generator(gen_cfg.name)
    spec_settings = _settings(generator, "SpecializeSettings", gen_cfg.specialize)
    gen_settings = _settings(generator, "GenerateSettings", gen_cfg.generate)
    generate_key = _settings_key(gen_settings, gen_cfg.generate)  # before the cache folder below
    generator_key = _generator_key(ctx, spec_settings)
    if getattr(gen_settings, "cache_dir", "unset") is None:
        # One feature cache per store (keyed inside by pool, scorer and resolution), not
        # one per class folder: mining 5 classes scores the pool once. Not part of the key.
        gen_settings = replace(gen_settings, cache_dir=str(ctx.store / "pool-features"))
    wanted = gen_cfg.images_per_class
    synthetic: list[list[str]] = []
    for c, name in enumerate(episode.classes):
        label = f"{episode.label}/c{c:02d}"
        spec_key = {**generator_key, "class": name, "support": episode.support[c],
                    "dataset": ctx.config.data.dataset}
        spec_dir = ctx.store / "specialize" / stable_hash(spec_key)

        def do_specialize(folder: Path, name=name, c=c) -> dict:
            support = ctx.dataset.load_tensor(episode.support[c])
            path = generator.specialize(_backbone(ctx, fresh=True), name, support, folder, spec_settings)
            return {"artifact": Path(path).name}

        spec_marker = run_stage(ctx, "specialize", spec_dir, spec_key, label, do_specialize)
        artifact = spec_dir / spec_marker["artifact"]

        gen_key = {"specialization": spec_key, "seed": gen_cfg.seed, "generate": generate_key}
        gen_dir = ctx.store / "generate" / stable_hash(gen_key)

        def do_generate(folder: Path, name=name, artifact=artifact, label=label) -> dict:
            made = len(generator.generate(_backbone(ctx), artifact, wanted, folder, gen_cfg.seed,
                                          gen_settings))
            if made < wanted and not getattr(generator, "MAY_RETURN_FEWER", False):
                raise TintError(f"stage generate ({label}): {gen_cfg.name} made {made} of {wanted} "
                                f"images in {folder}")
            # exhausted: a capped source (real-data mining) has no more for this key
            return {"n_images": made, "class": name, "exhausted": made < wanted}

        marker = run_stage(ctx, "generate", gen_dir, gen_key, label, do_generate,
                           is_done=lambda m, n=wanted: m.get("n_images", 0) >= n or m.get("exhausted", False))
        available = min(wanted, int(marker["n_images"]))
        paths = manifest_paths(gen_dir, name, available)
        if len(paths) < available:
            raise TintError(f"stage generate ({label}): {gen_dir} holds {len(paths)} of {available} images; "
                            f"delete {gen_dir / DONE} and run again")
        if available < wanted:
            LOGGER.info("%-12s %s: %s has %d of the %d images asked for", "generate", label,
                        gen_cfg.name, available, wanted)
        synthetic.append([str(p) for p in paths])
    return synthetic


def _settings(module: Any, cls_name: str, values: dict) -> Any:
    from tint.generators.base import settings_from

    cls = getattr(module, cls_name, None)
    return None if cls is None else settings_from(cls, values)


# ----------------------------------------------------------------------------- teacher


def _teacher_key(ctx: RunContext) -> dict:
    cfg = ctx.config.teacher
    key = {"name": cfg.name, "dataset": ctx.config.data.dataset,
           "resolution": ctx.config.data.resolution, "base_split": ctx.config.data.base_split,
           "settings": cfg.settings}
    if cfg.name == "pmf":
        key |= {"backbone": cfg.backbone, "meta_train": asdict(cfg.meta_train)}
    else:
        key |= {"arch": _labelhalluc_arch(ctx), "pretrain_iterations": cfg.pretrain_iterations,
                "base": select_base_items(ctx), "seed": ctx.config.seed}
    return key


def _labelhalluc_arch(ctx: RunContext) -> str:
    return ctx.config.teacher.arch or ctx.config.students[0].arch


def train_teacher(ctx: RunContext) -> Path:
    """Meta-train (pmf) or base-pretrain (labelhalluc) once per run; cached by its key."""
    key = _teacher_key(ctx)
    folder = ctx.store / "teacher" / stable_hash(key)
    run_stage(ctx, "teacher", folder, key, "meta-train", lambda f: _train_teacher(ctx, f))
    return folder


def _train_teacher(ctx: RunContext, folder: Path) -> dict:
    cfg = ctx.config.teacher
    if cfg.name == "labelhalluc":
        from tint.students.distill import DistillSource
        from tint.teachers.labelhalluc import pretrain_config, pretrain_on_base

        classes = ctx.dataset.classes(ctx.config.data.base_split)
        items = select_base_items(ctx)
        labels = torch.tensor([classes.index(ctx.dataset.class_of(i)) for i in items])
        source = DistillSource(labels, load=lambda idx: ctx.dataset.load_tensor([items[i] for i in idx]))
        iterations = cfg.pretrain_iterations
        pretrain_on_base(_labelhalluc_arch(ctx), source, folder,
                         pretrain_config(iterations, seed=ctx.config.seed),
                         image_size=ctx.config.data.resolution)
        return {"weights": "student.safetensors"}
    from tint.teachers import create_teacher
    from tint.teachers.protonet import DatasetEpisodeSampler, meta_train

    teacher = create_teacher("pmf", backbone=cfg.backbone, seed=ctx.config.seed,
                             batch_size=cfg.batch_size, **cfg.settings)
    mt = cfg.meta_train
    losses: list[float] = []
    if mt.epochs > 0 and mt.episodes_per_epoch > 0:
        sampler = DatasetEpisodeSampler(ctx.dataset, ctx.dataset.classes(ctx.config.data.base_split))
        losses = meta_train(teacher, sampler, epochs=mt.epochs, episodes_per_epoch=mt.episodes_per_epoch,
                            lr=mt.lr, weight_decay=mt.weight_decay, n_way=mt.n_way, k_shot=mt.k_shot,
                            n_query=mt.n_query, seed=mt.seed,
                            checkpoint_path=folder / "checkpoint.safetensors")
    teacher.save(folder / "teacher.safetensors", {"meta_train_losses": losses})
    return {"weights": "teacher.safetensors", "final_loss": losses[-1] if losses else None}


def load_teacher(ctx: RunContext, folder: Path):
    """The trained teacher, loaded once per process (its feature cache is shared)."""
    from tint.teachers import create_teacher

    cfg = ctx.config.teacher

    def make():
        if cfg.name == "labelhalluc":
            return create_teacher("labelhalluc", weights=folder / "student.safetensors", **cfg.settings)
        return create_teacher("pmf", backbone=cfg.backbone, weights=folder / "teacher.safetensors",
                              seed=ctx.config.seed, batch_size=cfg.batch_size, **cfg.settings)

    return ctx.cached(f"teacher:{folder}", make)


def fit_teacher(ctx: RunContext, episode: EpisodeData, teacher_dir: Path):
    """Prototypes (pmf) / logistic regression (labelhalluc) on this episode's support."""
    teacher = load_teacher(ctx, teacher_dir)
    if ctx.cache.get("teacher_fitted_for") != (str(teacher_dir), episode.index):
        items, labels = _support_items(episode)
        seed_everything(stage_seed(ctx.config.seed, "teacher-fit", episode.key))
        teacher.fit(ctx.dataset.load_tensor(items), torch.tensor(labels), ids=items)
        ctx.cache["teacher_fitted_for"] = (str(teacher_dir), episode.index)
    return teacher


def _support_items(episode: EpisodeData) -> tuple[list[str], list[int]]:
    items = [item for row in episode.support for item in row]
    labels = [c for c, row in enumerate(episode.support) for _ in row]
    return items, labels


def _query_items(episode: EpisodeData) -> tuple[list[str], list[int]]:
    items = [item for row in episode.query for item in row]
    labels = [c for c, row in enumerate(episode.query) for _ in row]
    return items, labels


# ----------------------------------------------------------------------------- pseudo-labels


def pseudo_label(ctx: RunContext, episode: EpisodeData, teacher_dir: Path,
                 synthetic: list[list[str]]) -> Path:
    """Soft teacher probabilities over the episode's classes for base + synthetic images."""
    from tint.io import save_tensors

    synthetic_flat = [p for paths in synthetic for p in paths]
    # Keyed by the images' place in the store, so a moved store keeps its keys.
    relative = [str(Path(p).relative_to(ctx.store)) for p in synthetic_flat]
    key = {"teacher": _teacher_key(ctx), "episode": episode.key, "synthetic": relative}
    folder = ctx.store / "pseudo" / stable_hash(key)
    label = episode.label

    def work(f: Path) -> dict:
        teacher = fit_teacher(ctx, episode, teacher_dir)
        base = _base_probabilities(ctx, episode, teacher)
        syn = _probabilities(ctx, teacher, synthetic_flat, _load_generated(ctx),
                             f / "synthetic_probs.safetensors")
        check_finite("pseudo-label", label, "teacher probabilities (base)", base)
        check_finite("pseudo-label", label, "teacher probabilities (synthetic)", syn)
        save_tensors(f / "pseudo_labels.safetensors", {"base": base, "synthetic": syn},
                     {"classes": episode.classes, "base_items": episode.base,
                      "synthetic_items": relative})
        return {"n_base": len(base), "n_synthetic": len(syn)}

    run_stage(ctx, "pseudo-label", folder, key, label, work)
    return folder / "pseudo_labels.safetensors"


def _base_probabilities(ctx: RunContext, episode: EpisodeData, teacher) -> torch.Tensor:
    """Base-image labels depend on the teacher and the episode only, not on the synthetic
    set: one file per (teacher, episode) serves every generator of an experiment."""
    folder = ctx.store / "pseudo-base" / stable_hash({"teacher": _teacher_key(ctx), "episode": episode.key})
    with folder_lock(folder):
        return _probabilities(ctx, teacher, episode.base, ctx.dataset.load_tensor,
                              folder / "base_probs.safetensors")


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


def distill_student(ctx: RunContext, episode: EpisodeData, student_cfg: StudentConfig,
                    pseudo_path: Path, synthetic: list[list[str]]) -> Path:
    """Distil one student for this episode; resumes from its own checkpoints."""
    from tint.io import load_tensors

    config = _distill_config(ctx, student_cfg)
    key = {"pseudo": str(pseudo_path.parent.name), "arch": student_cfg.arch,
           "distill": asdict(config), "episode": episode.key}
    folder = ctx.store / "distill" / stable_hash(key)
    label = f"{episode.label}/{student_cfg.name}"

    def work(f: Path) -> dict:
        from tint.students import create_student
        from tint.students.distill import distill

        labels, _ = load_tensors(pseudo_path)
        sources = _distill_sources(ctx, episode, labels, synthetic, config.sources)
        query = _query_tensor(ctx, episode)
        student = create_student(student_cfg.arch, episode.n_way, image_size=ctx.config.data.resolution)
        hook = ctx.hooks.get("distill-step")
        result = distill(
            student, sources, config, f, eval_fn=lambda m: _accuracy(m, *query),
            progress=True, on_step=(lambda step, loss: hook(label, step, loss)) if hook else None,
            student_meta={"arch": student_cfg.arch, "num_classes": episode.n_way,
                          "image_size": ctx.config.data.resolution, "classes": episode.classes},
        )
        curve = [[e["step"], e["accuracy"]] for e in result.history if "accuracy" in e]
        return {"weights": result.final_path.name, "curve": curve}

    run_stage(ctx, "distill", folder, key, label, work)
    return folder


def _student_sources(ctx: RunContext, student_cfg: StudentConfig) -> tuple[str, ...]:
    """A student's own `sources`, else `distill.sources`."""
    if student_cfg.sources is not None:
        return tuple(student_cfg.sources)
    return tuple(ctx.config.distill.sources)


def _distill_config(ctx: RunContext, student_cfg: StudentConfig):
    config = ctx.config.distill
    sources = _student_sources(ctx, student_cfg)
    if not _has_synthetic(ctx):  # no synthetic images: the same student as `generator: none`
        sources = tuple(s for s in sources if s != "synthetic")
    return replace(config, sources=sources, seed=stage_seed(config.seed, "distill", student_cfg.name) % (2**31))


def _distill_sources(ctx: RunContext, episode: EpisodeData, labels: dict, synthetic: list[list[str]],
                     wanted: tuple[str, ...]) -> dict:
    from tint.students.distill import DistillSource

    sources = {}
    if "support" in wanted:
        items, targets = _support_items(episode)
        sources["support"] = DistillSource(torch.tensor(targets), images=ctx.dataset.load_tensor(items))
    if "base" in wanted and len(labels["base"]):
        sources["base"] = DistillSource(labels["base"], images=_base_tensor(ctx))
    flat = [p for paths in synthetic for p in paths]
    if "synthetic" in wanted and flat:
        sources["synthetic"] = DistillSource(labels["synthetic"], images=_load_generated(ctx)(flat))
    return sources


def _base_tensor(ctx: RunContext) -> torch.Tensor:
    """Base images in memory once per process (shared by every episode and student)."""
    return ctx.cached("base_images", lambda: ctx.dataset.load_tensor(select_base_items(ctx)))


def _query_tensor(ctx: RunContext, episode: EpisodeData) -> tuple[torch.Tensor, torch.Tensor]:
    def make():
        items, labels = _query_items(episode)
        return ctx.dataset.load_tensor(items), torch.tensor(labels)

    return ctx.cached(f"query:{episode.index}", make)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    from tint.evaluation.evaluate import evaluate_on_episode

    model.eval()
    return evaluate_on_episode(model, images, labels)


# ----------------------------------------------------------------------------- evaluate, export


def evaluate_episode(ctx: RunContext, episode: EpisodeData, teacher_dir: Path,
                     students: dict[str, Path]) -> dict:
    """Teacher and student accuracy on this episode's queries (episodes/epNNN/evaluation.json)."""
    key = {"teacher": _teacher_key(ctx), "students": {n: p.name for n, p in students.items()},
           "episode": episode.key}

    def work(f: Path) -> dict:
        from tint.students.distill import load_student

        images, labels = _query_tensor(ctx, episode)
        teacher = fit_teacher(ctx, episode, teacher_dir)
        items, _ = _query_items(episode)
        accuracy = {"teacher": float((teacher.predict_proba(images, ids=items).argmax(1) == labels)
                                     .float().mean())}
        curves = {}
        for name, folder in students.items():
            model, _meta = load_student(folder / "student.safetensors")
            accuracy[name] = _accuracy(model, images, labels)
            curves[name] = read_json(folder / DONE).get("curve", [])
        write_json(f / "evaluation.json", {"accuracy": accuracy, "n_query": len(labels), "curves": curves})
        return {"accuracy": accuracy, "curves": curves}

    folder = episode.folder / "evaluate"
    return run_stage(ctx, "evaluate", folder, key, episode.label, work)


def export_students(ctx: RunContext, episode: EpisodeData, students: dict[str, Path]) -> None:
    """TorchScript + ONNX of each student, checked against torch by onnxruntime."""
    for name, folder in students.items():
        weights = folder / "student.safetensors"
        key = {"weights": str(weights), "onnx": ctx.config.export.onnx}
        out = ctx.run_dir / "export" / episode.label / name
        run_stage(ctx, "export", out, key, f"{episode.label}/{name}",
                  lambda f, w=weights: _export(ctx, w, f))


def _export(ctx: RunContext, weights: Path, folder: Path) -> dict:
    from tint.export import export_student
    from tint.students.distill import load_student

    model, meta = load_student(weights)
    report = export_student(model, folder, int(meta.get("image_size") or ctx.config.data.resolution),
                            onnx=ctx.config.export.onnx)
    return {"export": report}


# ----------------------------------------------------------------------------- episode


def run_episode(ctx: RunContext, episode: EpisodeData, teacher_dir: Path) -> dict:
    synthetic = specialize_and_generate(ctx, episode)
    pseudo = pseudo_label(ctx, episode, teacher_dir, synthetic)
    students = {s.name: distill_student(ctx, episode, s, pseudo, synthetic) for s in ctx.config.students}
    evaluation = evaluate_episode(ctx, episode, teacher_dir, students)
    if ctx.config.export.enabled:
        export_students(ctx, episode, students)
    return {**evaluation, "synthetic": synthetic}


# ----------------------------------------------------------------------------- results


def collect_results(ctx: RunContext, episodes: list[EpisodeData], evaluations: list[dict]) -> dict:
    from tint.evaluation.stats import mean_ci

    models = ["teacher"] + [s.name for s in ctx.config.students]
    rows = []
    for episode, evaluation in zip(episodes, evaluations, strict=True):
        support_png = read_json(episode.folder / DONE)["support_png"]
        rows.append({
            "index": episode.index,
            "classes": episode.classes,
            "n_query": sum(len(q) for q in episode.query),
            "accuracy": evaluation["accuracy"],
            "curves": evaluation.get("curves", {}),
            "support": [[str(ctx.run_dir / p) for p in row] for row in support_png],
            "generated": [paths[: ctx.config.report.grid_images] for paths in evaluation["synthetic"]],
            "_synthetic": evaluation["synthetic"],  # every path; not written to results.json
        })
    summary = {}
    for model in models:
        accs = [row["accuracy"][model] for row in rows]
        mean, ci = mean_ci(accs)
        summary[model] = {"mean": mean, "ci": ci, "n": len(accs)}
    return {"name": ctx.config.name, "models": models, "episodes": rows, "summary": summary,
            "timings": stage_timings(ctx)}


def _public(results: dict) -> dict:
    """results without the private (underscore) keys of its episode rows."""
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in results["episodes"]]
    return {**results, "episodes": rows}


def stage_timings(ctx: RunContext) -> dict[str, float]:
    """Seconds per stage over the markers this run used (time of the first computation)."""
    totals = dict.fromkeys(STAGES, 0.0)
    for marker in ctx.markers.values():
        totals[marker["stage"]] = totals.get(marker["stage"], 0.0) + float(marker.get("seconds", 0.0))
    return {stage: round(seconds, 2) for stage, seconds in totals.items()}


def _write_model_results(ctx: RunContext, results: dict) -> None:
    """One tint evaluation result file per model (readable by `tint plan --from-results`)."""
    from tint.evaluation.evaluate import EvaluationResult, save_result

    for model in results["models"]:
        accs = [row["accuracy"][model] for row in results["episodes"]]
        queries = [row["n_query"] for row in results["episodes"]]
        result = EvaluationResult.from_accuracies(f"{ctx.config.name}/{model}", accs, queries,
                                                  meta={"run_dir": str(ctx.run_dir)})
        save_result(ctx.run_dir / "results" / f"{model}.json", result)


def _write_report(ctx: RunContext, results: dict) -> None:
    from tint.report import write_report

    write_report(ctx.run_dir, results, dump_config(ctx.config), ctx.config.report.grid_images)
