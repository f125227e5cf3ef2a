"""Typed run configuration: YAML in, fully resolved YAML out.

A run is described by one `RunConfig` (nested dataclasses). `load_config` reads a YAML
file (or the packaged demo), applies ``--set key.path=value`` overrides and checks every
key and type *before any work starts*, so a typo fails in a second with the key path
(``distill.lr: expected float, got 'abc'``) instead of an hour into a run. The resolved
config (every default filled in) is written beside the results, and loading that file
gives back an identical config: a run directory always says exactly what produced it.

Free-form ``settings`` mappings are handed to the component that owns them (generator,
teacher); that component validates them in `tint.pipeline` before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from tint.errors import TintError
from tint.students.distill import DistillConfig

DEMO_CONFIG = "demo.yaml"  # packaged under tint/configs/

Source = Literal["base", "synthetic", "support"]


@dataclass
class DataConfig:
    """Which images: the dataset, the episodes (a file or sampled), the base-class pool."""

    dataset: str = "openclipart"
    resolution: int = 84
    # An episode file (path, or "builtin:<name>" for tint/assets/episodes/<name>.json);
    # None samples `n_episodes` episodes from `split` with the settings below.
    episodes: str | None = "builtin:openclipart-novel-5w5s"
    first_episodes: int | None = None  # use only the first n episodes of the file
    split: str = "novel"
    n_way: int = 5
    k_shot: int = 5
    n_query: int | None = 15  # None: all remaining images of each class
    n_episodes: int = 1
    episode_seed: int = 0
    base_split: str = "base"
    base_images_per_class: int | None = None  # cap on base images used for distillation
    min_base_classes: int = 2
    min_base_images: int = 10


@dataclass
class GeneratorConfig:
    """How synthetic images are made (`tint.generators`); name "none" switches it off."""

    name: str = "tint"
    backbone: str = "tint-clipart"  # "tiny", "tint-clipart", a local path or a hub id
    images_per_class: int = 100
    seed: int = 0
    # The generator's own SpecializeSettings / GenerateSettings fields (see its module).
    # Kept apart so that one specialisation serves every generation setting.
    specialize: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetaTrainConfig:
    """P>M>F meta-training on base-class episodes (paper: 100 epochs x 400 episodes)."""

    epochs: int = 1  # 0: no meta-training (the pretrained backbone as is)
    episodes_per_epoch: int = 20
    lr: float = 3e-3
    weight_decay: float = 1e-6
    n_way: int = 5
    k_shot: int = 5
    n_query: int = 15
    seed: int = 0


@dataclass
class TeacherConfig:
    """The few-shot teacher that pseudo-labels base and synthetic images."""

    name: str = "pmf"  # "pmf" | "labelhalluc"
    # pmf: "efficientnet-lite0" (offline default), "dino-vitb16", "vit:<dir or hub id>",
    # "tiny-vit" (random, for tests). labelhalluc: ignored (it uses `arch`).
    backbone: str = "efficientnet-lite0"
    meta_train: MetaTrainConfig = field(default_factory=MetaTrainConfig)
    arch: str | None = None  # labelhalluc network; None: the first student's arch
    pretrain_iterations: int = 2000  # labelhalluc: CE pre-training steps on base classes
    batch_size: int = 64  # images per forward pass when embedding
    # Keyword arguments of the teacher class (pmf: scale, finetune_steps, finetune_lr;
    # labelhalluc: C, max_iter).
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudentConfig:
    """One distilled student: its architecture and which data sources its batches use."""

    name: str = "with-tint"
    arch: str = "conv4"  # "conv4" | "resnet12"
    sources: list[Source] | None = None  # None: distill.sources


@dataclass
class ExportConfig:
    """Export the final student weights (no "best" checkpoint: choosing one by query
    accuracy would select on the test set)."""

    enabled: bool = True
    onnx: bool = True


@dataclass
class ExecutorConfig:
    """Where units of work run (`--executor`); execution only, never part of an artifact key."""

    name: Literal["local", "ray"] = "local"
    address: str | None = None  # Ray cluster address (None: RAY_ADDRESS, else a local cluster)
    max_in_flight: int = 64  # units submitted at once
    max_retries: int = 3  # retries of a unit whose worker or node died (not of a failing unit)
    keep_going: bool = False  # after a unit fails, finish the units that do not depend on it
    # GPUs per unit by stage (Ray); 0 runs the stage on a CPU worker.
    gpus: dict[str, float] = field(default_factory=lambda: {
        "specialize": 1.0, "generate": 1.0, "teacher": 1.0, "pseudo-label": 1.0, "distill": 0.0,
        "evaluate": 0.0, "export": 0.0})
    cpus: float = 1.0  # CPUs per unit
    threads: int = 1  # torch threads inside each worker


@dataclass
class ReportConfig:
    enabled: bool = True
    grid_images: int = 8  # generated images shown per class


def _default_students() -> list[StudentConfig]:
    """The demo's comparison: the same student distilled without and with synthetic data."""
    return [
        StudentConfig(name="without-synthetic", sources=["base", "support"]),
        StudentConfig(name="with-tint", sources=["base", "synthetic", "support"]),
    ]


