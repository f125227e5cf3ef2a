"""Typed run configuration: YAML in, fully resolved YAML out.

A run is described by one `RunConfig` (nested dataclasses). `load_config` reads a YAML
file (or the packaged demo), applies ``--set key.path=value`` overrides and checks every
key and type *before any work starts*, so a typo fails in a second with the key path
(``distill.lr: expected float, got 'abc'``) instead of an hour into a run. The resolved
config (every default filled in) is written beside the results, and loading that file
gives back an identical config: a run directory always says exactly what produced it.

The component settings (``generator.specialize``, ``generator.generate``,
``teacher.settings``) are typed by the component that owns them (its settings dataclass,
`tint.generators.resolve_settings`, `tint.teachers.resolve_teacher_settings`), here, once:
from load on the config holds those settings objects (coerced, range-checked, every
default filled in), the stage bodies read them as they are, and the dump writes them as
plain values (docs/ARCHITECTURE.md, "Settings typed once").
The rules (types via `tint.settings`, ranges via each section's ``RANGES`` and
``validate``) are listed in docs/pipeline.md, "Config".
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from tint.errors import TintError
from tint.settings import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    Settings,
    check_interval,
    check_ranges,
    from_mapping,
    plain,
)
from tint.students.distill import DistillConfig

DEMO_CONFIG = "demo.yaml"  # packaged under tint/configs/

Source = Literal["base", "synthetic", "support"]


@dataclass
class DataConfig(Settings):
    """Which images: the dataset, the episodes (a file or sampled), the base-class pool."""

    dataset: str = "openclipart"
    # What stands for the dataset in artifact keys (None: `dataset` itself). `tint fit` sets
    # the content hash of its snapshot, so that the keys follow the images, not the folder
    # they were copied to (a moved model folder, or --out spelt another way, reuses all).
    dataset_key: str | None = None
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

    RANGES = {"resolution": AT_LEAST_ONE, "first_episodes": AT_LEAST_ONE, "n_way": AT_LEAST_ONE,
              "k_shot": AT_LEAST_ONE, "n_query": NON_NEGATIVE, "n_episodes": AT_LEAST_ONE,
              "base_images_per_class": AT_LEAST_ONE, "min_base_classes": NON_NEGATIVE,
              "min_base_images": NON_NEGATIVE}


@dataclass
class GeneratorConfig(Settings):
    """How synthetic images are made (`tint.generators`); name "none" switches it off."""

    name: str = "tint"
    backbone: str = "tint-clipart"  # "tiny", "tint-clipart", a local path or a hub id
    images_per_class: int = 100
    seed: int = 0
    # The generator's own SpecializeSettings / GenerateSettings (see its module and
    # docs/generators.md). Kept apart so that one specialisation serves every generation
    # setting. A mapping in YAML (or in code); from load on (`check_components`), the
    # generator's settings objects, with every default.
    specialize: Any = field(default_factory=dict)
    generate: Any = field(default_factory=dict)

    RANGES = {"images_per_class": NON_NEGATIVE}


@dataclass
class MetaTrainConfig(Settings):
    """P>M>F meta-training on base-class episodes (paper: 100 epochs x 400 episodes)."""

    epochs: int = 1  # 0: no meta-training (the pretrained backbone as is)
    episodes_per_epoch: int = 20
    lr: float = 3e-3
    weight_decay: float = 1e-6
    n_way: int = 5
    k_shot: int = 5
    n_query: int = 15
    seed: int = 0

    RANGES = {"epochs": NON_NEGATIVE, "episodes_per_epoch": NON_NEGATIVE, "lr": POSITIVE,
              "weight_decay": NON_NEGATIVE, "n_way": Range(2), "k_shot": AT_LEAST_ONE,
              "n_query": AT_LEAST_ONE}


@dataclass
class TeacherConfig(Settings):
    """The few-shot teacher that pseudo-labels base and synthetic images."""

    name: str = "pmf"  # "pmf" | "labelhalluc"
    # pmf: "efficientnet-lite0" (offline default), "dino-vitb16", "vit:<dir or hub id>",
    # "tiny-vit" (random, for tests). labelhalluc: ignored (it uses `arch`).
    backbone: str = "efficientnet-lite0"
    meta_train: MetaTrainConfig = field(default_factory=MetaTrainConfig)
    arch: str | None = None  # labelhalluc network; None: the first student's arch
    pretrain_iterations: int = 2000  # labelhalluc: CE pre-training steps on base classes
    batch_size: int = 64  # images per forward pass when embedding
    # The teacher's own settings dataclass (tint.teachers.settings: pmf: scale,
    # finetune_steps, finetune_lr; labelhalluc: C, max_iter, batch_size, augment_copies,
    # seed). A mapping in YAML (or in code); from load on, that dataclass, every default in.
    settings: Any = field(default_factory=dict)

    RANGES = {"pretrain_iterations": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE}

    def validate(self, path: str = "") -> None:
        super().validate(path)
        self.meta_train.validate(f"{path}.meta_train")


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
class ExecutorConfig(Settings):
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

    RANGES = {"max_in_flight": AT_LEAST_ONE, "max_retries": NON_NEGATIVE, "cpus": POSITIVE,
              "threads": AT_LEAST_ONE}

    def validate(self, path: str = "") -> None:
        super().validate(path)
        for stage, gpus in self.gpus.items():
            NON_NEGATIVE.check(f"{path}.gpus.{stage}", gpus)


@dataclass
class ReportConfig(Settings):
    enabled: bool = True
    grid_images: int = 8  # generated images shown per class

    RANGES = {"grid_images": NON_NEGATIVE}


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


# ----------------------------------------------------------------------------- public API


def config_from_dict(data: dict | None) -> RunConfig:
    """Validate a plain mapping (as read from YAML) into a RunConfig: types, ranges, the
    component settings (resolved with their defaults), devices and model paths."""
    config = from_mapping(RunConfig, data, "")
    check_values(config)
    check_components(config)
    return config


def check_components(config: RunConfig) -> None:
    """Names and settings of the generator, teacher and students, resolved and checked
    (also for a RunConfig built in code, which `tint.pipeline` checks before any work).

    The generator's and the teacher's settings mappings are replaced by the components'
    settings objects (every field coerced, defaulted and range-checked), the one place they
    are typed: objects already of the right class are kept as they are."""
    from tint.generators import resolve_settings
    from tint.teachers import resolve_teacher_settings

    gen = config.generator
    gen.specialize, gen.generate = resolve_settings(gen.name, gen.specialize, gen.generate)
    config.teacher.settings = resolve_teacher_settings(config.teacher.name, config.teacher.settings)
    check_student_archs(config)
    check_embedded_generator(config)


def config_to_dict(config: Any) -> dict:
    """The fully resolved config as plain data (every default filled in; tuples as lists)."""
    return plain(config)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice; plain YAML loading would keep the last silently."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (a config that says
    `lr: 0.1` and later `lr: 0.01` is a mistake, not a choice of the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not key_node.start_mark:
                raise DuplicateKeyError(
                    f"key {key!r} appears twice in one mapping (line {first.line + 1} and line "
                    f"{key_node.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str) -> Any:
    """YAML as safe_load reads it, but a duplicate key is an error (DuplicateKeyError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise TintError(f"{path}: is a folder, not a config file; give a YAML file "
                        "such as configs/tiny.yaml")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise TintError(f"{path}: config file not found") from err
    except UnicodeDecodeError as err:
        raise TintError(f"{path}: not a text file (byte {err.start} is not UTF-8); "
                        "give a YAML config such as configs/tiny.yaml") from err
    except OSError as err:
        raise TintError(f"{path}: cannot read the config ({err.strerror or err})") from err
    except DuplicateKeyError as err:
        raise TintError(f"{path}: {err}") from err
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
    merged = _merge(config_to_dict(RunConfig()), data, RunConfig)
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


def _merge(defaults: Any, data: Any, cls: Any) -> Any:
    """`data` over `defaults`: a typed section (a settings dataclass) merges field by field;
    a free-form mapping (``executor.gpus``, ``generator.specialize``), a list or a value in
    `data` replaces the default whole, so ``--set executor.gpus={}`` stays empty."""
    if dataclasses.is_dataclass(cls) and isinstance(defaults, dict) and isinstance(data, dict):
        hints = typing.get_type_hints(cls)
        out = dict(defaults)
        for key, value in data.items():
            out[key] = (_merge(defaults[key], value, _section_type(hints.get(key)))
                        if key in defaults else value)
        return out
    return data


def _section_type(hint: Any) -> Any:
    """The settings dataclass a field holds (through `X | None`), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


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
    if path is not None and not data:
        raise TintError(f"{path}: the config is empty, which would start the paper-size run "
                        "with every default; give a config with at least one key (`tint run "
                        "--print-config` prints the demo's), or no config for the demo")
    data = data or {}
    for assignment in overrides or []:
        data = apply_override(data, assignment)
    return config_from_dict(data)


def save_resolved(config: RunConfig, path: str | Path) -> None:
    from tint.io import write_text

    write_text(path, dump_config(config))


# ----------------------------------------------------------------------------- value checks


# Range rules of the distillation loop (tint.students.distill.DistillConfig, paper B.4).
DISTILL_RANGES = {
    "iterations": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "temperature": POSITIVE,
    "lr": POSITIVE, "momentum": Range(0, 1, high_open=True), "weight_decay": NON_NEGATIVE,
    "lr_drop_at": NON_NEGATIVE, "lr_drop_factor": Range(0, 1, low_open=True),
    "eval_every": AT_LEAST_ONE, "checkpoint_every": AT_LEAST_ONE, "log_every": AT_LEAST_ONE,
    "repeats": AT_LEAST_ONE, "mix_alpha": POSITIVE, "teacher_size": AT_LEAST_ONE,
    "warmup": NON_NEGATIVE, "base_init_steps": NON_NEGATIVE,
}


def check_values(config: RunConfig) -> None:
    """Range checks that types cannot express; each names its key."""
    for section in ("data", "generator", "teacher", "executor", "report"):
        getattr(config, section).validate(section)
    check_ranges(config.distill, "distill", DISTILL_RANGES)
    check_interval("distill.crop_scale", config.distill.crop_scale, Range(0, 1, low_open=True))
    check_interval("distill.crop_ratio", config.distill.crop_ratio, POSITIVE)
    AT_LEAST_ONE.check("threads", config.threads)
    check_device("device", config.device, allow_auto=True)
    check_distill_device(config)
    check_model_paths(config)
    check_students(config)


def check_students(config: RunConfig) -> None:
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


def check_device(key: str, value: str, allow_auto: bool = False) -> None:
    """A torch device this machine has: ``cuda`` without CUDA fails here, not mid-run."""
    if allow_auto and value == "auto":
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        choices = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
        raise TintError(f"{key}: {value!r} is not a device; use {choices}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TintError(f"{key}: {value} asked for, but CUDA is not available on this "
                            f"machine; use {'auto or ' if allow_auto else ''}cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TintError(f"{key}: {value} asked for, but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise TintError(f"{key}: {value!r} is not supported; use cpu or cuda")


def check_distill_device(config: RunConfig) -> None:
    """``distill.device`` follows the run's `device` (each stage runs where the run does):
    its default "cpu", which every written config.yaml holds, says nothing and is kept; any
    other value must name the run's device, else the run would silently ignore it."""
    from tint.students.distill import DistillConfig

    value = config.distill.device
    if value == DistillConfig.device:
        return
    check_device("distill.device", value)
    from tint.devices import resolve_device

    if resolve_device(value, "distill.device") != resolve_device(config.device, "device"):
        raise TintError(f"distill.device: {value!r} differs from the run's device {config.device!r}; "
                        "students distil where the run computes: set the device with --device "
                        "(or the top-level `device` key) and leave distill.device out")


def looks_like_path(spec: str) -> bool:
    """A model spec meant as a local path (not a name such as "tiny", nor a hub id "org/name")."""
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        return True
    return "/" in spec and Path(spec.split("/")[0]).expanduser().is_dir()


def check_student_archs(config: RunConfig) -> None:
    from tint.students.models import list_students

    for i, student in enumerate(config.students):
        if student.arch not in list_students():
            raise TintError(f"students[{i}].arch: unknown student {student.arch!r}; "
                            f"choose one of {', '.join(list_students())}")


def check_embedded_generator(config: RunConfig) -> None:
    if config.generator.name == "none" or config.generator.backbone != "tint-clipart":
        return
    from tint.diffusion.backbone import EMBEDDED_GENERATOR_DIR, SMALL_GENERATOR_MARKER

    if not (EMBEDDED_GENERATOR_DIR / SMALL_GENERATOR_MARKER).is_file():
        raise TintError(
            f"generator.backbone: the embedded generator 'tint-clipart' is missing from "
            f"{EMBEDDED_GENERATOR_DIR}; reinstall tint, or set generator.backbone to a "
            "generator folder (tint pretrain-generator) or a Stable Diffusion folder"
        )


def check_model_paths(config: RunConfig) -> None:
    """A backbone given as a path must exist now, not when its stage starts an hour later."""
    specs = {"teacher.backbone": config.teacher.backbone.removeprefix("vit:")}
    if config.generator.name != "none":
        specs["generator.backbone"] = config.generator.backbone
    for key, spec in specs.items():
        if looks_like_path(spec) and not Path(spec).expanduser().exists():
            raise TintError(f"{key}: {spec} does not exist; give an existing model folder "
                            "(or a name: see docs/pipeline.md, \"Config\")")
