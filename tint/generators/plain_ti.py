"""Plain textual inversion (the paper's "Plain TI" baseline and the TI rows of Table 3).

specialize, per class:
    supports --bridge--> model resolution --TI--> class embedding v_n
    -> ``<out>/<class>.safetensors`` (embedding [, bridged supports] + every setting) and
       ``<out>/<class>.ti.safetensors`` (diffusers textual-inversion file).

generate, per image i (own RNG from (seed, class, i)):
    n ~ N(0, I) -> DDIM + CFG with "a photo of an <v_n>" against the ordinary
    empty-prompt embedding -> PNG at dataset resolution + a manifest row.

Unlike TINT there is no null-text inversion and no support latent: every image starts from
pure noise, so the only thing tying it to the supports is the learned word.

The same TI artifact also feeds DA-Fusion (``da_fusion.py``): both read any artifact that
carries a TI embedding (``plain-ti``, ``da-fusion`` or ``tint``), so one specialisation can
serve several generators when their TI settings agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tint.diffusion.bridge import PAPER_STEPS, ResolutionBridge, load_super_resolver
from tint.diffusion.textual_inversion import (
    TextualInversionConfig,
    save_textual_inversion,
    textual_inversion,
)
from tint.errors import TintError
from tint.generators.base import (
    artifact_path,
    fresh_token,
    image_relpath,
    image_rng,
    image_seed,
    install_token_embedding,
    load_artifact,
    manifest_paths,
    missing_indices,
    safe_name,
    save_artifact,
    settings_dict,
    settings_from,
    validate_support,
    write_image,
    write_manifest_rows,
)

NAME = "plain-ti"
REQUIRED_TENSORS = ("embedding",)
TI_GENERATORS = ("plain-ti", "da-fusion", "tint")  # artifacts that carry a TI embedding


@dataclass
class SpecializeSettings:
    """TI knobs. Defaults = the "Plain TI" row: bilinear bridge, full t range [0, 1000)."""

    template: str = "a photo of an {}"  # the class token goes into the {}
    token: str | None = None  # None: "<plain-ti-class>"
    init_word: str = "object"
    ti_steps: int = 5000
    ti_lr: float = 1e-3
    ti_t_min: int = 0  # 0: standard TI over [0, T); 250: the paper's limited range
    ti_batch_size: int = 1
    ti_grad_accum: int = 1
    num_steps: int = 50  # DDIM steps used at generation
    guidance: float = 7.5
    super_resolver: str | None = None  # None: bilinear only; see tint/diffusion/bridge.py
    bridge_steps: Sequence[int | str] = field(default_factory=lambda: list(PAPER_STEPS))
    store_support: bool = True  # keep the bridged supports (DA-Fusion needs them)
    dataset_resolution: int | None = None  # None: the supports' size
    seed: int = 0  # TI timestep/noise draws
    progress: bool = True
    backbone: str | None = None  # provenance: the spec the backbone was loaded from


@dataclass
class GenerateSettings:
    """`batch_size` is a memory setting: it never changes an image."""

    batch_size: int = 8
    resolution: int | None = None  # None: the artifact's dataset resolution
    guidance: float | None = None  # None: the artifact's
    num_steps: int | None = None  # None: the artifact's
    negative_prompt: str = ""  # the ordinary unconditional prompt of CFG
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Table 3: the generation ablations as (generator, specialisation overrides)

# Offline there is no learned x4 super-resolver; "bicubic" is the built-in stand-in. Pass a
# TorchScript file or a diffusers upscaler folder to get the paper's setting.
DEFAULT_SUPER_RESOLVER = "bicubic"


def table3_variants(super_resolver: str = DEFAULT_SUPER_RESOLVER) -> dict[str, tuple[str, dict]]:
    """Table 3 rows that vary the generator: label -> (generator name, specialize overrides)."""
    sr = {"super_resolver": super_resolver}
    return {
        "no-synthetic": ("none", {}),
        "plain-ti": ("plain-ti", {"super_resolver": None, "ti_t_min": 0}),
        "sr-ti-full-trange": ("plain-ti", {**sr, "ti_t_min": 0}),
        "sr-ti-limited-trange": ("plain-ti", {**sr, "ti_t_min": 250}),
        "sr-da-fusion": ("da-fusion", {**sr, "ti_t_min": 250}),
        "tint": ("tint", {**sr, "ti_t_min": 250}),
        "real-mining": ("real-mining", {}),
    }


# ---------------------------------------------------------------------------------------------
# Specialisation (shared with DA-Fusion)


def specialize_ti(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
                  s: SpecializeSettings, generator: str) -> Path:
    """Bridge the supports, run TI, write the artifact (last: it marks the class done)."""
    _check_specialize_settings(s)
    support = validate_support(support, class_name, s.dataset_resolution)
    dataset_resolution = int(support.shape[-1])
    token = fresh_token(backbone, s.token or f"<{generator}-{safe_name(class_name).lower()}>")
    bridge = ResolutionBridge(backbone.resolution, s.bridge_steps,
                              load_super_resolver(s.super_resolver, backbone.device))
    images = bridge.to_model(support)
    config = TextualInversionConfig(
        placeholder=token, init_word=s.init_word, template=s.template,
        steps=s.ti_steps, lr=s.ti_lr, t_min=s.ti_t_min, batch_size=s.ti_batch_size,
        grad_accum=s.ti_grad_accum, seed=s.seed,
    )
    ti = textual_inversion(backbone, images, config, progress=s.progress)
    tensors = {"embedding": ti.embedding.detach().float().reshape(-1).cpu()}
    if s.store_support:
        tensors["support"] = images.float().cpu()
    meta = {
        "generator": generator, "class": class_name, "token": ti.token,
        "prompt": s.template.format(ti.token), "num_steps": s.num_steps,
        "guidance": s.guidance, "support_count": int(support.shape[0]),
        "dataset_resolution": dataset_resolution, "model_resolution": backbone.resolution,
        "prediction_type": backbone.prediction_type, "latent_shape": list(backbone.latent_shape),
        "bridge": bridge.plan(dataset_resolution), "settings": settings_dict(s),
        "backbone": s.backbone, "ti_final_loss": ti.losses[-1] if ti.losses else None,
        "ti_first_loss": ti.losses[0] if ti.losses else None,
    }
    target = artifact_path(out_dir, class_name)
    save_textual_inversion(target.with_suffix(".ti.safetensors"), ti.token, ti.embedding)
    return save_artifact(target, tensors, meta)


def specialize(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
               settings: SpecializeSettings | dict | None = None) -> Path:
    """TI on all supports of one class; write ``<out_dir>/<class>.safetensors``."""
    return specialize_ti(backbone, class_name, support, out_dir,
                         settings_from(SpecializeSettings, settings), NAME)


def _check_specialize_settings(s: SpecializeSettings) -> None:
    if "{}" not in s.template:
        raise TintError(f"template {s.template!r}: must contain '{{}}' where the class word goes")
    if s.num_steps < 1 or s.ti_steps < 1:
        raise TintError("num_steps and ti_steps must be >= 1")
    if not 0 <= s.ti_t_min < 1000:
        raise TintError(f"ti_t_min {s.ti_t_min}: must be in [0, 1000)")


# ---------------------------------------------------------------------------------------------
# Loading a TI artifact (any generator that stored an embedding)


@dataclass
class TIArtifact:
    path: Path
    class_name: str
    token: str
    prompt: str
    embedding: torch.Tensor  # [D]
    support: torch.Tensor | None  # [K, 3, M, M] bridged supports, if stored
    meta: dict


def load_ti_artifact(path: str | Path, required: Sequence[str] = REQUIRED_TENSORS) -> TIArtifact:
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


# ---------------------------------------------------------------------------------------------
# Writing images (shared with DA-Fusion and real-data mining)


def write_generated(out_dir: Path, class_name: str, indices: Sequence[int], images: torch.Tensor,
                    rows: Sequence[Mapping[str, Any]]) -> None:
    """Images first (atomic), then their manifest rows (fsync'ed): resumable like TINT."""
    full_rows = []
    for index, image, row in zip(indices, images, rows, strict=True):
        relpath = image_relpath(class_name, index)
        write_image(out_dir / relpath, image)
        full_rows.append({"file": relpath, "class": class_name, "index": int(index), **row})
    write_manifest_rows(out_dir, full_rows)


def sampling_settings(artifact: TIArtifact, s: Any) -> tuple[int, float, int]:
    """Output resolution, CFG scale and DDIM steps: the settings' own, else the artifact's."""
    resolution = s.resolution or int(artifact.meta["dataset_resolution"])
    guidance = float(artifact.meta.get("guidance", 7.5) if s.guidance is None else s.guidance)
    num_steps = int(artifact.meta.get("num_steps", 50) if s.num_steps is None else s.num_steps)
    return resolution, guidance, num_steps


def check_generate_common(n_images: int, batch_size: int) -> None:
    if n_images < 0:
        raise TintError(f"n_images must be >= 0, got {n_images}")
    if batch_size < 1:
        raise TintError(f"batch_size must be >= 1, got {batch_size}")


# ---------------------------------------------------------------------------------------------
# Generation


def generate(backbone: Any, artifact_path: str | Path, n_images: int, out_dir: str | Path,
             seed: int = 0, settings: GenerateSettings | dict | None = None) -> list[Path]:
    """Make images 0..n_images-1 of the artifact's class that are not already done."""
    s = settings_from(GenerateSettings, settings)
    check_generate_common(n_images, s.batch_size)
    artifact = load_ti_artifact(artifact_path)
    out_dir = Path(out_dir)
    class_name = artifact.class_name
    resolution, guidance, num_steps = sampling_settings(artifact, s)
    todo = missing_indices(out_dir, class_name, n_images)
    if todo:
        from tint.diffusion.ddim import ddim_sample

        cond, uncond = class_conditioning(backbone, artifact, s.negative_prompt)
        bar = tqdm(total=len(todo), desc=f"plain-ti {class_name}", disable=not s.progress)
        for start in range(0, len(todo), s.batch_size):
            batch = todo[start:start + s.batch_size]
            noise = torch.stack([torch.randn(tuple(backbone.latent_shape),
                                             generator=image_rng(seed, class_name, i))
                                 for i in batch]).to(backbone.device)
            latents = ddim_sample(backbone, noise, cond, uncond, guidance, num_steps)
            images = ResolutionBridge.to_dataset(backbone.decode_latents(latents), resolution)
            rows = [{"seed": seed, "image_seed": image_seed(seed, class_name, i),
                     "generator": NAME, "artifact_generator": artifact.meta["generator"]}
                    for i in batch]
            write_generated(out_dir, class_name, batch, images, rows)
            bar.update(len(batch))
        bar.close()
    return manifest_paths(out_dir, class_name, n_images)