@dataclass
class RunConfig:
    """Everything `tint run` needs. Every field has a default; the demo sets its own
    values in tint/configs/demo.yaml."""

    name: str = "demo"
    run_dir: str = "runs/demo"
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    # Execution only (never in an artifact key): "auto" = CUDA when available, else CPU.
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # docs/diffusion.md, "Precision"
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    students: list[StudentConfig] = field(default_factory=_default_students)
    # The distillation loop's own settings (tint.students.distill.DistillConfig, paper B.4).
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


# ----------------------------------------------------------------------------- typing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return `value` as type `tp` or raise TintError naming `path`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # `X | None`: X's own error is the most precise
            try:
                return _coerce(value, options[0], path)
            except TintError as err:
                if value is None or str(err).startswith(f"{path}: expected"):
                    raise _type_error(path, tp, value) from err
                raise
        for arg in options:
            try:
                return _coerce(value, arg, path)
            except TintError:
                continue
        raise _type_error(path, tp, value)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _type_error(path, tp, value)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(path, tp, value)
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise TintError(f"{path}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(path, tp, value)
        return {str(k): v for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, tp, value)
    raise TypeError(f"config.py: unsupported field type {tp!r} at {path}")


def _type_error(path: str, tp: Any, value: Any) -> TintError:
    return TintError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _from_dict(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TintError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [str(k) for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise TintError(f"{key}: unknown key; valid keys here: {', '.join(fields)}")
    kwargs = {
        name: _coerce(value, hints[name], f"{path}.{name}" if path else name)
        for name, value in data.items()
    }
    return cls(**kwargs)


# ----------------------------------------------------------------------------- public API


def config_from_dict(data: dict | None) -> RunConfig:
    """Validate a plain mapping (as read from YAML) into a RunConfig."""
    config = _from_dict(RunConfig, data, "")
    check_values(config)
    return config


def config_to_dict(config: Any) -> dict:
    """The fully resolved config as plain data (every default filled in; tuples as lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise TintError(f"{path}: is a folder, not a config file; give a YAML file "
                        "such as configs/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise TintError(f"{path}: config file not found") from err
    except UnicodeDecodeError as err:
        raise TintError(f"{path}: not a text file (byte {err.start} is not UTF-8); "
                        "give a YAML config such as configs/tiny.yaml") from err
    except OSError as err:
        raise TintError(f"{path}: cannot read the config ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise TintError(f"{path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TintError(f"{path}: a config must be a mapping of keys to values")
    return data


def demo_config_text() -> str:
    return resources.files("tint").joinpath("configs", DEMO_CONFIG).read_text()


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one ``key.path=value`` (value parsed as YAML) to raw config data.

    Returns the new raw data: `data` merged over the defaults, so that a nested key or a
    list index (``students.1.arch=resnet12``) can be overridden without spelling out
    its parents. Keys of typed sections must exist; free-form ``settings``-like
    mappings (generator.specialize, ...) accept new keys, which their owner validates.
    """
    if "=" not in assignment:
        raise TintError(f"--set {assignment!r}: expected KEY=VALUE, e.g. distill.lr=0.01")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise TintError(f"--set {assignment!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    merged = _merge(config_to_dict(RunConfig()), data)
    node: Any = merged
    cls: Any = RunConfig
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise TintError(f"--set {prefix}: no such list index (the list has {len(node)} items)")
            index: Any = int(part)
            cls = _item_type(cls)
        else:
            if not isinstance(node, dict):
                raise TintError(f"--set {prefix}: {'.'.join(parts[:depth])} is not a mapping")
            if dataclasses.is_dataclass(cls):
                hints = typing.get_type_hints(cls)
                if part not in hints:
                    raise TintError(f"{prefix}: unknown key; valid keys here: {', '.join(hints)}")
                cls = hints[part]
            else:
                cls = None  # inside a free-form mapping
            index = part
        if last:
            node[index] = value
            return merged
        if isinstance(node, dict) and node.get(index) is None:
            node[index] = _default_raw(cls)
        node = node[index]
    raise AssertionError("unreachable")


def _merge(defaults: Any, data: Any) -> Any:
    """`data` over `defaults`: mappings merge key by key, everything else replaces."""
    if isinstance(defaults, dict) and isinstance(data, dict):
        out = dict(defaults)
        for key, value in data.items():
            out[key] = _merge(defaults.get(key), value) if key in defaults else value
        return out
    return data


def _item_type(cls: Any) -> Any:
    """The element type of a list field (through `X | None`)."""
    for candidate in (cls, *typing.get_args(cls)):
        if typing.get_origin(candidate) in (list, tuple):
            return typing.get_args(candidate)[0]
    return None


def _default_raw(cls: Any) -> Any:
    """Raw default data for a nested field about to be overridden in place."""
    if cls is not None and dataclasses.is_dataclass(cls):
        return config_to_dict(cls())
    if _item_type(cls) is not None:
        return []
    return {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a config (None: the packaged demo), apply overrides, validate everything."""
    data = yaml.safe_load(demo_config_text()) if path is None else read_yaml(path)
    data = data or {}
    for assignment in overrides or []:
        data = apply_override(data, assignment)
    return config_from_dict(data)


def save_resolved(config: RunConfig, path: str | Path) -> None:
    from tint.io import write_text

    write_text(path, dump_config(config))


# ----------------------------------------------------------------------------- value checks


def check_values(config: RunConfig) -> None:
    """Range checks that types cannot express; each names its key."""
    positive = {
        "data.resolution": config.data.resolution,
        "data.n_way": config.data.n_way,
        "data.k_shot": config.data.k_shot,
        "data.n_episodes": config.data.n_episodes,
        "teacher.meta_train.n_way": config.teacher.meta_train.n_way,
        "teacher.meta_train.k_shot": config.teacher.meta_train.k_shot,
        "teacher.batch_size": config.teacher.batch_size,
        "distill.iterations": config.distill.iterations,
        "distill.batch_size": config.distill.batch_size,
        "distill.eval_every": config.distill.eval_every,
        "distill.checkpoint_every": config.distill.checkpoint_every,
        "distill.temperature": config.distill.temperature,
    }
    for key, value in positive.items():
        if value <= 0:
            raise TintError(f"{key}: must be > 0, got {value}")
    non_negative = {
        "generator.images_per_class": config.generator.images_per_class,
        "teacher.meta_train.epochs": config.teacher.meta_train.epochs,
        "teacher.meta_train.episodes_per_epoch": config.teacher.meta_train.episodes_per_epoch,
        "distill.lr": config.distill.lr,
        "distill.weight_decay": config.distill.weight_decay,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise TintError(f"{key}: must be >= 0, got {value}")
    if config.data.first_episodes is not None and config.data.first_episodes <= 0:
        raise TintError(f"data.first_episodes: must be > 0 or null, got {config.data.first_episodes}")
    if not config.students:
        raise TintError("students: list at least one student to distil")
    names = [s.name for s in config.students]
    for i, student in enumerate(config.students):
        if student.sources is not None and not student.sources:
            raise TintError(f"students[{i}].sources: list at least one of base, synthetic, support")
        if student.name in names[:i]:
            raise TintError(f"students[{i}].name: {student.name!r} is used twice; names must differ")
        if not student.name.replace("-", "").replace("_", "").isalnum():
            raise TintError(f"students[{i}].name: use letters, digits, '-' or '_' ({student.name!r})")
