"""What every generator shares: the protocol, artifacts, manifests, seeding, image writing.

A generator is a module with ``specialize(...)`` (support images -> one artifact per class)
and ``generate(...)`` (artifact -> images + manifest rows). The helpers here make each
generator's stages resumable in the same way:

- artifacts are one safetensors file per class, written atomically and validated on load
  (finite values, the tensors the generator needs), so "exists and loads" means "complete";
- images are written atomically first, then their manifest row is appended and fsync'ed, so
  the manifest never names a missing or half-written image; a resumed run redoes exactly the
  indices that are not both in the manifest and on disk;
- every image gets its own RNG seeded from (run seed, class, index), so an image does not
  depend on the batch it was made in, on resumes, or on the other classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from tint.errors import TintError
from tint.io import atomic_path, load_tensors, save_tensors

MANIFEST_NAME = "manifest.jsonl"
ARTIFACT_FORMAT = "tint-specialization"
ARTIFACT_VERSION = 1


class Generator(Protocol):
    """The interface `create_generator(name)` returns (a module satisfies it)."""

    NAME: str

    def specialize(self, backbone: Any, class_name: str, support: torch.Tensor,
                   out_dir: str | Path, settings: Any = None) -> Path: ...

    def generate(self, backbone: Any, artifact_path: str | Path, n_images: int,
                 out_dir: str | Path, seed: int = 0, settings: Any = None) -> list[Path]: ...


# ---------------------------------------------------------------------------------------------
# Settings


def settings_from(cls: type, settings: Any) -> Any:
    """Accept None, a dataclass instance or a mapping (e.g. from a YAML config)."""
    if settings is None:
        return cls()
    if isinstance(settings, cls):
        return settings
    if isinstance(settings, Mapping):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TintError(f"{cls.__name__}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**settings)
    raise TintError(f"{cls.__name__}: expected a mapping or {cls.__name__}, got {type(settings).__name__}")


NOT_RECORDED = ("progress",)  # display-only settings: never make an artifact stale


def settings_dict(settings: Any) -> dict[str, Any]:
    """JSON-able dict of a (possibly nested) settings dataclass, for artifact metadata."""
    data = asdict(settings) if is_dataclass(settings) else dict(settings)
    data = {k: v for k, v in data.items() if k not in NOT_RECORDED}
    return json.loads(json.dumps(data, default=str))


# ---------------------------------------------------------------------------------------------
# Names, seeds


def safe_name(class_name: str) -> str:
    """A file-system-safe stem for a class name (artifacts and image folders use it)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", class_name).strip("._")
    if not stem:
        stem = "class"
    if stem != class_name:  # keep distinct classes distinct after sanitising
        stem += "-" + hashlib.sha256(class_name.encode()).hexdigest()[:8]
    return stem


def image_seed(seed: int, class_name: str, index: int) -> int:
    """A 63-bit seed for one image, stable across runs, batch sizes and machines."""
    digest = hashlib.sha256(f"tint/{int(seed)}/{class_name}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def support_fingerprint(support: torch.Tensor) -> str:
    """sha256 of the support pixels: a resumed run must not reuse another episode's artifact."""
    data = support.detach().float().contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def image_rng(seed: int, class_name: str, index: int) -> torch.Generator:
    """CPU generator for one image's random draws (draw on CPU, move to device after)."""
    return torch.Generator("cpu").manual_seed(image_seed(seed, class_name, index))


# ---------------------------------------------------------------------------------------------
# Artifacts


def artifact_path(out_dir: str | Path, class_name: str) -> Path:
    return Path(out_dir) / f"{safe_name(class_name)}.safetensors"


def list_artifacts(folder: str | Path) -> list[Path]:
    """Class artifacts in a folder (diffusers TI side files `*.ti.safetensors` excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TintError(f"{folder}: artifacts folder not found; run `tint specialize` first")
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.endswith(".ti.safetensors"))


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TintError(f"{where}: tensor {key!r} contains NaN or infinity; "
                            "the optimisation diverged: lower the learning rate and re-run")


def save_artifact(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: dict) -> Path:
    """Validate then write atomically; the file is the stage's completion marker."""
    path = Path(path)
    check_finite(tensors, str(path))
    meta = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, **meta}
    save_tensors(path, dict(tensors), meta)
    return path


