"""`tint fit`: a folder of labelled photos -> a tiny classifier anyone can run.

``DATA_DIR/<class>/<images>`` (2+ classes, 1+ images each) goes through the same units
of work as `tint run` (tint.pipeline.run_units over the stage table: specialise, generate,
teacher, pseudo-label, distil, export), in one episode whose support set is every labelled image. The data
flow, top to bottom::

    1. read the labelled folder          classes, images, one SHA-256 over all of them
    2. snapshot it into MODEL_DIR/work   content-named copies + the unlabelled pool,
                                         pre-rendered at the training resolution
    3. the pipeline's units              teacher, specialize/generate per class,
                                         label-base, pseudo-label, distill, export
    4. estimate                          honest accuracy figures without a test set
    5. the model folder                  model.onnx, model.pt, labels.json,
                                         MODEL_CARD.md, report.html

Every unit is keyed and resumable as in `tint run` (the store is MODEL_DIR/work), so a
killed fit is resumed by running the same command, and a finished one computes nothing.
Design decisions (no query set, what the estimates are, the one-image classes) are in
docs/fit.md.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from tint.errors import TintError
from tint.model_folder import claim_model_folder
from tint.predict import IMAGE_SUFFIXES, LABELS_FILE, labels_document
from tint.predict import file_sha256 as streamed_sha256

FIT_CONFIG = "fit.yaml"  # packaged under tint/configs/
POOL_PREFIX = "_pool_"  # class folders of the unlabelled pool inside the snapshot
HELD_OUT_GENERATED = 8  # generated images per class the student never sees (agreement)
HELD_OUT_UNLABELED = 60  # unlabelled images the student never sees (agreement)
MIN_UNLABELED_TO_HOLD_OUT = 10  # fewer --unlabeled images than this: all are used to train
SUPPORT_FIT, SUPPORT_CROP_ALPHA = "crop", False  # how `folder:` datasets load photos


# ----------------------------------------------------------------------------- 1. the labelled folder


@dataclass
class LabelledImages:
    """``root/<class>/<images>``: class names in sorted order and their image files."""

    root: Path
    classes: list[str]
    files: dict[str, list[Path]]

    def counts(self) -> dict[str, int]:
        return {c: len(self.files[c]) for c in self.classes}

    def sha256(self) -> str:
        """One SHA-256 over (class, SHA-256 of each image's bytes), sorted: the data's identity."""
        digest = hashlib.sha256()
        for name in self.classes:
            for sha in sorted(file_sha256(p) for p in self.files[name]):
                digest.update(f"{name}\t{sha}\n".encode())
        return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def read_labelled_folder(root: str | Path, what: str = "DATA_DIR") -> LabelledImages:
    """Check the layout before any work; each error names the folder and the fix."""
    root = Path(root)
    if not root.is_dir():
        raise TintError(f"{root}: {what} not found (expected a folder of <class>/<images>)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: dict[str, list[Path]] = {}
    for folder in folders:
        if folder.name.startswith(POOL_PREFIX):
            raise TintError(f"{folder}: class names starting with {POOL_PREFIX!r} are reserved; rename it")
        found = image_files(folder)
        if not found:
            raise TintError(f"{folder}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "add images or remove the folder")
        files[folder.name] = found
    if len(files) < 2:
        raise TintError(f"{root}: {what} needs at least 2 class folders (<class>/<images>), "
                        f"found {len(files)}{': ' + ', '.join(files) if files else ''}")
    lowered = {}
    for name in files:
        if name.casefold() in lowered:
            raise TintError(f"{root}: class folders {lowered[name.casefold()]!r} and {name!r} differ "
                            "only in case; merge or rename one")
        lowered[name.casefold()] = name
    return LabelledImages(root, sorted(files), files)


def check_images_decode(images: LabelledImages) -> None:
    """A training image that does not decode is an error (not skipped): it was meant to teach."""
    from tint.data.images import open_image

    for name in images.classes:
        for path in images.files[name]:
            open_image(path)  # raises TintError naming the file


# ----------------------------------------------------------------------------- 2. the snapshot


@dataclass
class Snapshot:
    """The training data as the pipeline reads it: a `folder:` dataset inside the work dir."""

    data_root: Path  # <class>/<s-sha>.<ext>, <class>/<q-sha>.<ext>, _pool_*/*.png, splits.json
    classes: list[str]
    support: list[list[str]]  # item ids relative to data_root
    query: list[list[str]]  # the same images again under other names (see docs/fit.md)
    pool: str  # what the unlabelled pool is, in words
    held_out_unlabeled: list[Path]
    held_out_what: str = "held-out unlabelled images"  # what those are, in words


def snapshot_labelled(images: LabelledImages, data_root: Path) -> tuple[list[list[str]], list[list[str]]]:
    """Copy each image under a content name: a changed image is a new item, so a new key."""
    from tint.io import atomic_path

    support, query = [], []
    for name in images.classes:
        row_s, row_q = [], []
        for path in images.files[name]:
            sha = file_sha256(path)[:20]
            for prefix, row in (("s", row_s), ("q", row_q)):
                target = data_root / name / f"{prefix}-{sha}{path.suffix.lower()}"
                if not target.is_file():
                    with atomic_path(target) as tmp:
                        shutil.copyfile(path, tmp)
                if target.relative_to(data_root).as_posix() not in row:
                    row.append(target.relative_to(data_root).as_posix())
        support.append(sorted(row_s))
        query.append(sorted(row_q))
    return support, query


def render_pool(items: dict[str, list[Path | str]], load, data_root: Path) -> list[Path]:
    """Unlabelled images pre-rendered at the training resolution (`load`: item -> PIL image);
    returns the rendered files."""
    from tint.io import atomic_path

    rendered = []
    for folder, refs in items.items():
        for ref in refs:
            target = data_root / folder / f"{pool_name(ref)}.png"
            if not target.is_file():
                with atomic_path(target) as tmp:
                    load(ref).save(tmp, format="PNG")
            rendered.append(target)
    return rendered


def pool_name(ref: Path | str) -> str:
    """A pool image's name in the snapshot: a file by its content (a moved --unlabeled
    folder keeps its names, hence its keys), a dataset item by its id."""
    text = streamed_sha256(ref) if isinstance(ref, Path) else hashlib.sha256(ref.encode()).hexdigest()
    return text[:20]


def openclipart_pool(config, data_root: Path, holdout_dir: Path) -> tuple[str, list[Path], list[Path]]:
    """The embedded pool: openclipart base classes (capped per class) for distillation, and
    images of its *val* classes (never trained on) held out for the agreement estimate.
    Returns what the pool is in words, the held-out files and the pool's files."""
    from tint.data.openclipart import load_openclipart

    dataset = load_openclipart(resolution=config.data.resolution)
    cap = config.data.base_images_per_class
    rng = random.Random(config.data.episode_seed)
    chosen: dict[str, list[str]] = {}
    for name in dataset.classes("base"):
        pool = sorted(dataset.items[name])
        rng.shuffle(pool)
        chosen[POOL_PREFIX + name] = pool if cap is None else pool[:cap]
    pool_files = render_pool(chosen, dataset.load, data_root)
    val_items = sorted(i for c in dataset.classes("val") for i in dataset.items[c])
    rng.shuffle(val_items)
    held = render_pool({"openclipart-val": val_items[:HELD_OUT_UNLABELED]}, dataset.load, holdout_dir)
    n = sum(len(v) for v in chosen.values())
    return (f"the embedded openclipart base pool ({len(chosen)} clip-art classes, {n} images; "
            "no --unlabeled folder was given)"), sorted(held), pool_files


