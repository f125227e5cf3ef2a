"""The one shape the TINT code works with: `DiffusionBackbone` (UNet, DDIM scheduler,
autoencoder, text encoder, tokenizer) and `IdentityAutoencoder` for pixel-space models.

Kept apart from the loaders (tint.diffusion.backbone) so that a model family's own module
(tint.diffusion.small_generator) can build this shape and the loaders can import that
module at the top: the imports run one way, with no name of a module in a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tint.errors import TintError

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
