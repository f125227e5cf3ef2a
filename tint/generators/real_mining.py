"""Real-data mining (the paper's LAION-mining ablation, Table 3 and appendix B.5).

Instead of generating, take for each class the real images of a large *unlabelled* pool that
are most similar to the class: the best matches, at most ``max_per_class`` (1k in the
paper), keeping only those whose cosine similarity exceeds ``threshold``.

Two ways to score similarity:

* **text-image** (the paper: CLIP embeddings of the class description vs. of the LAION
  images, T = 0.45) when ``clip_model`` names a local CLIP folder (transformers format);
* **image-image** otherwise (offline default): cosine similarity between a pool image's
  features and the class prototype, the normalised mean of the supports' features, using a
  teacher feature backbone (``tint.teachers.backbones``; EfficientNet-Lite0 by default).

specialize, per class: the class query vector (prototype or text embedding) -> artifact.
generate, per class: score the pool (features cached on disk per pool + model), rank, write
the selected images resized to the dataset resolution as ``<class>/<rank>.png`` with
manifest rows naming the source file and its similarity. Fewer than ``n_images`` images are
written when fewer pass the threshold: consumers read the returned list / the manifest.

Offline the pool is every openclipart category outside the benchmark's val/novel classes
(``tint.data.openclipart.pretraining_pool``), so no query image can be mined.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tint.errors import TintError
from tint.generators.base import (
    artifact_path,
    check_count,
    class_text,
    load_artifact,
    manifest_paths,
    missing_indices,
    save_artifact,
    settings_dict,
    settings_from,
    validate_support,
    write_generated,
)
from tint.io import load_tensors, save_tensors
from tint.settings import AT_LEAST_ONE, NON_NEGATIVE, Range, Settings, join

log = logging.getLogger(__name__)

NAME = "real-mining"
# Mining keeps only pool images above the similarity threshold: a class may get fewer than
# asked for, and the pipeline uses what there is instead of failing.
MAY_RETURN_FEWER = True
REQUIRED_TENSORS = ("query",)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAPER_CLIP_THRESHOLD = 0.45
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class SpecializeSettings(Settings):
    feature_backbone: str = "efficientnet-lite0"  # image-image similarity (teacher backbones)
    clip_model: str | None = None  # a local CLIP folder: text-image similarity (the paper's)
    text_prompt: str = "a photo of a {class_name}"  # CLIP only; class names with . or _ split
    dataset_resolution: int | None = None

    RANGES = {"dataset_resolution": AT_LEAST_ONE}

    def validate(self, path: str = "") -> None:
        super().validate(path)
        if self.clip_model is not None and not Path(self.clip_model).expanduser().is_dir():
            raise TintError(f"{join(path, 'clip_model')}: {self.clip_model} is not a folder; "
                            "give a local CLIP model folder or leave it unset")


@dataclass
class GenerateSettings(Settings):
    pool: str = "openclipart"  # "openclipart" (outside val/novel) or a folder of images
    threshold: float | None = None  # None: 0.45 (CLIP, paper) / 0.6 (image features)
    max_per_class: int = 1000
    resolution: int | None = None  # None: the artifact's dataset resolution
    batch_size: int = 32  # feature extraction batch (memory only)
    cache_dir: str | None = None  # pool-feature cache; None: <out_dir>/.pool-features
    progress: bool = True

    RANGES = {"threshold": Range(-1, 1), "max_per_class": NON_NEGATIVE,
              "resolution": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE}


# ---------------------------------------------------------------------------------------------
# Scorers: images (and class text) -> unit vectors in one space


class ImageFeatureScorer:
    """Teacher backbone features, L2-normalised (image-image similarity)."""

    kind = "image-feature-cosine"
    default_threshold = 0.6  # measured on the openclipart pool: see docs/baselines.md

    def __init__(self, name: str) -> None:
        from tint.teachers.backbones import load_feature_backbone

        self.name = name
        self.model = load_feature_backbone(name).eval()

    @torch.no_grad()
    def images(self, x01: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(x01).float(), dim=-1)


class ClipScorer:
    """A local CLIP model (transformers format): text and image embeddings, L2-normalised."""

    kind = "clip-text-image-cosine"
    default_threshold = PAPER_CLIP_THRESHOLD

    def __init__(self, folder: str) -> None:
        from transformers import AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise TintError(f"clip_model {folder!r}: cannot load a CLIP model and tokenizer from "
                            f"this folder ({err}); give a local transformers CLIP folder or "
                            "leave clip_model unset for image-feature similarity") from err
        self.name = f"clip:{folder}"
        self.size = int(self.model.config.vision_config.image_size)
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def images(self, x01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x01, size=(self.size, self.size), mode="bicubic", align_corners=False)
        out = self.model.get_image_features(pixel_values=(x.clamp(0, 1) - self.mean) / self.std)
        return F.normalize(_pooled(out).float(), dim=-1)

    @torch.no_grad()
    def text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tokens["input_ids"],
                                           attention_mask=tokens.get("attention_mask"))
        return F.normalize(_pooled(out).float(), dim=-1)


def _pooled(out: Any) -> torch.Tensor:
    """transformers 4 returns the projected tensor, 5 an output object holding it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@lru_cache(maxsize=4)
