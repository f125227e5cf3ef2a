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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tint.diffusion.bridge import ResolutionBridge
from tint.generators.base import (
    PromptSamplingSettings,
    TISettings,
    batches,
    check_count,
    class_conditioning,
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

NAME = "plain-ti"
REQUIRED_TENSORS = ("embedding",)
MAY_RETURN_FEWER = False


@dataclass
class SpecializeSettings(TISettings):
    """TI knobs (`TISettings`). Defaults = the "Plain TI" row: bilinear bridge, t in [0, 1000)."""


@dataclass
class GenerateSettings(PromptSamplingSettings):
    """`batch_size` is a memory setting: it never changes an image."""


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
# Specialisation


def specialize(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
               settings: SpecializeSettings | dict | None = None) -> Path:
    """TI on all supports of one class; write ``<out_dir>/<class>.safetensors``."""
    return specialize_ti(backbone, class_name, support, out_dir,
                         settings_from(SpecializeSettings, settings), NAME)


# ---------------------------------------------------------------------------------------------
# Generation


def generate(backbone: Any, artifact_path: str | Path, n_images: int, out_dir: str | Path,
             seed: int = 0, settings: GenerateSettings | dict | None = None) -> list[Path]:
    """Make images 0..n_images-1 of the artifact's class that are not already done."""
    s = settings_from(GenerateSettings, settings)
    check_count(n_images)
    artifact = load_ti_artifact(artifact_path)
    out_dir = Path(out_dir)
    class_name = artifact.class_name
    resolution, guidance, num_steps = sampling_settings(artifact, s)
    todo = missing_indices(out_dir, class_name, n_images)
    if todo:
        from tint.diffusion.ddim import ddim_sample

        cond, uncond = class_conditioning(backbone, artifact, s.negative_prompt)
        for batch in batches(todo, s.batch_size, f"plain-ti {class_name}", s.progress):
            noise = torch.stack([torch.randn(tuple(backbone.latent_shape),
                                             generator=image_rng(seed, class_name, i))
                                 for i in batch]).to(backbone.device)
            latents = ddim_sample(backbone, noise, cond, uncond, guidance, num_steps)
            images = ResolutionBridge.to_dataset(backbone.decode_latents(latents), resolution)
            rows = [{"seed": seed, "image_seed": image_seed(seed, class_name, i),
                     "generator": NAME, "artifact_generator": artifact.meta["generator"]}
                    for i in batch]
            write_generated(out_dir, class_name, batch, images, rows)
    return manifest_paths(out_dir, class_name, n_images)