def load_artifact(path: str | Path, required: Iterable[str] = (),
                  generator: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and validate an artifact; every problem is a TintError naming the file."""
    path = Path(path)
    try:
        tensors, meta = load_tensors(path)
    except TintError:
        raise
    except Exception as err:  # safetensors raises its own error types on corrupt files
        raise TintError(f"{path}: not a readable safetensors artifact ({err}); delete it and "
                        "re-run `tint specialize`") from err
    if not meta or meta.get("format") != ARTIFACT_FORMAT:
        raise TintError(f"{path}: not a tint specialisation artifact (no tint metadata)")
    if generator is not None and meta.get("generator") != generator:
        raise TintError(f"{path}: made by generator {meta.get('generator')!r}, not {generator!r}")
    missing = [key for key in required if key not in tensors]
    if missing:
        raise TintError(f"{path}: artifact lacks {missing}; delete it and re-run `tint specialize`")
    check_finite(tensors, str(path))
    return tensors, meta


def artifact_is_complete(path: str | Path, required: Iterable[str] = (),
                         settings: Mapping | None = None) -> bool:
    """True when `path` loads cleanly (and, if given, was made with the same settings)."""
    if not Path(path).is_file():
        return False
    try:
        _, meta = load_artifact(path, required)
    except TintError:
        return False
    return settings is None or meta.get("settings") == settings_dict(settings)


# ---------------------------------------------------------------------------------------------
# Learned tokens


def fresh_token(backbone: Any, token: str) -> str:
    """`token`, or `token` with a number when the tokenizer already knows it (re-runs)."""
    vocab = backbone.tokenizer.get_vocab()
    candidate, n = token, 1
    while candidate in vocab:
        candidate = f"{token[:-1]}-{n}>" if token.endswith(">") else f"{token}-{n}"
        n += 1
    return candidate


def install_token_embedding(backbone: Any, token: str, vector: torch.Tensor) -> int:
    """Make `token` a single tokenizer token whose input embedding is `vector`.

    Works for any text encoder with ``get_input_embeddings``/``resize_token_embeddings``
    (CLIP, MiniLM, ...). Reinstalling the same token just overwrites its row, so many
    classes (distinct tokens) can share one backbone.
    """
    tokenizer, encoder = backbone.tokenizer, backbone.text_encoder
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if list(ids) != [token_id]:
        raise TintError(f"token {token!r}: the tokenizer splits it into {ids}; use another name")
    table = encoder.get_input_embeddings()
    if vector.numel() != table.weight.shape[1]:
        raise TintError(f"token {token!r}: embedding has {vector.numel()} values but the text "
                        f"encoder expects {table.weight.shape[1]}: artifact and backbone differ")
    if token_id >= table.weight.shape[0]:
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # row set below
        table = encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight[token_id] = vector.reshape(-1).to(table.weight)
    return token_id


# ---------------------------------------------------------------------------------------------
# Images and manifest


def image_relpath(class_name: str, index: int) -> str:
    """Where image `index` of a class goes, relative to the output folder."""
    return f"{safe_name(class_name)}/{int(index):06d}.png"


def write_image(path: str | Path, x01: torch.Tensor) -> Path:
    """Write one [3,H,W] image in [0,1] as an 8-bit PNG, atomically."""
    if x01.ndim != 3 or x01.shape[0] != 3:
        raise TintError(f"{path}: expected an image tensor [3,H,W], got {tuple(x01.shape)}")
    array = (x01.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0)
    array = np.rint(array).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array, "RGB").save(tmp, format="PNG")
    return Path(path)


def read_manifest(out_dir: str | Path) -> list[dict]:
    """Manifest rows, last row per (class, index) wins; a torn last line is ignored."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return []
    rows: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
            key = (str(row["class"]), int(row["index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut short by a kill: its image is redone on resume
        rows[key] = row
    return list(rows.values())


def completed_indices(out_dir: str | Path, class_name: str) -> set[int]:
    """Indices of a class that are both in the manifest and on disk."""
    out_dir = Path(out_dir)
    return {int(row["index"]) for row in read_manifest(out_dir)
            if row["class"] == class_name and (out_dir / row["file"]).is_file()}


def missing_indices(out_dir: str | Path, class_name: str, n_images: int) -> list[int]:
    done = completed_indices(out_dir, class_name)
    return [i for i in range(n_images) if i not in done]


def write_manifest_rows(out_dir: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows durably (flush + fsync); call only after their images are on disk."""
    rows = list(rows)
    if not rows:
        return
    path = Path(out_dir) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = ""
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                prefix = "\n"  # isolate a torn line left by a kill
    text = prefix + "".join(json.dumps(dict(row), sort_keys=False) + "\n" for row in rows)
    with path.open("a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def manifest_paths(out_dir: str | Path, class_name: str, n_images: int | None = None) -> list[Path]:
    """Paths of a class's finished images in index order (the first `n_images` if given)."""
    out_dir = Path(out_dir)
    rows = sorted((r for r in read_manifest(out_dir) if r["class"] == class_name),
                  key=lambda r: int(r["index"]))
    if n_images is not None:
        rows = [r for r in rows if int(r["index"]) < n_images]
    return [out_dir / r["file"] for r in rows if (out_dir / r["file"]).is_file()]


# ---------------------------------------------------------------------------------------------
# Input validation


def validate_support(support: Any, class_name: str, resolution: int | None = None) -> torch.Tensor:
    """Support images must be float [K,3,r,r] in [0,1], K >= 1: say what is wrong otherwise."""
    where = f"class {class_name!r}"
    if not isinstance(support, torch.Tensor):
        raise TintError(f"{where}: support images must be a torch tensor [K,3,H,W], "
                        f"got {type(support).__name__}")
    if support.ndim != 4:
        raise TintError(f"{where}: support images must be [K,3,H,W], got shape {tuple(support.shape)}")
    if support.shape[0] == 0:
        raise TintError(f"{where}: no support images; every class needs at least one image")
    if support.shape[1] != 3:
        raise TintError(f"{where}: support images have {support.shape[1]} channels; convert them "
                        "to RGB (grayscale, RGBA and palette images are not accepted as is)")
    if not support.is_floating_point():
        raise TintError(f"{where}: support images are {support.dtype}; expected float32 in [0,1] "
                        "(divide 8-bit images by 255)")
    height, width = support.shape[-2:]
    if height != width:
        raise TintError(f"{where}: support images are {height}x{width}; expected square images")
    if resolution is not None and height != resolution:
        raise TintError(f"{where}: support images are {height}x{width}; the dataset resolution "
                        f"is {resolution}: load them at that resolution")
    if not torch.isfinite(support).all() or support.min() < 0 or support.max() > 1:
        raise TintError(f"{where}: support image values must be finite and in [0,1]")
    return support.float()
