"""Typed settings: plain data (YAML, ``--set``, CLI flags) in, checked dataclasses out.

Every settings dataclass of tint (the run config's sections in `tint.config`, each
generator's ``SpecializeSettings``/``GenerateSettings``, each teacher's settings) goes
through the same two steps, so that a bad value fails before any work with the key path:

1. `from_mapping(cls, data, path)`: unknown keys and wrong types are refused, YAML's
   string forms are converted (``1e-3`` is read by YAML 1.1 as a string: it becomes a
   float), and NaN or infinity is refused in every float;
2. ``settings.validate(path)``: the range rules of the class (`Range`), each error naming
   ``path.field`` and the rule, e.g. ``generator.generate.alpha: must be in [0, 1], got 2.0``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from tint.errors import TintError

# ----------------------------------------------------------------------------- types


def type_name(tp: Any) -> str:
    """How a type reads in an error message ("float", "list of int", "'a' | 'b'")."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Mapping) or dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Return `value` as type `tp` or raise TintError naming `path`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        return _coerce_union(value, tp, path)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise type_error(path, tp, value)
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise type_error(path, tp, value)
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        return _coerce_tuple(value, tp, path)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise type_error(path, tp, value)
        _, value_tp = typing.get_args(tp) or (str, Any)
        return {str(k): coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, path)
    if tp in (bool, int, float, str):
        return _coerce_scalar(value, tp, path)
    raise TypeError(f"tint.settings: unsupported field type {tp!r} at {path}")


def _coerce_union(value: Any, tp: Any, path: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # `X | None`: X's own error is the most precise
        try:
            return coerce(value, options[0], path)
        except TintError as err:
            if value is None or str(err).startswith(f"{path}: expected"):
                raise type_error(path, tp, value) from err
            raise
    for arg in options:
        try:
            return coerce(value, arg, path)
        except TintError:
            continue
    raise type_error(path, tp, value)


def _coerce_tuple(value: Any, tp: Any, path: str) -> tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise type_error(path, tp, value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise TintError(f"{path}: expected {len(args)} values, got {list(value)!r}")
    return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _coerce_scalar(value: Any, tp: type, path: str) -> Any:
    if tp is float:
        number = _as_float(value)
        if number is None:
            raise type_error(path, tp, value)
        if not math.isfinite(number):
            raise TintError(f"{path}: must be a finite number, got {value!r}")
        return number
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise type_error(path, tp, value)
    return value


def _as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def type_error(path: str, tp: Any, value: Any) -> TintError:
    return TintError(f"{path}: expected {type_name(tp)}, got {value!r}")


def from_mapping(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise TintError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [str(k) for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise TintError(f"{key}: unknown key; valid keys here: {', '.join(fields)}")
    kwargs = {name: coerce(value, hints[name], f"{path}.{name}" if path else name)
              for name, value in data.items()}
    return cls(**kwargs)


def plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings as plain YAML/JSON data (tuples become lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """An interval a number must lie in; None values (unset options) always pass."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None
                    and (value > self.high or (self.high_open and value == self.high)))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                f"{_num(self.high)}{')' if self.high_open else ']'}")

    def check(self, path: str, value: Any) -> None:
        """Raise naming `path` unless `value` (or each item of a list) is in range."""
        if value is None:
            return
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                self.check(f"{path}[{i}]", item)
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.holds(value):
            raise TintError(f"{path}: must be {self}, got {value!r}")


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


POSITIVE = Range(0, low_open=True)  # learning rates, temperatures, scales
NON_NEGATIVE = Range(0)  # counts that may be zero, guidance, weight decay
AT_LEAST_ONE = Range(1)  # steps, batch sizes, resolutions
UNIT = Range(0, 1)  # blends and fractions: alpha, strength


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def check_ranges(obj: Any, path: str, ranges: Mapping[str, Range]) -> None:
    for name, rule in ranges.items():
        rule.check(join(path, name), getattr(obj, name))


def check_interval(path: str, value: Sequence[float] | None, rule: Range = UNIT) -> None:
    """A (lo, hi) pair inside `rule` with lo <= hi (alpha_range, strength_range)."""
    if value is None:
        return
    if len(value) != 2:
        raise TintError(f"{path}: expected two values [lo, hi], got {list(value)!r}")
    rule.check(path, list(value))
    if value[0] > value[1]:
        raise TintError(f"{path}: lo must be <= hi, got {list(value)!r}")


class Settings:
    """Mixin of every settings dataclass: `RANGES` (field -> Range) plus ``validate``.

    Subclasses extend ``RANGES`` (``{**Parent.RANGES, ...}``) and override ``validate`` for
    rules a range cannot state, calling ``super().validate(path)`` first.
    """

    RANGES: ClassVar[dict[str, Range]] = {}

    def validate(self, path: str = "") -> None:
        check_ranges(self, path, self.RANGES)


def resolve(cls: type, data: Any, path: str) -> Any:
    """`data` (None, a mapping or a `cls` instance) as a checked `cls`, errors naming `path`.

    A `cls` instance is returned as is (range-checked, never rebuilt): the run config holds
    its settings objects from load on, and the code that uses them reads them unchanged.
    Another settings dataclass (e.g. the generator's settings of before a ``replace`` of
    its name) is read as the mapping of its fields."""
    if dataclasses.is_dataclass(data) and not isinstance(data, (type, cls)):
        data = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    settings = data if isinstance(data, cls) else from_mapping(cls, data, path)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate(path)
    return settings