def user_pool(folder: Path, config, data_root: Path,
              holdout_dir: Path) -> tuple[str, list[Path], list[Path]]:
    """--unlabeled DIR: every image under it (walked), cropped like the photos; every fifth
    (in content order) held out for the agreement estimate when there are enough."""
    from tint.data.images import load_image
    from tint.predict import find_images

    if not folder.is_dir():
        raise TintError(f"--unlabeled {folder}: folder not found")
    files = find_images([folder])
    if len(files) < config.data.min_base_images:
        raise TintError(f"--unlabeled {folder}: {len(files)} images found; distillation needs at least "
                        f"{config.data.min_base_images} (data.min_base_images): add images")
    by_sha = sorted((file_sha256(p), p) for p in files)
    hold = len(by_sha) >= MIN_UNLABELED_TO_HOLD_OUT
    held = [p for i, (_, p) in enumerate(by_sha) if hold and i % 5 == 4][:HELD_OUT_UNLABELED]
    train = [p for _, p in by_sha if p not in held]

    def load(path):
        return load_image(path, config.data.resolution, fit=SUPPORT_FIT, crop_alpha=SUPPORT_CROP_ALPHA)

    pool_files = render_pool({POOL_PREFIX + "unlabeled": list(train)}, load, data_root)
    rendered = sorted(render_pool({"unlabeled": list(held)}, load, holdout_dir))
    return (f"your unlabelled images ({folder}: {len(train)} used, {len(held)} held out)", rendered,
            pool_files)


