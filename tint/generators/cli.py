"""`tint specialize`: run a generator's specialisation (TINT: TI + NTI) for one episode's classes.

Writes one artifact per class into --out plus ``specialize.json`` (what was run: backbone,
dataset, episode, settings). Re-running skips classes whose artifact is complete and was made
with the same settings, so a killed run resumes where it stopped.

The settings flags are derived from the registered generators' ``SpecializeSettings`` fields
(``ti_lr`` -> ``--ti-lr``): a new setting gets its flag without touching this file, and an
unset flag keeps the chosen generator's own default.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from tint.devices import add_device_arguments, device_and_precision, resolve_device
from tint.errors import TintError
from tint.generators import available_generators, create_generator
from tint.generators.base import (
    artifact_is_complete,
    artifact_path,
    load_artifact,
    settings_dict,
    settings_from,
    support_fingerprint,
)
from tint.io import set_threads, write_json

DEFAULT_BACKBONE = "tint-clipart"
RUN_FILE = "specialize.json"
log = logging.getLogger("tint.specialize")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", default="tint", choices=available_generators(),
                        help="which generator to specialise (default: tint)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE,
                        help="diffusion model: 'tint-clipart' (embedded), 'tiny' (random, tests), "
                             "a tint generator folder, an SD folder or hub id")
    parser.add_argument("--dataset", help="dataset spec, e.g. openclipart, folder:ROOT "
                                          "(default: the one named in the episode file)")
    parser.add_argument("--resolution", type=int,
                        help="dataset image resolution (default: the episode file's, else 84)")
    parser.add_argument("--episodes", type=Path, help="episode file from `tint episodes`")
    parser.add_argument("--episode", type=int, default=0, help="episode index in --episodes")
    parser.add_argument("--split", default="novel", help="without --episodes: split to sample from")
    parser.add_argument("--n-way", type=int, default=5, help="without --episodes: classes")
    parser.add_argument("--k-shot", type=int, default=5, help="without --episodes: supports/class")
    parser.add_argument("--seed", type=int, default=0, help="episode sampling and TI seed")
    parser.add_argument("--out", type=Path, required=True, help="artifact folder")
    add_settings_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="redo classes whose artifact was made with other settings")
    add_device_arguments(parser)  # TI under autocast in --precision; NTI stays float32
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


# SpecializeSettings fields set from the command's own flags (not a flag of their own).
FROM_COMMAND = {"backbone": "--backbone", "dataset_resolution": "--resolution",
                "seed": "--seed", "progress": None}


def settings_fields() -> dict[str, tuple[Any, dict[str, Any]]]:
    """field -> (type, {generator: its default}) over every registered generator's
    SpecializeSettings, in registry and field order."""
    out: dict[str, tuple[Any, dict[str, Any]]] = {}
    for name in available_generators():
        cls = create_generator(name).SpecializeSettings
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in FROM_COMMAND:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.setdefault(f.name, (hints[f.name], {}))[1][name] = default
    return out


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "specialisation settings", "the generator's SpecializeSettings (docs/generators.md); "
        "unset: the chosen generator's own default")
    for name, (hint, defaults) in settings_fields().items():
        flag = "--" + name.replace("_", "-")
        text = _defaults_help(defaults)
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        elif _is_sequence(hint):
            group.add_argument(flag, nargs="*", type=_flag_value(hint), default=None,
                               metavar="VALUE", help=text)
        else:
            group.add_argument(flag, type=_flag_value(hint), default=None, metavar="VALUE",
                               help=text)


def _defaults_help(defaults: dict[str, Any]) -> str:
    """"tint: 250; plain-ti, da-fusion: 0": which generators have it, with what default."""
    by_value: dict[str, list[str]] = {}
    for generator, value in defaults.items():
        by_value.setdefault(repr(value), []).append(generator)
    return "; ".join(f"{', '.join(names)}: {value}" for value, names in by_value.items())


def _is_sequence(hint: Any) -> bool:
    options = [hint, *typing.get_args(hint)]
    return any(typing.get_origin(t) in (list, tuple, Sequence) for t in options)


def _flag_value(hint: Any):
    """Text flags stay text; anything else is read as YAML (3, 1e-3, null, [96, sr])."""
    text_only = hint is str or set(typing.get_args(hint)) == {str, type(None)}

    def parse(text: str) -> Any:
        return text if text_only else yaml.safe_load(text)

    return parse


def build_settings(generator: Any, args: argparse.Namespace, resolution: int) -> Any:
    """The generator's SpecializeSettings from the flags given (checked like a config)."""
    cls = generator.SpecializeSettings
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for name in settings_fields():
        value = getattr(args, name)
        if value is None:
            continue
        if name not in known:
            raise TintError(f"--{name.replace('_', '-')}: generator {generator.NAME!r} has no "
                            f"setting {name!r}; its settings: {', '.join(sorted(known))}")
        values[name] = value
    common = {"backbone": args.backbone, "dataset_resolution": resolution, "seed": args.seed}
    values.update({k: v for k, v in common.items() if k in known})
    try:
        return settings_from(cls, values, "")
    except TintError as err:  # name the flag: "--ti-lr: must be > 0, got 0.0"
        key, _, rest = str(err).partition(": ")
        name = key.split("[")[0]
        if name not in known or name in FROM_COMMAND:
            raise
        raise TintError(f"--{name.replace('_', '-')}{key[len(name):]}: {rest}") from err


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    generator = create_generator(args.generator)
    dataset, classes, supports, episode_info = resolve_supports(args)
    settings = build_settings(generator, args, dataset.resolution)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, {
        "generator": args.generator, "backbone": args.backbone, "dataset": dataset.spec,
        "resolution": dataset.resolution, "classes": classes, "episode": episode_info,
        "supports": supports,
        "settings": settings_dict(settings),
    })
    images = {name: dataset.load_tensor(supports[name]) for name in classes}
    todo = [c for c in classes
            if not _class_done(generator, out, c, settings, images[c], args.overwrite)]
    print(f"tint specialize: {len(classes) - len(todo)} of {len(classes)} classes already done")
    if not todo:
        return 0
    device, precision = device_and_precision(args)
    backbone = load_backbone_on(args.backbone, device, precision=precision)
    for name in tqdm(todo, desc="specialize", unit="class"):
        path = generator.specialize(backbone, name, images[name], out, settings)
        log.info("wrote %s", path)
    print(f"tint specialize: wrote {len(todo)} artifact(s) to {out}")
    return 0


