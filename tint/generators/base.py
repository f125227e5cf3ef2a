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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from tint.diffusion.bridge import PAPER_STEPS
from tint.errors import TintError
from tint.io import atomic_path, load_tensors, save_tensors
from tint.settings import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    Settings,
    join,
    resolve,
)

MANIFEST_NAME = "manifest.jsonl"
ARTIFACT_FORMAT = "tint-specialization"
ARTIFACT_VERSION = 1
TRAIN_TIMESTEPS = 1000  # every supported backbone trains on t in [0, 1000)


class Generator(Protocol):
    """The whole contract of a generator module (`create_generator(name)` returns one).

    - ``NAME``: the registry name, recorded in every artifact and manifest row;
    - ``SpecializeSettings`` / ``GenerateSettings``: `Settings` dataclasses whose fields are
      the config keys ``generator.specialize.*`` / ``generator.generate.*``; each checks its
      ranges in ``validate(path)``, and the run config resolves them when it loads;
    - ``REQUIRED_TENSORS``: what an artifact of this generator must hold to count as complete;
    - ``MAY_RETURN_FEWER``: True when ``generate`` may make fewer images than asked (a capped
      source such as real-data mining); the pipeline then uses what there is;
    - ``specialize(backbone, class_name, support [K,3,r,r] in [0,1], out_dir, settings)``
      writes one artifact for the class, atomically and last, and returns its path;
    - ``generate(backbone, artifact_path, n_images, out_dir, seed, settings)`` makes the
      images 0..n_images-1 that are not done yet (each from its own RNG, see `image_rng`) and
      returns the finished paths in index order.
    """

    NAME: str
    SpecializeSettings: type
    GenerateSettings: type
    REQUIRED_TENSORS: tuple[str, ...]
    MAY_RETURN_FEWER: bool

    def specialize(self, backbone: Any, class_name: str, support: torch.Tensor,
                   out_dir: str | Path, settings: Any = None) -> Path: ...

    def generate(self, backbone: Any, artifact_path: str | Path, n_images: int,
                 out_dir: str | Path, seed: int = 0, settings: Any = None) -> list[Path]: ...


# ---------------------------------------------------------------------------------------------
# Settings shared by several generators (config keys stay flat: a subclass adds fields)


@dataclass
class BridgeSettings(Settings):
    """What every diffusion specialisation shares: the sampling defaults it stores in the
    artifact and the resolution bridge from dataset images to the model (docs/diffusion.md)."""

    num_steps: int = 50  # DDIM steps used at generation
    guidance: float = 7.5
    super_resolver: str | None = None  # None: bilinear only; see tint/diffusion/bridge.py
    bridge_steps: Sequence[int | str] = field(default_factory=lambda: list(PAPER_STEPS))
    dataset_resolution: int | None = None  # None: the supports' size
    progress: bool = True
    backbone: str | None = None  # provenance: the spec the backbone was loaded from

    RANGES = {"num_steps": AT_LEAST_ONE, "guidance": NON_NEGATIVE,
              "dataset_resolution": AT_LEAST_ONE}


@dataclass
class TISettings(BridgeSettings):
    """Textual inversion of the class word (Gal et al.), shared by tint, plain TI and
    DA-Fusion. Defaults = the "Plain TI" row: full timestep range [0, 1000)."""

    template: str = "a photo of an {}"  # the class token goes into the {}
    token: str | None = None  # None: "<GENERATOR-class>"
    init_word: str = "object"
    ti_steps: int = 5000
    ti_lr: float = 1e-3
    ti_t_min: int = 0  # 0: standard TI over [0, T); 250: the paper's limited range
    ti_batch_size: int = 1
    ti_grad_accum: int = 1
    store_support: bool = True  # keep the bridged supports in the artifact
    seed: int = 0  # TI timestep/noise draws

    RANGES = {**BridgeSettings.RANGES, "ti_steps": AT_LEAST_ONE, "ti_lr": POSITIVE,
              "ti_t_min": Range(0, TRAIN_TIMESTEPS, high_open=True),
              "ti_batch_size": AT_LEAST_ONE, "ti_grad_accum": AT_LEAST_ONE}

    def validate(self, path: str = "") -> None:
        super().validate(path)
        if "{}" not in self.template:
            raise TintError(f"{join(path, 'template')}: must contain '{{}}' where the class "
                            f"token goes, got {self.template!r}")


@dataclass
class SamplingSettings(Settings):
    """Generation knobs every sampler shares. `batch_size` is a memory setting: it never
    changes an image."""

    batch_size: int = 8
    resolution: int | None = None  # None: the artifact's dataset resolution
    guidance: float | None = None  # None: the artifact's
    progress: bool = True

    RANGES = {"batch_size": AT_LEAST_ONE, "resolution": AT_LEAST_ONE, "guidance": NON_NEGATIVE}