def make_snapshot(images: LabelledImages, config, work: Path, unlabeled: Path | None) -> Snapshot:
    from tint.io import write_json

    data_root = work / f"data-r{config.data.resolution}"
    holdout_dir = work / f"holdout-r{config.data.resolution}"
    support, query = snapshot_labelled(images, data_root)
    if unlabeled is None:
        pool, held, pool_files = openclipart_pool(config, data_root, holdout_dir)
        what = "held-out openclipart images of other classes (its val split)"
    else:
        pool, held, pool_files = user_pool(Path(unlabeled), config, data_root, holdout_dir)
        what = "held-out images of your --unlabeled folder"
    labelled = {data_root / item for rows in (support, query) for row in rows for item in row}
    prune_snapshot(data_root, holdout_dir, labelled | set(pool_files) | set(held) | {data_root / "splits.json"})
    pool_classes = sorted(p.name for p in data_root.iterdir() if p.is_dir() and p.name.startswith(POOL_PREFIX))
    write_json(data_root / "splits.json", {"base": pool_classes, "val": [], "novel": images.classes,
                                           "how": "written by tint fit"})
    return Snapshot(data_root, images.classes, support, query, pool, held, what)


def prune_snapshot(data_root: Path, holdout_dir: Path, keep: set[Path]) -> None:
    """Remove what an earlier fit into this folder left in the snapshot (images since removed
    from DATA_DIR, another --unlabeled pool): the snapshot then holds exactly this fit's
    data, so its content hash, the pool and the keys depend on the data, not on history."""
    for root in (data_root, holdout_dir):
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"), reverse=True):  # files before their folders
            if path.is_file() and path not in keep and not path.name.startswith("."):
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


# ----------------------------------------------------------------------------- config


def fit_config_text() -> str:
    return resources.files("tint").joinpath("configs", FIT_CONFIG).read_text()


def load_fit_config(config: str | Path | None, overrides: Sequence[str], work: Path,
                    unlabeled: Path | None):
    """The embedded fit config (or CONFIG), --set overrides, then what fit itself decides."""
    import yaml

    from tint.config import apply_override, config_from_dict, read_yaml

    data = yaml.safe_load(fit_config_text()) if config is None else read_yaml(config)
    for assignment in overrides:
        data = apply_override(data or {}, assignment)
    resolved = config_from_dict(data or {})
    if not resolved.export.onnx:
        raise TintError("export.onnx: false, but the model folder's model is model.onnx (what "
                        "tint predict runs, and what labels.json records); leave it true")
    if unlabeled is not None:
        if resolved.teacher.meta_train.epochs > 0:
            raise TintError("teacher.meta_train.epochs: meta-training needs labelled base classes, "
                            "and --unlabeled images have none; set it to 0 or drop --unlabeled")
        resolved = replace(resolved, data=replace(resolved.data, min_base_classes=1))
    return replace(resolved, run_dir=str(work))


def with_snapshot(config, snapshot: Snapshot, episode_file: Path):
    """Point the config at the snapshot and its one episode. The keys name the snapshot by
    its content (`data.dataset_key`), not by the folder it lies in: a moved model folder,
    or --out spelt relative or absolute, reuses every artifact and gives the same model."""
    data = replace(config.data, dataset=f"folder:{snapshot.data_root}",
                   dataset_key=f"tint-fit-snapshot:{snapshot_sha256(snapshot.data_root)}",
                   episodes=str(episode_file), first_episodes=None, base_split="base",
                   base_images_per_class=None)
    return replace(config, data=data)


def snapshot_sha256(data_root: Path) -> str:
    """SHA-256 over every snapshot file's path (inside the snapshot) and content."""
    digest = hashlib.sha256()
    for path in sorted(p for p in data_root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.relative_to(data_root).as_posix()}\t{streamed_sha256(path)}\n".encode())
    return digest.hexdigest()