def resolve_supports(args: argparse.Namespace) -> tuple[Any, list[str], dict[str, list[str]], dict]:
    """(dataset, class names, class -> support item ids, episode description)."""
    from tint.data.datasets import load_dataset

    meta: dict = {}
    episode = None
    if args.episodes is not None:
        from tint.data.episodes import load_episodes

        episodes, meta = load_episodes(args.episodes)
        if not 0 <= args.episode < len(episodes):
            raise TintError(f"--episode {args.episode}: {args.episodes} holds {len(episodes)} "
                            f"episode(s), numbered 0..{len(episodes) - 1}")
        episode = episodes[args.episode]
    spec = args.dataset or meta.get("dataset") or meta.get("dataset_spec")
    if not spec:
        raise TintError("--dataset: required (the episode file does not name its dataset)")
    resolution = args.resolution or meta.get("resolution") or 84
    dataset = load_dataset(spec, resolution=int(resolution))
    if episode is None:
        from tint.data.episodes import sample_episodes

        episode = sample_episodes(dataset, split=args.split, n_way=args.n_way,
                                  k_shot=args.k_shot, n_query=0, n_episodes=1, seed=args.seed)[0]
        info = {"sampled": True, "split": args.split, "n_way": args.n_way,
                "k_shot": args.k_shot, "seed": args.seed}
    else:
        info = {"file": str(args.episodes), "index": args.episode}
    supports = dict(zip(episode.classes, episode.support, strict=True))
    for name, items in supports.items():
        if not items:
            raise TintError(f"class {name!r}: the episode has no support images for it")
    return dataset, list(episode.classes), supports, info


def _class_done(generator: Any, out: Path, name: str, settings: Any, support: torch.Tensor,
                overwrite: bool) -> bool:
    """Complete, same settings and same support images: skip. Other inputs: refuse to mix."""
    path = artifact_path(out, name)
    required = getattr(generator, "REQUIRED_TENSORS", ())
    if not artifact_is_complete(path, required):
        return False  # missing or half-made: (re)do it
    meta = load_artifact(path)[1]
    recorded = meta.get("support_sha256")
    same_support = recorded is None or recorded == support_fingerprint(support)
    if meta.get("settings") == settings_dict(settings) and same_support:
        return True
    if overwrite:
        return False
    what = "settings" if same_support else "support images (another episode?)"
    raise TintError(f"{path}: made with other {what}; pass --overwrite to redo it or choose "
                    "another --out")


def load_backbone_on(spec: str, device: str | torch.device, dtype: torch.dtype = torch.float32,
                     precision: str = "fp32", vae_slice_size: int | None = None) -> Any:
    """Load a diffusion backbone on `device`: float32 weights for specialisation (TI autocasts
    to `precision`), fp16/bf16 weights for sampling (tint.devices)."""
    from tint.diffusion.backbone import load_backbone

    return load_backbone(spec, device=resolve_device(device, option="--device"), dtype=dtype,
                         precision=precision, vae_slice_size=vae_slice_size)
