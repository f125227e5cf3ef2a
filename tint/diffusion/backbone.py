"""The diffusion backbone: everything TINT needs from a text-to-image diffusion model.

One plain structure (`DiffusionBackbone`) holds the UNet, the DDIM scheduler (its config says
eps- or v-prediction), the autoencoder (a real ``AutoencoderKL`` or `IdentityAutoencoder` for
pixel-space models), the text encoder and its tokenizer. Nothing below is SD-specific where it
need not be: the text encoder is any module mapping token ids to hidden states (CLIP for SD,
MiniLM/BERT for tint's own small generator).

Loaders, in the order `load_backbone` tries them:
- a name in `BACKBONES`: ``"tiny"`` / ``"tiny-pixel-v"`` / ``"sd15-random"``, random weights
  built by `tint.testing` (tests and timing; not part of the public API);
- a folder containing ``tint_generator.json``: tint's own small generator;
- a local diffusers Stable Diffusion folder or a hub id: `load_stable_diffusion`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tint.errors import TintError
from tint.registry import Registry, import_target

SMALL_GENERATOR_MARKER = "tint_generator.json"
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# Stable Diffusion 1.x's noise schedule, used with DDIM as in the paper (Appendix B.2).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# Our recipe for pixel-space v-prediction models (see DESIGN.md and small_generator.py).
PIXEL_V_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "rescale_betas_zero_snr": True,
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
}

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")


class IdentityAutoencoder(nn.Module):
    """The "autoencoder" of a pixel-space model: latents are the image mapped to [-1, 1]."""

    downscale_factor = 1
    scaling_factor = 1.0

    def encode(self, x01: torch.Tensor) -> torch.Tensor:
        return x01 * 2.0 - 1.0

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return ((z + 1.0) / 2.0).clamp(0.0, 1.0)


@dataclass
class DiffusionBackbone:
    """A text-to-image diffusion model, in the one shape the TINT code works with."""

    unet: nn.Module
    scheduler: Any  # diffusers DDIMScheduler
    vae: nn.Module  # AutoencoderKL or IdentityAutoencoder
    text_encoder: nn.Module  # input_ids [B, L] -> hidden states [B, L, D] (output[0])
    tokenizer: Any  # a transformers tokenizer
    resolution: int  # image side the model works at
    latent_scale: float | None = None  # None: the VAE config's scaling_factor (1 for identity)
    # Execution only (never in a key): the autocast precision of training-like stages on
    # float32 weights (textual inversion; tint.devices), and the VAE decode slice size.
    precision: str = "fp32"
    vae_slice_size: int | None = None  # decode this many latents at a time (None: all)

    def __post_init__(self) -> None:
        if self.latent_scale is None:
            config = getattr(self.vae, "config", None)
            self.latent_scale = float(getattr(config, "scaling_factor", 1.0))

    # --- facts about the model -------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        """"epsilon" or "v_prediction", as the scheduler config says."""
        return str(self.scheduler.config.prediction_type)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def is_pixel_space(self) -> bool:
        return isinstance(self.vae, IdentityAutoencoder)

    @property
    def downscale_factor(self) -> int:
        """Image side / latent side (8 for SD's VAE; in pixel space the identity
        autoencoder's class attribute: 1, or 2 for the small generator's space-to-depth)."""
        if self.is_pixel_space:
            return int(getattr(self.vae, "downscale_factor", 1))  # 2 for space-to-depth
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents of one image at `resolution`: what z_T and noise look like."""
        side = self.resolution // self.downscale_factor
        return (int(self.unet.config.in_channels), side, side)

    @property
    def text_length(self) -> int:
        """Prompts are padded/truncated to this many tokens (the tokenizer's model_max_length)."""
        length = int(self.tokenizer.model_max_length)
        if length > 4096:
            raise TintError(
                "the tokenizer has no usable model_max_length; set tokenizer.model_max_length "
                "(77 for CLIP) before building the DiffusionBackbone"
            )
        return length

    # --- text ------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> input ids [B, L], padded to `text_length` (no attention mask, as SD)."""
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.text_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> hidden states [B, L, D]; works for CLIPTextModel and BertModel alike."""
        return self.text_encoder(input_ids.to(self.text_encoder.device))[0]

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.encode_ids(self.tokenize(prompts))

    # --- images ----------------------------------------------------------------------------
    def encode_images(self, x01: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1] -> scaled latents (deterministic: the posterior mean)."""
        _check_images(x01, self.downscale_factor)
        x01 = x01.to(self.device, self.vae_dtype)
        with torch.no_grad():
            if self.is_pixel_space:
                return self.vae.encode(x01)
            posterior = self.vae.encode(x01 * 2.0 - 1.0).latent_dist
            return posterior.mean * self.latent_scale

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B,3,H,W] in [0,1] (float32), `vae_slice_size` at a time
        (SD's VAE decoder at 512px needs ~2.5 GB of activations per image in fp16)."""
        z = z.to(self.device, self.vae_dtype)
        size = self.vae_slice_size or max(z.shape[0], 1)
        return torch.cat([self._decode(part) for part in z.split(size)])

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.is_pixel_space:
                return self.vae.decode(z).float()
            x = self.vae.decode(z / self.latent_scale).sample
            return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # --- execution ---------------------------------------------------------------------------
    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> DiffusionBackbone:
        """Move UNet, autoencoder and text encoder to `device` (and `dtype`); returns self.

        An fp16 request keeps a VAE whose config says ``force_upcast`` (SD's, by default) in
        float32, as diffusers' pipelines decode it: SD's VAE decoder overflows in fp16.
        """
        for module in (self.unet, self.vae, self.text_encoder):
            upcast = dtype == torch.float16 and module is self.vae and bool(
                getattr(getattr(module, "config", None), "force_upcast", False))
            # nn.Module.to: diffusers' override warns on every dtype cast (for nothing here)
            nn.Module.to(module, device=device, dtype=torch.float32 if upcast else dtype)
        return self

    @property
    def vae_dtype(self) -> torch.dtype:
        params = list(self.vae.parameters())
        return params[0].dtype if params else self.dtype


def _check_images(x01: torch.Tensor, factor: int) -> None:
    if x01.ndim != 4 or x01.shape[1] != 3:
        raise TintError(f"images must be a [B, 3, H, W] tensor, got shape {tuple(x01.shape)}")
    if x01.shape[2] % factor or x01.shape[3] % factor:
        raise TintError(
            f"image size {tuple(x01.shape[2:])} is not a multiple of the autoencoder's "
            f"downscale factor {factor}; resize the images to the model resolution first"
        )


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
# A folder with SMALL_GENERATOR_MARKER (named, not imported: small_generator imports this module).
SMALL_GENERATOR_LOADER = "tint.diffusion.small_generator:load_small_generator"


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
        return import_target(SMALL_GENERATOR_LOADER)(path)
    return load_stable_diffusion(text, **kwargs)