def episode_config(cfg, images: LabelledImages, snapshot: Snapshot, work: Path):
    """Write the one episode (support = every labelled image) and the resolved config."""
    from tint.config import dump_config
    from tint.data.episodes import Episode, save_episodes
    from tint.io import write_text

    episode_file = work / "episode.json"
    save_episodes(episode_file, [Episode(images.classes, snapshot.support, snapshot.query)],
                  {"dataset": f"folder:{snapshot.data_root}", "how": "tint fit: every labelled image"})
    cfg = with_snapshot(cfg, snapshot, episode_file)
    write_text(work / "config.yaml", dump_config(cfg))
    return cfg


# ----------------------------------------------------------------------------- 3. the pipeline


def run_fit_units(config):
    """`tint run`'s steps 2-4 on the fit's one episode, without `evaluate` (there is no
    query set); the fit's own stages follow."""
    from tint.pipeline import LOGGER, run_units, validate_components
    from tint.stage_bodies import make_context
    from tint.stages import units_without_queries

    validate_components(config)
    ctx = make_context(config)
    LOGGER.info("tint fit -> %s (device %s)", ctx.run_dir, ctx.device)
    episodes = run_units(ctx, units_without_queries)
    return ctx, episodes[0]


# ----------------------------------------------------------------------------- 4. estimates


def estimate(ctx, episode, snapshot: Snapshot, val: LabelledImages | None, folds: int = 0) -> dict:
    """The `estimate` stage: keyed like any unit, so a rerun reuses it."""
    from tint.engine import run_stage
    from tint.stages import generation_folder, student_location, teacher_key

    held_ctx = held_out_context(ctx)
    key = {
        "teacher": teacher_key(ctx), "student": student_location(ctx, episode, 0)[1],
        "held_out_generated": [generation_folder(held_ctx, episode, c).name
                               for c in range(episode.n_way)] if has_generator(ctx) else [],
        "held_out_unlabeled": [p.name for p in snapshot.held_out_unlabeled],
        "val": val.sha256() if val is not None else None,
        **({"folds": folds} if folds else {}),  # absent when off: earlier estimates keep their key
    }
    return run_stage(ctx, "estimate", ctx.run_dir / "estimate", key, episode.label,
                     lambda folder: compute_estimates(ctx, held_ctx, episode, snapshot, val, folds))


def has_generator(ctx) -> bool:
    from tint.stage_bodies import uses_synthetic

    return uses_synthetic(ctx)


def held_out_context(ctx):
    """Same specialisations, another generation seed: images the student never saw."""
    from tint.stage_bodies import make_context

    gen = replace(ctx.config.generator, seed=ctx.config.generator.seed + 1_000_003,
                  images_per_class=HELD_OUT_GENERATED)
    held = make_context(replace(ctx.config, generator=gen), ctx.store)
    held.cache.update({k: v for k, v in ctx.cache.items() if k in ("dataset", "base_items")})
    return held


def compute_estimates(ctx, held_ctx, episode, snapshot: Snapshot, val: LabelledImages | None,
                      folds: int = 0) -> dict:
    from tint.cross_validation import cross_validate
    from tint.stages import fitted_teacher, synthetic_paths

    teacher = fitted_teacher(ctx, episode)
    student = load_fitted_student(ctx, episode)
    out = {"teacher_leave_one_out": teacher_leave_one_out(ctx, teacher, episode)}
    ctx.cache["teacher_fitted_for"] = None  # LOO refitted it: refit on every image below
    teacher = fitted_teacher(ctx, episode)
    generated = [p for paths in synthetic_paths(held_ctx, episode) for p in paths] if has_generator(ctx) else []
    out["agreement_generated"] = agreement(ctx, teacher, student, generated)
    out["agreement_unlabeled"] = agreement(ctx, teacher, student, [str(p) for p in snapshot.held_out_unlabeled])
    if val is not None:
        out["val"] = val_accuracy(ctx, teacher, student, episode, val)
    if folds:
        out["cross_validation"] = cross_validate(ctx, episode, folds)
    return out