def _scorer(feature_backbone: str, clip_model: str | None) -> ImageFeatureScorer | ClipScorer:
    """One loaded scorer per setting: every class of a run shares it."""
    return ClipScorer(clip_model) if clip_model else ImageFeatureScorer(feature_backbone)


# ---------------------------------------------------------------------------------------------
# Specialisation: the class query vector


def specialize(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
               settings: SpecializeSettings | dict | None = None) -> Path:
    """Store the class query (support prototype, or CLIP text embedding); `backbone` unused."""
    s = settings_from(SpecializeSettings, settings)
    support = validate_support(support, class_name, s.dataset_resolution)
    scorer = _scorer(s.feature_backbone, s.clip_model)
    support_features = scorer.images(support)
    if isinstance(scorer, ClipScorer):
        query = scorer.text([class_text(class_name, s.text_prompt)])[0]
    else:
        query = F.normalize(support_features.mean(dim=0), dim=0)
    meta = {"generator": NAME, "class": class_name, "similarity": scorer.kind,
            "scorer": scorer.name, "support_count": int(support.shape[0]),
            "dataset_resolution": int(support.shape[-1]), "settings": settings_dict(s)}
    tensors = {"query": query.cpu(), "support_features": support_features.cpu()}
    return save_artifact(artifact_path(out_dir, class_name), tensors, meta)


# ---------------------------------------------------------------------------------------------
# The pool and its features


@dataclass
class Pool:
    name: str
    files: list[str]
    crop_alpha: bool  # clip-art: crop to visible pixels, pad with white (as the dataset does)
    fit: str


def resolve_pool(spec: str) -> Pool:
    """"openclipart": all usable categories outside val/novel; else a folder (recursive)."""
    if spec == "openclipart":
        from tint.data.openclipart import pretraining_pool

        files = sorted(f for paths in pretraining_pool().values() for f in paths)
        return Pool("openclipart-outside-val-novel", files, crop_alpha=True, fit="pad")
    root = Path(spec.removeprefix("folder:")).expanduser()
    if not root.is_dir():
        raise TintError(f"pool {spec!r}: not 'openclipart' and no such folder")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise TintError(f"pool {root}: no images found (searched recursively)")
    return Pool(f"folder:{root.resolve()}", files, crop_alpha=False, fit="crop")


def load_pool_images(pool: Pool, files: Sequence[str], resolution: int
                     ) -> tuple[torch.Tensor, list[bool]]:
    """Images of `files` at `resolution` and which ones loaded: an unlabelled pool is messy
    (oversized, corrupt files), so an unreadable image is skipped with a warning, not fatal."""
    from tint.data.images import load_image, to_tensor

    images, ok = [], []
    for f in files:
        try:
            images.append(load_image(f, resolution, crop_alpha=pool.crop_alpha, fit=pool.fit))
            ok.append(True)
        except TintError as err:
            log.warning("pool image skipped: %s", err)
            ok.append(False)
    tensor = to_tensor(images) if images else torch.zeros(0, 3, resolution, resolution)
    return tensor, ok


