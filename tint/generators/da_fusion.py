"""DA-Fusion (Trabucco et al., 2024) as used in the paper's Table 3/4: TI, then img2img.

specialize, per class: exactly plain TI (``base.specialize_ti``), always keeping the
bridged supports in the artifact.

generate, per image i (own RNG from (seed, class, i)):
    k ~ U{1..K}; strength s (fixed, or ~ U(lo, hi) per image)
    z_0 = encode(support_k)
    start = num_steps - int(s * num_steps)          (diffusers' img2img convention)
    z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) n,  n ~ N(0, I),  a_t = alpha_bar(timesteps[start])
    DDIM + CFG from step `start` with "a photo of an <v_n>" against the empty prompt.
Strength 0 returns the (encoded/decoded) support, strength 1 is plain TI from pure noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tint.diffusion.bridge import ResolutionBridge
from tint.errors import TintError
from tint.generators.base import (
    PromptSamplingSettings,
    TISettings,
    batches,
    check_count,
    class_conditioning,
    draw_support_and_noise,
    image_rng,
    image_seed,
    load_ti_artifact,
    manifest_paths,
    missing_indices,
    sampling_settings,
    settings_from,
    specialize_ti,
    write_generated,
)
from tint.settings import UNIT, check_interval, join

NAME = "da-fusion"
REQUIRED_TENSORS = ("embedding", "support")
MAY_RETURN_FEWER = False

__all__ = ["MAY_RETURN_FEWER", "NAME", "REQUIRED_TENSORS", "GenerateSettings",
           "SpecializeSettings", "generate", "specialize", "start_step"]


@dataclass
class SpecializeSettings(TISettings):
    """Plain TI's knobs (`TISettings`); the bridged supports are always kept."""

    def validate(self, path: str = "") -> None:
        super().validate(path)
        if not self.store_support:
            raise TintError(f"{join(path, 'store_support')}: must stay true for da-fusion "
                            "(generation starts from the supports)")


@dataclass
class GenerateSettings(PromptSamplingSettings):
    """img2img knobs; `batch_size` is a memory setting: it never changes an image."""

    strength: float = 0.5  # fraction of the DDIM trajectory re-generated (0: the support)
    strength_range: Sequence[float] | None = None  # (lo, hi): strength ~ U(lo, hi) per image

    RANGES = {**PromptSamplingSettings.RANGES, "strength": UNIT}

    def validate(self, path: str = "") -> None:
        super().validate(path)
        check_interval(join(path, "strength_range"), self.strength_range)


def specialize(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
               settings: SpecializeSettings | dict | None = None) -> Path:
    """Plain TI, keeping the bridged supports (img2img starts from them)."""
    s = settings_from(SpecializeSettings, settings)
    return specialize_ti(backbone, class_name, support, out_dir, s, NAME)


def start_step(strength: float, num_steps: int) -> int:
    """First DDIM sampling step for an img2img strength (num_steps: nothing re-generated)."""
    return num_steps - min(int(strength * num_steps), num_steps)


@dataclass
class Draw:
    index: int
    k: int
    strength: float
    noise: torch.Tensor


def draw_image(seed: int, class_name: str, index: int, num_supports: int,
               latent_shape: Sequence[int], s: GenerateSettings) -> Draw:
    """k, strength, n for one image, always drawn in this order from the image's own RNG."""
    k, strength, noise = draw_support_and_noise(image_rng(seed, class_name, index), num_supports,
                                                s.strength, s.strength_range, latent_shape)
    return Draw(index, k, strength, noise)


def img2img_latents(backbone: Any, support: torch.Tensor, draws: Sequence[Draw],
                    cond: torch.Tensor, uncond: torch.Tensor, guidance: float,
                    num_steps: int) -> torch.Tensor:
    """Latents for the draws; images sharing a start step share their DDIM calls."""
    from tint.diffusion.ddim import ddim_sample, ddim_schedule

    alphas = ddim_schedule(backbone.scheduler, num_steps).alphas
    z0 = backbone.encode_images(support[[d.k for d in draws]].to(backbone.device)).float()
    noise = torch.stack([d.noise for d in draws]).to(z0)
    starts = [start_step(d.strength, num_steps) for d in draws]
    out = torch.empty_like(z0)
    for start in sorted(set(starts)):
        rows = [b for b, st in enumerate(starts) if st == start]
        if start == num_steps:  # strength 0: nothing to re-generate
            out[rows] = z0[rows]
            continue
        a = float(alphas[start])
        z_t = a**0.5 * z0[rows] + max(1.0 - a, 0.0) ** 0.5 * noise[rows]
        out[rows] = ddim_sample(backbone, z_t, cond, uncond, guidance, num_steps, start_step=start)
    return out


def generate(backbone: Any, artifact_path: str | Path, n_images: int, out_dir: str | Path,
             seed: int = 0, settings: GenerateSettings | dict | None = None) -> list[Path]:
    """Make images 0..n_images-1 of the artifact's class that are not already done."""
    s = settings_from(GenerateSettings, settings)
    check_count(n_images)
    artifact = load_ti_artifact(artifact_path, REQUIRED_TENSORS)
    support = artifact.support
    if tuple(support.shape[-2:]) != (backbone.resolution, backbone.resolution):
        raise TintError(f"{artifact.path}: supports are {tuple(support.shape[-2:])} but the "
                        f"backbone works at {backbone.resolution}: use the backbone it was made with")
    out_dir = Path(out_dir)
    class_name = artifact.class_name
    resolution, guidance, num_steps = sampling_settings(artifact, s)
    todo = missing_indices(out_dir, class_name, n_images)
    if todo:
        cond, uncond = class_conditioning(backbone, artifact, s.negative_prompt)
        for batch in batches(todo, s.batch_size, f"da-fusion {class_name}", s.progress):
            draws = [draw_image(seed, class_name, i, support.shape[0], backbone.latent_shape, s)
                     for i in batch]
            latents = img2img_latents(backbone, support, draws, cond, uncond, guidance, num_steps)
            images = ResolutionBridge.to_dataset(backbone.decode_latents(latents), resolution)
            rows = [{"k": d.k, "strength": d.strength, "seed": seed,
                     "image_seed": image_seed(seed, class_name, d.index), "generator": NAME,
                     "artifact_generator": artifact.meta["generator"]} for d in draws]
            write_generated(out_dir, class_name, batch, images, rows)
    return manifest_paths(out_dir, class_name, n_images)