@dataclass
class PromptSamplingSettings(SamplingSettings):
    """Sampling from a learned word against an ordinary negative prompt (plain TI, DA-Fusion)."""

    num_steps: int | None = None  # None: the artifact's
    negative_prompt: str = ""  # the ordinary unconditional prompt of CFG

    RANGES = {**SamplingSettings.RANGES, "num_steps": AT_LEAST_ONE}


def settings_from(cls: type, settings: Any, path: str | None = None) -> Any:
    """None, a mapping (YAML, CLI) or a `cls` instance as a checked `cls` (coerced, in range);
    errors name `path` (default: the class name), e.g. ``generator.generate.alpha``."""
    return resolve(cls, settings, cls.__name__ if path is None else path)


def check_count(n_images: int) -> None:
    if n_images < 0:
        raise TintError(f"n_images must be >= 0, got {n_images}")


# Display/execution-only settings: never make an artifact stale (nti_batch: batched NTI
# equals one-at-a-time up to rounding, tests/test_ddim_nti.py)
NOT_RECORDED = ("progress", "nti_batch")


# Execution-only settings left out of artifact keys: adding one must not change any key.
# (`progress` has always been in the keys, so it stays there: stores written before reuse.)
NOT_IN_KEY = ("nti_batch",)


def settings_key(settings: Any) -> dict[str, Any]:
    """What an artifact key hashes: every field with its default filled in (an explicit
    default and an absent key give one key), minus the execution-only `NOT_IN_KEY`."""
    data = {k: v for k, v in asdict(settings).items() if k not in NOT_IN_KEY}
    return json.loads(json.dumps(data, default=str))


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
    return [path for path in (_inside(out_dir, r["file"]) for r in rows) if path.is_file()]


def _inside(folder: Path, name: str) -> Path:
    """A manifest row's file, which must lie inside the manifest's own folder: a manifest
    that names a file elsewhere (edited by hand, or tampered with) is refused."""
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise TintError(f"{folder / MANIFEST_NAME}: names {name!r}, which is outside {folder}; "
                        "a manifest may only list its own images: delete the folder and run again")
    return path


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


# ---------------------------------------------------------------------------------------------
# Textual inversion of the class word (tint, plain TI and DA-Fusion specialise through this)

TI_GENERATORS = ("plain-ti", "da-fusion", "tint", "tint-lora")  # artifacts that carry a TI embedding


@dataclass
class LearnedWord:
    """One class's bridged supports and the word textual inversion learned for them."""

    support: torch.Tensor  # [K,3,r,r] at dataset resolution, validated
    images: torch.Tensor  # [K,3,M,M] bridged to the model's resolution
    bridge: Any  # tint.diffusion.bridge.ResolutionBridge
    token: str
    embedding: torch.Tensor  # [D]
    losses: list[float]

    @property
    def dataset_resolution(self) -> int:
        return int(self.support.shape[-1])

    def provenance(self, settings: TISettings) -> dict:
        """Artifact metadata that says how the word was made (settings, bridge, losses)."""
        return {"bridge": self.bridge.plan(self.dataset_resolution),
                "settings": settings_dict(settings), "backbone": settings.backbone,
                "support_sha256": support_fingerprint(self.support),
                "ti_final_loss": self.losses[-1] if self.losses else None,
                "ti_first_loss": self.losses[0] if self.losses else None}


def learn_class_word(backbone: Any, class_name: str, support: torch.Tensor, s: TISettings,
                     generator: str) -> LearnedWord:
    """Validate the supports, bridge them to the model's resolution, run TI on all of them."""
    from tint.diffusion.bridge import ResolutionBridge, load_super_resolver
    from tint.diffusion.textual_inversion import TextualInversionConfig, textual_inversion

    support = validate_support(support, class_name, s.dataset_resolution)
    token = fresh_token(backbone, s.token or f"<{generator}-{safe_name(class_name).lower()}>")
    bridge = ResolutionBridge(backbone.resolution, s.bridge_steps,
                              load_super_resolver(s.super_resolver, backbone.device))
    images = bridge.to_model(support)
    config = TextualInversionConfig(
        placeholder=token, init_word=s.init_word, template=s.template, steps=s.ti_steps,
        lr=s.ti_lr, t_min=s.ti_t_min, batch_size=s.ti_batch_size, grad_accum=s.ti_grad_accum,
        seed=s.seed,
    )
    ti = textual_inversion(backbone, images, config, progress=s.progress)
    return LearnedWord(support, images, bridge, ti.token, ti.embedding, list(ti.losses))


def artifact_meta(model: Any, generator: str, class_name: str, /, **values: Any) -> dict:
    """The metadata every diffusion artifact carries: who made it, for which model."""
    return {"generator": generator, "class": class_name, **values,
            "model_resolution": model.resolution, "prediction_type": model.prediction_type,
            "latent_shape": list(model.latent_shape)}


