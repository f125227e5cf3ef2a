"""Soft pseudo-labels: the teacher's probabilities over the episode's N classes, cached.

``pseudo_label`` computes them once per (teacher state, image list) and stores them as
safetensors in the run directory. The cache key is a hash of the item ids (or, for
in-memory tensors, of their bytes) plus ``key_extra`` (name the teacher and episode
there: a different support set means different labels). A second call with the same key
only reads the file. Long lists are labelled in chunks; finished chunks are saved to a
``.partial`` file so a killed run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tint.errors import TintError
from tint.io import load_tensors, save_tensors

log = logging.getLogger(__name__)


def items_key(items: Sequence[str] | torch.Tensor, key_extra: str = "") -> str:
    """Hash identifying the labelled images (ids in order, or tensor content) + extra."""
    h = hashlib.sha256(key_extra.encode())
    if isinstance(items, torch.Tensor):
        h.update(str(tuple(items.shape)).encode())
        h.update(items.detach().cpu().contiguous().float().numpy().tobytes())
    else:
        for item in items:
            h.update(item.encode())
            h.update(b"\0")
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    tensors, meta = load_tensors(path)
    if (meta or {}).get("key") != key or "probs" not in tensors:
        return None
    return tensors["probs"]


def _predict(teacher, x: torch.Tensor | None, ids: Sequence[str] | None) -> torch.Tensor:
    if ids is not None and hasattr(teacher, "is_cached"):
        return teacher.predict_proba(x, ids=ids)
    return teacher.predict_proba(x)


def pseudo_label(teacher, items_or_tensor: Sequence[str] | torch.Tensor, cache_path: str | Path,
                 load: Callable[[list[str]], torch.Tensor] | None = None, key_extra: str = "",
                 chunk_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Teacher probabilities ``[B, N]`` for images (a tensor) or item ids (with `load`).

    The teacher must already be fitted to the episode's support set. `load(ids)` returns
    the images of a list of item ids as ``[b,3,H,W]`` in [0, 1]; it is not called for
    chunks whose features the teacher has cached by id.
    """
    path = Path(cache_path)
    is_tensor = isinstance(items_or_tensor, torch.Tensor)
    if not is_tensor and load is None:
        raise TintError("pseudo_label: item ids need a `load` function that returns images")
    total = len(items_or_tensor)
    key = items_key(items_or_tensor, key_extra)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    if path.is_file():
        log.info("%s: cached pseudo-labels are for other images/teacher: recomputing", path)
    if total == 0:
        raise TintError(f"pseudo_label: no images to label for {path}")

    partial_path = path.with_name(path.name + ".partial")
    done = _read_cache(partial_path, key)
    chunks = [] if done is None else [done]
    start = 0 if done is None else len(done)
    bar = tqdm(total=total, initial=start, desc=f"pseudo-label {path.stem}", disable=not progress)
    for lo in range(start, total, chunk_size):
        hi = min(lo + chunk_size, total)
        if is_tensor:
            probs = _predict(teacher, items_or_tensor[lo:hi], None)
        else:
            ids = list(items_or_tensor[lo:hi])
            cached_ids = hasattr(teacher, "is_cached") and teacher.is_cached(ids)
            probs = _predict(teacher, None if cached_ids else load(ids), ids)
        chunks.append(probs.float().cpu())
        bar.update(hi - lo)
        if hi < total:
            save_tensors(partial_path, {"probs": torch.cat(chunks)}, {"key": key})
    bar.close()
    probs = torch.cat(chunks)
    if not torch.isfinite(probs).all():
        raise TintError(f"pseudo-labelling: the teacher produced non-finite probabilities "
                        f"for {path}; check the teacher weights")
    save_tensors(path, {"probs": probs}, {"key": key, "count": total,
                                          "num_classes": probs.shape[1]})
    partial_path.unlink(missing_ok=True)
    return probs
