"""Loading a diffusion backbone: everything TINT needs from a text-to-image diffusion model.

One plain structure (`DiffusionBackbone`, in tint.diffusion.model) holds the UNet, the DDIM scheduler (its config says
eps- or v-prediction), the autoencoder (a real ``AutoencoderKL`` or `IdentityAutoencoder` for
pixel-space models), the text encoder and its tokenizer. Nothing below is SD-specific where it
need not be: the text encoder is any module mapping token ids to hidden states (CLIP for SD,
MiniLM/BERT for tint's own small generator).

Loaders, in the order `load_backbone` tries them:
- a name in `BACKBONES`: ``"tiny"`` / ``"tiny-pixel-v"`` / ``"sd15-random"``, random weights
  built by `tint.testing` (tests and timing; not part of the public API);
- a folder containing ``tint_generator.json``: tint's own small generator
  (`tint.diffusion.small_generator.load_small_generator`);
- a local diffusers Stable Diffusion folder or a hub id: `load_stable_diffusion`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tint.diffusion.model import SD15_SCHEDULER_CONFIG, DiffusionBackbone
from tint.diffusion.small_generator import load_small_generator
from tint.errors import TintError
from tint.registry import Registry

SMALL_GENERATOR_MARKER = "tint_generator.json"
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")


# --- Stable Diffusion from a diffusers folder or hub id ------------------------------------


def load_stable_diffusion(
    path_or_id: str | Path = SD15_HUB_ID,
    local_files_only: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DiffusionBackbone:
    """Load an SD 1.x/2.x model (diffusers layout) component by component, no remote code.

    The scheduler is always DDIM, built from the folder's scheduler config (SD 1.5 ships a
    PNDM config with the same betas) or from `SD15_SCHEDULER_CONFIG` when it has none.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = _resolve_sd_source(path_or_id)
    common = {"local_files_only": local_files_only}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **common)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **common)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        scheduler = DDIMScheduler.from_config(_scheduler_config(source, local_files_only))
    except (OSError, ValueError) as err:
        raise TintError(
            f"could not load a Stable Diffusion model from {path_or_id!r}: {err}. Pass a local "
            "diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id "
            "that is in the local cache (or allow downloads with local_files_only=False)"
        ) from err
    for module in (unet, vae, text_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    side = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return DiffusionBackbone(unet, scheduler, vae, text_encoder, tokenizer, resolution=side)


def _resolve_sd_source(path_or_id: str | Path) -> str:
    """A local folder is checked for SD's layout; anything else must look like a hub id."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        missing = [name for name in SD_SUBFOLDERS if not (path / name).is_dir()]
        if missing:
            raise TintError(
                f"{path} is not a Stable Diffusion folder: missing subfolder(s) "
                f"{', '.join(missing)}/. Point to a diffusers-format model folder (as written by "
                "StableDiffusionPipeline.save_pretrained) or a hub id"
            )
        return str(path)
    text = str(path_or_id)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id or path.exists():
        raise TintError(
            f"model folder {text} does not exist. Pass a diffusers Stable Diffusion folder "
            f"(unet/, vae/, text_encoder/, tokenizer/) or a hub id such as {SD15_HUB_ID}"
        )
    # A hub id missing from the local cache (with local_files_only) fails inside
    # from_pretrained with an OSError, which load_stable_diffusion turns into a TintError.
    return text


def _scheduler_config(source: str, local_files_only: bool) -> dict[str, Any]:
    folder = Path(source) / "scheduler"
    config_file = folder / "scheduler_config.json"
    if folder.is_dir() and config_file.is_file():
        config = json.loads(config_file.read_text())
    elif not Path(source).is_dir():
        from diffusers import DDIMScheduler

        try:
            config = dict(
                DDIMScheduler.load_config(
                    source, subfolder="scheduler", local_files_only=local_files_only
                )
            )
        except (OSError, ValueError):
            config = dict(SD15_SCHEDULER_CONFIG)
    else:
        config = dict(SD15_SCHEDULER_CONFIG)
    # DDIM as in the paper: deterministic, no clipping (SD's own config already says so).
    config["clip_sample"] = False
    return config


def save_backbone(backbone: DiffusionBackbone, folder: str | Path) -> Path:
    """Write an AutoencoderKL backbone as a diffusers SD folder (loadable by both
    `load_stable_diffusion` and ``StableDiffusionPipeline.from_pretrained``)."""
    from tint.io import write_json

    if backbone.is_pixel_space:
        raise TintError("save_backbone writes Stable Diffusion folders; pixel-space models "
                        "are saved with tint.diffusion.small_generator.save_small_generator")
    folder = Path(folder)
    backbone.unet.save_pretrained(str(folder / "unet"))
    backbone.vae.save_pretrained(str(folder / "vae"))
    backbone.text_encoder.save_pretrained(str(folder / "text_encoder"))
    backbone.tokenizer.save_pretrained(str(folder / "tokenizer"))
    backbone.scheduler.save_pretrained(str(folder / "scheduler"))
    write_json(
        folder / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
    )
    return folder


# --- one entry point by name / path --------------------------------------------------------


# The small text-to-image generator shipped with tint (see docs/generator.md).
EMBEDDED_GENERATOR = "tint-clipart"
EMBEDDED_GENERATOR_DIR = Path(__file__).resolve().parent.parent / "assets" / "generator"

# Backbones by name, built from nothing outside (random weights: tests and timing only).
BACKBONES = Registry("backbone", {
    "tiny": "tint.testing:tiny_backbone",
    "tiny-pixel-v": "tint.testing:tiny_pixel_v_backbone",
    "sd15-random": "tint.testing:random_sd15_backbone",
})


def load_backbone(spec: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, precision: str = "fp32",
                  vae_slice_size: int | None = None, **kwargs: Any) -> DiffusionBackbone:
    """Backbone by spec: "tiny" (latent, eps), "tiny-pixel-v" (pixel, v), "sd15-random"
    (SD 1.5 architecture, random weights), "tint-clipart" (the embedded generator),
    a tint small generator folder (has
    ``tint_generator.json``), or an SD folder / hub id.

    UNet, autoencoder and text encoder end up on `device` in `dtype` (float32 for
    specialisation, fp16/bf16 for sampling on CUDA: tint.devices); `precision` is the
    autocast precision of textual inversion over float32 weights."""
    backbone = _load_backbone_on_cpu(spec, **kwargs)
    backbone.to(device, dtype)
    backbone.precision = precision
    backbone.vae_slice_size = vae_slice_size
    return backbone


def compile_unet(backbone: DiffusionBackbone, mode: str | None = None) -> DiffusionBackbone:
    """`torch.compile` the UNet for sampling (an option, off by default: the first batch
    pays about a minute of compilation, worth it only for thousands of images). `mode`:
    torch.compile's (None: its default; "max-autotune" tunes every GEMM, several minutes)."""
    if not hasattr(backbone.unet, "_orig_mod"):
        backbone.unet = torch.compile(backbone.unet, mode=mode)
    return backbone


def attention_processors(backbone: DiffusionBackbone) -> dict[str, int]:
    """Count of the UNet's attention processor classes, e.g. {"AttnProcessor2_0": 2}:
    diffusers' default on torch 2 is AttnProcessor2_0, i.e. PyTorch's SDPA kernels."""
    unet = getattr(backbone.unet, "_orig_mod", backbone.unet)
    counts: dict[str, int] = {}
    for processor in getattr(unet, "attn_processors", {}).values():
        name = type(processor).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


def _load_backbone_on_cpu(spec: str | Path, **kwargs: Any) -> DiffusionBackbone:
    text = str(spec)
    if text in BACKBONES:
        return BACKBONES.load(text)(**kwargs)
    if text == EMBEDDED_GENERATOR:
        path = EMBEDDED_GENERATOR_DIR
        if not (path / SMALL_GENERATOR_MARKER).is_file():
            raise TintError(
                f"the embedded generator {EMBEDDED_GENERATOR!r} is missing from {path}; "
                "reinstall tint or pass --backbone with a model folder"
            )
    else:
        path = Path(text).expanduser()
    if (path / SMALL_GENERATOR_MARKER).is_file():
        return load_small_generator(path)
    return load_stable_diffusion(text, **kwargs)
