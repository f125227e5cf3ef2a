"""Datasets stored as arrays in one file: idx (MNIST / Fashion-MNIST) and CIFAR pickles.

Items in such files are referenced as ``"<file>#<index>"``. Arrays are read once and
cached per file.

CIFAR-100's "python version" *is* a pickle. Plain ``pickle.load`` would execute whatever
a tampered file asks for, so `safe_unpickle` allows only what those files contain:
dicts, lists, bytes, str, int (pickle opcodes, no code), numpy arrays and dtypes
(``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``, and
``_frombuffer`` for protocol 5) and ``_codecs.encode`` for latin-1 only (how Python 3
writes bytes at protocol 2). Any other global is refused with a TintError, and arrays
of Python objects are refused after loading.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tint.errors import TintError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise TintError(f"{path}: file not found") from err
    except OSError as err:
        raise TintError(f"{path}: cannot read ({err})") from err
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise TintError(f"{path}: corrupt gzip file ({err})") from err
    return raw


def parse_idx(raw: bytes, source: str | Path) -> np.ndarray:
    """Decode an idx file (magic: two zero bytes, dtype code, number of dimensions)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise TintError(f"{source}: not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TintError(f"{source}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise TintError(
            f"{source}: idx payload has {len(raw) - header} bytes, shape {shape} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _file_key(path: str | Path) -> tuple[str, int, int]:
    """Cache key that changes when the file is replaced or rewritten."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        raise TintError(f"{path}: file not found") from err
    return str(path), stat.st_mtime_ns, stat.st_size


def read_idx(path: str | Path) -> np.ndarray:
    """An idx or idx.gz file as a numpy array (cached per file version)."""
    return _read_idx_cached(_file_key(path))


@lru_cache(maxsize=8)
def _read_idx_cached(key: tuple[str, int, int]) -> np.ndarray:
    return parse_idx(_read_bytes(Path(key[0])), key[0])


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy/array globals CIFAR files use."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _check_no_objects(obj: Any) -> None:
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise pickle.UnpicklingError("arrays of Python objects are not allowed")
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_no_objects(key)
            _check_no_objects(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _check_no_objects(value)


def safe_unpickle(path: str | Path) -> Any:
    """Load a CIFAR-style python pickle without executing arbitrary code (see module doc)."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
        _check_no_objects(obj)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise TintError(f"{path}: not a valid CIFAR python pickle ({err})") from err
    return obj


def get_key(data: dict, key: str, source: str | Path) -> Any:
    """dict lookup accepting both b'key' (Python 2 pickles) and 'key'."""
    if not isinstance(data, dict):
        raise TintError(f"{source}: expected a dict in the pickle, found {type(data).__name__}")
    for candidate in (key.encode(), key):
        if candidate in data:
            return data[candidate]
    raise TintError(f"{source}: the pickle has no {key!r} entry")


def read_cifar_images(path: str | Path) -> np.ndarray:
    """CIFAR ``data`` (N x 3072, channel-major) as uint8 [N, 32, 32, 3] (cached per version)."""
    return _read_cifar_cached(_file_key(path))


@lru_cache(maxsize=8)
def _read_cifar_cached(key: tuple[str, int, int]) -> np.ndarray:
    path = Path(key[0])
    data = np.asarray(get_key(safe_unpickle(path), "data", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise TintError(
            f"{path}: 'data' must be uint8 of shape [N, 3072], got {data.dtype} {data.shape}"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"


def read_array_image(path: str | Path, index: int) -> Image.Image:
    """Image `index` of an idx file (grayscale) or CIFAR pickle (RGB)."""
    path = Path(path)
    if not path.is_file():
        raise TintError(f"{path}: file not found (referenced as {path}#{index})")
    arr = read_cifar_images(path) if _is_pickle(path) else read_idx(path)
    if not 0 <= index < len(arr):
        raise TintError(f"{path}#{index}: index out of range (the file holds {len(arr)} images)")
    item = np.ascontiguousarray(arr[index])
    if item.dtype != np.uint8:
        item = np.clip(item, 0, 255).astype(np.uint8)
    if item.ndim not in (2, 3):
        raise TintError(f"{path}: items of shape {item.shape} are not images")
    return Image.fromarray(item, "L" if item.ndim == 2 else "RGB")