def load_fitted_student(ctx, episode):
    from tint.stages import trained_student
    from tint.students.distill import load_student

    trained = trained_student(ctx, episode, 0)  # finished: verified and skipped
    model, _meta = load_student(trained.folder / trained.marker["weights"])
    return model.to(ctx.device).eval()


def teacher_leave_one_out(ctx, teacher, episode) -> dict:
    """Each labelled image classified by the teacher fitted on all the others. Images of
    one-image classes are not scored (leaving them out removes their class), but their
    class stays a candidate answer for every other image."""
    import torch

    items, labels = episode.support_items()
    counts = {c: labels.count(c) for c in set(labels)}
    x = ctx.dataset.load_tensor(items)
    y = torch.tensor(labels)
    correct, scored = 0, 0
    for i in range(len(items)):
        if counts[labels[i]] < 2:
            continue
        keep = [j for j in range(len(items)) if j != i]
        teacher.fit(x[keep], y[keep], ids=[items[j] for j in keep])
        pred = int(teacher.predict_proba(x[i:i + 1], ids=[items[i]]).argmax(1)[0])
        correct += int(pred == labels[i])
        scored += 1
    skipped = [episode.classes[c] for c, n in sorted(counts.items()) if n < 2]
    return {"accuracy": correct / scored if scored else None, "n_scored": scored,
            "n_images": len(items), "one_image_classes": skipped}


def agreement(ctx, teacher, student, paths: list[str]) -> dict:
    """How often the student's top-1 label equals the teacher's on images neither trained on."""
    import torch

    from tint.data.images import load_image, to_tensor

    if not paths:
        return {"agreement": None, "n": 0}
    x = to_tensor([load_image(p, ctx.config.data.resolution) for p in paths])
    with torch.no_grad():
        t = teacher.predict_proba(x).argmax(1).cpu()
        s = student(x.to(ctx.device)).argmax(1).cpu()
    return {"agreement": float((t == s).float().mean()), "n": len(paths)}


def check_val_classes(val: LabelledImages, classes: list[str]) -> None:
    unknown = [c for c in val.classes if c not in classes]
    if unknown:
        raise TintError(f"--val {val.root}: class folder(s) {', '.join(unknown)} are not training "
                        f"classes ({', '.join(classes)}); rename or remove them")


def val_accuracy(ctx, teacher, student, episode, val: LabelledImages) -> dict:
    import torch

    from tint.data.images import load_image, to_tensor

    check_val_classes(val, episode.classes)
    paths = [p for c in val.classes for p in val.files[c]]
    y = torch.tensor([episode.classes.index(c) for c in val.classes for _ in val.files[c]])
    x = to_tensor([load_image(p, ctx.config.data.resolution, fit=SUPPORT_FIT) for p in paths])
    with torch.no_grad():
        t = teacher.predict_proba(x).argmax(1).cpu()
        s = student(x.to(ctx.device)).argmax(1).cpu()
    return {"teacher": float((t == y).float().mean()), "student": float((s == y).float().mean()),
            "n": len(paths), "classes": val.counts()}


# ----------------------------------------------------------------------------- 5. the model folder


def write_model_folder(ctx, episode, out: Path, images: LabelledImages, snapshot: Snapshot,
                       estimates: dict, sha: str, seconds: float) -> None:
    from tint.model_folder import output_file
    from tint.stages import export_folder, trained_student
    from tint.students.models import IMAGENET_MEAN, IMAGENET_STD

    folder = export_folder(ctx, episode, 0)
    for src, dst in (("student.onnx", "model.onnx"), ("student.pt", "model.pt")):
        if (folder / src).is_file():
            with output_file(out, dst) as tmp:
                shutil.copyfile(folder / src, tmp)
    student = ctx.config.students[0]
    labels = labels_document(
        episode.classes, ctx.config.data.resolution, model_sha256=streamed_sha256(out / "model.onnx"),
        fit=SUPPORT_FIT, crop_alpha=SUPPORT_CROP_ALPHA, arch=student.arch, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, training={"images": images.counts(), "sha256": sha})
    with output_file(out, LABELS_FILE) as tmp:
        tmp.write_text(json.dumps(labels, indent=2) + "\n")
    curve = trained_student(ctx, episode, 0).marker.get("curve", [])
    footprint = footprint_lines(ctx, episode, out / "model.onnx")
    with output_file(out, "MODEL_CARD.md") as tmp:
        tmp.write_text(model_card(ctx, images, snapshot, estimates, sha, seconds, footprint))
    write_fit_report(out, ctx, episode, snapshot, estimates, curve)