def pool_features(pool: Pool, scorer: Any, resolution: int, cache_dir: Path,
                  batch_size: int, progress: bool) -> torch.Tensor:
    """Unit features [N, D] of every pool image (NaN rows for unreadable images), cached on
    disk keyed by the file list, the scorer and the resolution."""
    key_source = json.dumps([scorer.name, resolution, pool.crop_alpha, pool.fit, pool.files])
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    cache = cache_dir / f"{scorer.name.replace('/', '_').replace(':', '_')}-{key}.safetensors"
    if cache.is_file():
        try:
            tensors, meta = load_tensors(cache)
            if meta and meta.get("count") == len(pool.files):
                return tensors["features"]
        except Exception:  # a corrupt cache is recomputed, never trusted
            pass
    loaded: dict[int, torch.Tensor] = {}  # pool index -> feature (readable images only)
    for start in tqdm(range(0, len(pool.files), batch_size), desc=f"pool features ({pool.name})",
                      disable=not progress):
        images, ok = load_pool_images(pool, pool.files[start:start + batch_size], resolution)
        if len(images):
            indices = [start + i for i, good in enumerate(ok) if good]
            loaded.update(zip(indices, scorer.images(images).cpu(), strict=True))
    if not loaded:
        raise TintError(f"pool {pool.name}: no image could be read")
    dim = next(iter(loaded.values())).shape[0]
    features = torch.full((len(pool.files), dim), float("nan"))
    for index, feature in loaded.items():
        features[index] = feature
    save_tensors(cache, {"features": features}, {"count": len(pool.files), "pool": pool.name,
                                                 "scorer": scorer.name, "resolution": resolution})
    return features


def select(similarity: torch.Tensor, threshold: float, limit: int) -> list[int]:
    """Indices of the best matches above `threshold`, best first, at most `limit`."""
    order = torch.argsort(similarity, descending=True, stable=True)
    keep = [int(i) for i in order if float(similarity[i]) > threshold]  # NaN (unreadable) fails
    return keep[:limit]


# ---------------------------------------------------------------------------------------------
# Generation = mining


def generate(backbone: Any, artifact_path: str | Path, n_images: int, out_dir: str | Path,
             seed: int = 0, settings: GenerateSettings | dict | None = None) -> list[Path]:
    """Write the class's best pool matches (up to n_images and max_per_class) + manifest rows.

    Deterministic: `seed` and `backbone` are unused (ties keep pool order).
    """
    s = settings_from(GenerateSettings, settings)
    check_count(n_images)
    tensors, meta = load_artifact(artifact_path, REQUIRED_TENSORS, generator=NAME)
    spec = settings_from(SpecializeSettings, meta["settings"])
    class_name = meta["class"]
    out_dir = Path(out_dir)
    limit = min(n_images, s.max_per_class)
    if limit == 0:
        return []
    scorer = _scorer(spec.feature_backbone, spec.clip_model)
    threshold = scorer.default_threshold if s.threshold is None else s.threshold
    resolution = s.resolution or int(meta["dataset_resolution"])
    pool = resolve_pool(s.pool)
    cache_dir = Path(s.cache_dir) if s.cache_dir else out_dir / ".pool-features"
    features = pool_features(pool, scorer, resolution, cache_dir, s.batch_size, s.progress)
    similarity = features @ tensors["query"].float()
    chosen = select(similarity, threshold, limit)
    todo = set(missing_indices(out_dir, class_name, len(chosen)))
    ranks = [r for r in range(len(chosen)) if r in todo]
    for start in range(0, len(ranks), s.batch_size):
        batch = ranks[start:start + s.batch_size]
        files = [pool.files[chosen[r]] for r in batch]
        images, _ = load_pool_images(pool, files, resolution)  # all loaded before
        rows = [{"source": f, "similarity": float(similarity[chosen[r]]), "rank": r,
                 "threshold": threshold, "pool": pool.name, "similarity_kind": scorer.kind,
                 "generator": NAME} for r, f in zip(batch, files, strict=True)]
        write_generated(out_dir, class_name, batch, images, rows)
    return manifest_paths(out_dir, class_name, len(chosen))