def save_learned_word(path: Path, word: LearnedWord) -> None:
    """The diffusers textual-inversion side file ``<class>.ti.safetensors``."""
    from tint.diffusion.textual_inversion import save_textual_inversion

    save_textual_inversion(path.with_suffix(".ti.safetensors"), word.token, word.embedding)


@dataclass
class TIArtifact:
    path: Path
    class_name: str
    token: str
    prompt: str
    embedding: torch.Tensor  # [D]
    support: torch.Tensor | None  # [K, 3, M, M] bridged supports, if stored
    meta: dict


def load_ti_artifact(path: str | Path, required: Sequence[str] = ("embedding",)) -> TIArtifact:
    """Any artifact that carries a TI embedding (plain-ti, da-fusion or tint)."""
    tensors, meta = load_artifact(path, required)
    if meta.get("generator") not in TI_GENERATORS:
        raise TintError(f"{path}: made by generator {meta.get('generator')!r}, which stores no "
                        f"TI embedding; use an artifact of {', '.join(TI_GENERATORS)}")
    return TIArtifact(Path(path), meta["class"], meta["token"], meta["prompt"],
                      tensors["embedding"], tensors.get("support"), meta)


def class_conditioning(backbone: Any, artifact: TIArtifact,
                       negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Install the learned word; return (cond, uncond) text states, each [1, L, D]."""
    install_token_embedding(backbone, artifact.token, artifact.embedding)
    return backbone.encode_prompt([artifact.prompt]), backbone.encode_prompt([negative_prompt])


def sampling_settings(artifact: TIArtifact, s: PromptSamplingSettings) -> tuple[int, float, int]:
    """Output resolution, CFG scale and DDIM steps: the settings' own, else the artifact's."""
    resolution = s.resolution or int(artifact.meta["dataset_resolution"])
    guidance = float(artifact.meta.get("guidance", 7.5) if s.guidance is None else s.guidance)
    num_steps = int(artifact.meta.get("num_steps", 50) if s.num_steps is None else s.num_steps)
    return resolution, guidance, num_steps


def specialize_ti(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
                  s: TISettings, generator: str) -> Path:
    """Learn the class word, write the artifact (last: it marks the class done)."""
    word = learn_class_word(backbone, class_name, support, s, generator)
    tensors = {"embedding": word.embedding.detach().float().reshape(-1).cpu()}
    if s.store_support:
        tensors["support"] = word.images.float().cpu()
    meta = artifact_meta(
        backbone, generator, class_name, token=word.token, prompt=s.template.format(word.token),
        num_steps=s.num_steps, guidance=s.guidance, support_count=int(word.support.shape[0]),
        dataset_resolution=word.dataset_resolution, **word.provenance(s))
    target = artifact_path(out_dir, class_name)
    save_learned_word(target, word)
    return save_artifact(target, tensors, meta)


# ---------------------------------------------------------------------------------------------
# Writing images


def write_generated(out_dir: Path, class_name: str, indices: Sequence[int], images: torch.Tensor,
                    rows: Sequence[Mapping[str, Any]]) -> None:
    """Images first (atomic), then their manifest rows (fsync'ed): resumable like TINT."""
    full_rows = []
    for index, image, row in zip(indices, images, rows, strict=True):
        relpath = image_relpath(class_name, index)
        write_image(out_dir / relpath, image)
        full_rows.append({"file": relpath, "class": class_name, "index": int(index), **row})
    write_manifest_rows(out_dir, full_rows)


def class_text(class_name: str, template: str) -> str:
    """'food.fruit' -> 'a photo of a food fruit' (folder-style names read as words)."""
    words = class_name.replace(".", " ").replace("_", " ").replace("-", " ")
    return template.format(class_name=" ".join(words.split()))


def batches(todo: Sequence[int], batch_size: int, desc: str, progress: bool) -> Iterator[list[int]]:
    """The indices still to make, `batch_size` at a time, with a progress bar over images."""
    with tqdm(total=len(todo), desc=desc, disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = list(todo[start:start + batch_size])
            yield batch
            bar.update(len(batch))


def draw_support_and_noise(rng: torch.Generator, num_supports: int, fixed: float,
                           value_range: Sequence[float] | None,
                           latent_shape: Sequence[int]) -> tuple[int, float, torch.Tensor]:
    """One image's draws from its own RNG, always in this order: the support k ~ U{0..K-1},
    a blend value (`fixed`, or ~ U(lo, hi) with `value_range`), then the noise n ~ N(0, I);
    so a fixed and a random value give the image the same k and n."""
    k = int(torch.randint(num_supports, (1,), generator=rng))
    u = float(torch.rand(1, generator=rng))
    value = fixed
    if value_range is not None:
        lo, hi = value_range
        value = lo + (hi - lo) * u
    return k, float(value), torch.randn(tuple(latent_shape), generator=rng)