def footprint_lines(ctx, episode, onnx_path: Path) -> list[str]:
    """The card's size-and-speed lines: the shipped student against the teacher it replaces."""
    from tint.footprint import comparison_lines, student_footprint, teacher_footprint
    from tint.stages import fitted_teacher

    cfg = ctx.config
    student = student_footprint(load_fitted_student(ctx, episode), onnx_path, cfg.data.resolution)
    teacher = teacher_footprint(fitted_teacher(ctx, episode), cfg.data.resolution)
    lines = comparison_lines(student, teacher, f"{cfg.students[0].arch}, {cfg.data.resolution} px",
                             f"{cfg.teacher.name} on {cfg.teacher.backbone}, on {ctx.device}")
    return lines + [environment_line()]


def environment_line() -> str:
    """Where the card's timings were taken and the model was trained (a retrain elsewhere
    may round differently: docs/reliability.md, "Same key, same environment")."""
    from tint.engine import environment

    env = environment()
    return (f"environment: {env['cpu'] or env['machine']}, Python {env['python']}, torch {env['torch']}, "
            f"onnxruntime {env['onnxruntime']}, numpy {env['numpy']}, Pillow {env['pillow']}")


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on n images (honest at small n)."""
    if n == 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _pct(value) -> str:
    return "not measured" if value is None else f"{100 * value:.1f} %"


def estimate_lines(estimates: dict, snapshot: Snapshot) -> list[str]:
    loo, gen, unl = (estimates["teacher_leave_one_out"], estimates["agreement_generated"],
                     estimates["agreement_unlabeled"])
    lines = []
    if estimates.get("cross_validation", {}).get("student") is not None:
        cv = estimates["cross_validation"]
        low, high = wilson_interval(cv["student"], cv["n_scored"])
        lines.append(f"student accuracy, {cv['folds']}-fold cross-validated on your labelled images "
                     f"({cv['n_scored']} held-out images; fold students see (k-1)/k of them and no "
                     f"generated images): {_pct(cv['student'])}, 95% interval {_pct(low)} to {_pct(high)} "
                     f"(teacher on the same folds: {_pct(cv['teacher'])}); few images make this wide: "
                     "docs/fit.md has how it compared with real held-out accuracy")
    if "val" in estimates:
        v = estimates["val"]
        lines.append(f"validation accuracy (--val, {v['n']} images): student {_pct(v['student'])}, "
                     f"teacher {_pct(v['teacher'])}")
    one = loo["one_image_classes"]
    lines.append(f"teacher leave-one-out accuracy on the labelled images: {_pct(loo['accuracy'])} "
                 f"({loo['n_scored']} of {loo['n_images']} images scored"
                 + (f"; not scored: the only image of {', '.join(one)}" if one else "") + ")")
    if gen["n"]:
        lines.append(f"student agrees with the teacher on {gen['n']} held-out generated images: "
                     f"{_pct(gen['agreement'])}")
    else:
        lines.append("student-teacher agreement on generated images: not measured (no generator)")
    lines.append(f"student agrees with the teacher on {unl['n']} {snapshot.held_out_what}: "
                 f"{_pct(unl['agreement'])}")
    return lines


def model_card(ctx, images: LabelledImages, snapshot: Snapshot, estimates: dict, sha: str,
               seconds: float, footprint: list[str]) -> str:
    from tint.config import dump_config
    from tint.footprint import REPEATS

    cfg = ctx.config
    student = cfg.students[0]
    counts = "\n".join(f"| {name} | {n} |" for name, n in images.counts().items())
    which = ("**real validation accuracy** on the images of `--val` (held out by you), plus the "
             "estimates below" if "val" in estimates else
             "**an estimate without a test set** (no `--val` was given): the teacher's leave-one-out "
             "accuracy on your labelled images, and how often the student agrees with the teacher "
             "on images neither was trained on. Agreement is not accuracy: a student that copies a "
             "wrong teacher agrees perfectly. Give `--val DIR` for a real measurement")
    generator = "none" if not has_generator(ctx) else f"{cfg.generator.name} on `{cfg.generator.backbone}`"
    return f"""# Model card: tint fit of `{images.root}`

A {student.arch} image classifier distilled by `tint fit` ({time.strftime('%Y-%m-%d')}).

## Classes and training images

| class | images |
|---|---|
{counts}

SHA-256 of the training images (class + each file's SHA-256, sorted): `{sha}`

## How it was made

- Generator: {generator}, {cfg.generator.images_per_class} images per class
- Teacher: {cfg.teacher.name} with `{cfg.teacher.backbone}` backbone, fitted on every labelled image
- Student: {student.arch} at {cfg.data.resolution}x{cfg.data.resolution}, {cfg.distill.iterations} iterations,
  sources {', '.join(student.sources or cfg.distill.sources)}
- Unlabelled images for the distillation loss: {snapshot.pool}
- Wall time of this fit command: {seconds:.0f} s (finished stages of an earlier run are not re-timed)
- The full resolved settings are in `work/config.yaml`.

## Accuracy

This is {which}.

{chr(10).join('- ' + line for line in estimate_lines(estimates, snapshot))}

## Intended use and limits

- Sorting images into exactly these {len(images.classes)} classes. Every input gets one of them,
  even an image of something else: check the probability, it is not calibrated.
- Trained on {sum(images.counts().values())} labelled images: expect it to fail on backgrounds,
  viewpoints, lighting and cameras that the training images do not show.
- Images are fitted to a square the same way as in training (`labels.json`, input): short side
  resized, centre crop. Use `tint predict` or `tint.Predictor`, which do this for you.
- Not for decisions about people, safety or health.

## Size and speed

Measured on the machine that ran this fit, when the card was written (median of {REPEATS} runs):

{chr(10).join('- ' + line for line in footprint)}

## Settings

```yaml
{dump_config(cfg)}```
"""


def write_fit_report(out: Path, ctx, episode, snapshot: Snapshot, estimates: dict, curve: list) -> Path:
    from tint import report
    from tint.model_folder import output_file
    from tint.stages import synthetic_paths

    figures = out / "report"
    figures.mkdir(parents=True, exist_ok=True)
    support = [[str(snapshot.data_root / i) for i in row] for row in episode.support]
    generated = synthetic_paths(ctx, episode)
    name = ctx.config.students[0].name
    results = {"models": [name], "summary": {},
               "episodes": [{"index": 0, "classes": episode.classes, "support": support,
                             "generated": generated, "curves": {name: curve}}]}
    grid = report.image_grid(results["episodes"][0], figures / "images.png", ctx.config.report.grid_images)
    curves = report.plot_curves(results, figures)
    estimates_html = "".join(f"<li>{html.escape(line)}</li>" for line in estimate_lines(estimates, snapshot))
    body = "\n".join([
        f"<h2>Accuracy</h2><ul>{estimates_html}</ul><p>See MODEL_CARD.md for what each figure means.</p>",
        f"<h2>Labelled and generated images</h2><p>Per class: your images, then up to "
        f"{ctx.config.report.grid_images} generated ones.</p>{report.img_tag(grid)}",
        report.figure_section("Accuracy on the labelled (training) images during distillation: "
                               "a fit check, not an accuracy estimate", curves),
        f"<h2>Unlabelled images</h2><p>{html.escape(snapshot.pool)}</p>",
    ])
    with output_file(out, "report.html") as tmp:
        tmp.write_text(report.html_page(f"tint fit: {', '.join(episode.classes)}", body))
    return out / "report.html"


# ----------------------------------------------------------------------------- the API


def fit(data_dir: str | Path, out: str | Path, config: str | Path | None = None,
        overrides: Sequence[str] = (), unlabeled: str | Path | None = None,
        val: str | Path | None = None, folds: int = 0) -> Path:
    """Train a tiny classifier on ``data_dir/<class>/<images>``; returns the model folder.
    ``folds`` > 1 adds a k-fold cross-validated estimate of the student (tint.cross_validation).

    Resumable: the same call after a kill continues, after success computes nothing.
    `out` must be new, empty or a model folder of an earlier fit (tint.model_folder).
    """
    start = time.perf_counter()
    out, unlabeled = Path(out), Path(unlabeled) if unlabeled is not None else None
    if out.resolve().is_relative_to(Path(data_dir).resolve()):
        raise TintError(f"--out {out}: the model folder is inside DATA_DIR {data_dir}, where it would "
                        "be read as a class; put it elsewhere")
    images = read_labelled_folder(data_dir)
    val_images = read_labelled_folder(val, "--val") if val is not None else None
    if val_images is not None:
        check_val_classes(val_images, images.classes)
    check_images_decode(images)
    work = out.resolve() / "work"  # keys never see it (data.dataset_key), logs and markers do
    cfg = load_fit_config(config, overrides, work, unlabeled)
    with claim_model_folder(out, fit_identity(images, cfg, unlabeled, val_images, folds)):
        return _fit_claimed(out, work, images, cfg, unlabeled, val_images, start, folds)


def fit_identity(images: LabelledImages, cfg, unlabeled: Path | None,
                 val: LabelledImages | None, folds: int = 0) -> dict:
    """What a fit computes, for the model folder's lock: a second fit of the same identity
    waits for the first, one of another identity is refused (they would mix one folder)."""
    from tint.config import dump_config
    from tint.engine import stable_hash

    settings = dump_config(replace(cfg, run_dir=""))
    return {"data": images.sha256(), "val": val.sha256() if val is not None else None,
            "settings": stable_hash([settings, str(unlabeled.resolve()) if unlabeled else None]),
            **({"folds": folds} if folds else {})}


def _fit_claimed(out: Path, work: Path, images: LabelledImages, cfg, unlabeled: Path | None,
                 val_images: LabelledImages | None, start: float, folds: int = 0) -> Path:
    """The fit itself, once the model folder is claimed."""
    from tint.pipeline import LOGGER, attach_log

    work.mkdir(parents=True, exist_ok=True)
    handler = attach_log(work / "log.txt")
    try:
        snapshot = make_snapshot(images, cfg, work, unlabeled)
        LOGGER.info("tint fit: %d labelled images in %d classes; unlabelled pool: %s",
                    sum(images.counts().values()), len(images.classes), snapshot.pool)
        ctx, episode = run_fit_units(episode_config(cfg, images, snapshot, work))
        estimates = estimate(ctx, episode, snapshot, val_images, folds)
        estimates = {k: v for k, v in estimates.items() if k in (
            "teacher_leave_one_out", "agreement_generated", "agreement_unlabeled", "val", "cross_validation")}
        write_model_folder(ctx, episode, out, images, snapshot, estimates, images.sha256(),
                           time.perf_counter() - start)
        LOGGER.info("tint fit: model folder %s written", out)
    finally:
        LOGGER.removeHandler(handler)
        handler.close()
    return out


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="labelled images: DATA_DIR/<class>/<images>")
    parser.add_argument("config", type=Path, nargs="?", default=None,
                        help="a run config YAML (default: the embedded tint/configs/fit.yaml)")
    parser.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR", help="the model folder to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. distill.iterations=300")
    parser.add_argument("--unlabeled", type=Path, default=None, metavar="DIR",
                        help="your own unlabelled in-domain images for the distillation loss "
                             "(default: the embedded openclipart base pool)")
    parser.add_argument("--val", type=Path, default=None, metavar="DIR",
                        help="labelled validation images, same layout: real accuracy on the card")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (config key device)")
    parser.add_argument("--folds", type=int, default=0, metavar="K",
                        help="also estimate the student's accuracy by K-fold cross-validation over your "
                             "labelled images (K more students to train; 0: off)")


def card_items(card: str, section: str, next_section: str) -> list[str]:
    """The bullet lines of one section of a model card (what the command's last lines show)."""
    body = card.split(section, 1)[1].split(next_section, 1)[0]
    return [line[2:] for line in body.strip().splitlines() if line.startswith("- ")]


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    if args.folds == 1 or args.folds < 0:
        raise TintError(f"--folds {args.folds}: give 0 (off) or K >= 2")
    out = fit(args.data_dir, args.out, args.config, overrides, args.unlabeled, args.val, args.folds)
    from tint.io import read_json

    labels = read_json(out / LABELS_FILE)
    print(f"model folder: {out} ({len(labels['classes'])} classes: {', '.join(labels['classes'])})")
    card = (out / "MODEL_CARD.md").read_text()
    for line in card_items(card, "## Accuracy", "## Intended") + card_items(card, "## Size and speed", "## Settings"):
        print(f"  {line}")
    print(f"use it: tint predict {out} IMAGES_OR_FOLDERS...")
    return 0
