"""Random tiny models for tests, timing and smoke runs: not part of tint's public API.

Everything here is built from nothing outside (no download, no file of weights), seeded, and
small enough for a 2-core CPU. Configs reach these models by name through the registries:
``generator.backbone: tiny`` / ``tiny-pixel-v`` / ``sd15-random``
(`tint.diffusion.backbone.BACKBONES`) and ``teacher.backbone: tiny-vit``
(`tint.teachers.backbones.FEATURE_BACKBONES`); tests import the builders directly.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tint.diffusion.model import (
    PIXEL_V_SCHEDULER_CONFIG,
    SD15_SCHEDULER_CONFIG,
    DiffusionBackbone,
    IdentityAutoencoder,
)
from tint.errors import TintError
from tint.teachers.features import FeatureBackbone, vit_cls_features

# --- diffusion backbones by name (load_backbone("tiny"), ...) ----------------------------------


def tiny_backbone(workdir: str | Path | None = None, **kwargs: Any) -> DiffusionBackbone:
    """"tiny": latent eps-prediction model of SD's architecture (`build_tiny_backbone`)."""
    return _in_scratch(build_tiny_backbone, "tiny", workdir, **kwargs)


def tiny_pixel_v_backbone(workdir: str | Path | None = None, **kwargs: Any) -> DiffusionBackbone:
    """"tiny-pixel-v": pixel-space v-prediction model (the small generator's recipe)."""
    kwargs.setdefault("pixel_space", True)
    kwargs.setdefault("prediction_type", "v_prediction")
    return _in_scratch(build_tiny_backbone, "tiny-pixel-v", workdir, **kwargs)


def random_sd15_backbone(workdir: str | Path | None = None, **kwargs: Any) -> DiffusionBackbone:
    """"sd15-random": SD 1.5's architecture with random weights (timing, FLOP counts)."""
    return _in_scratch(build_random_sd15_backbone, "sd15-random", workdir, **kwargs)


def _in_scratch(build: Any, name: str, workdir: str | Path | None, **kwargs: Any) -> DiffusionBackbone:
    """Build in `workdir`, or in a scratch folder that only holds the tokenizer files while
    they are read into memory."""
    if workdir is not None:
        return build(workdir, **kwargs)
    with tempfile.TemporaryDirectory(prefix=f"tint_{name}_") as scratch:
        return build(scratch, **kwargs)


def tiny_vit(input_size: int | None = None, seed: int = 0, **_: object) -> FeatureBackbone:
    """"tiny-vit" teacher backbone (`tint.teachers.backbones.FEATURE_BACKBONES`)."""
    return build_tiny_vit(seed=seed, image_size=input_size or 32)


# --- builders ------------------------------------------------------------------------------------


def build_tiny_vit(seed: int = 0, image_size: int = 32) -> FeatureBackbone:
    """A randomly initialised 2-layer ViT: exercises the DINO code path in tests."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    network = ViTModel(config, add_pooling_layer=False)
    return FeatureBackbone("tiny-vit", network, config.hidden_size, image_size, vit_cls_features)


TINY_WORDS = (
    "a an the of photo picture image object thing cat dog bird car plane ship truck horse "
    "frog deer flower tree house shoe bag shirt dress coat red green blue small large good "
    "bad close up cropped bright dark and with in on"
).split()


def write_tiny_clip_tokenizer(folder: str | Path, words: tuple[str, ...] = tuple(TINY_WORDS),
                              max_length: int = 77) -> Path:
    """Write a small CLIP BPE vocabulary (vocab.json, merges.txt) in which every word of
    `words` is one token, so that e.g. the TI init word "object" has a single id.

    transformers 5 ignores ``CLIPTokenizer(vocab_file=...)``; a folder loaded with
    ``from_pretrained(folder)`` is the reliable way to build one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?-'")
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "ph", "pho", ... "photo</w>"
            pair = f"{pieces[0]} {pieces[1]}"
            merged = pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    return folder


def build_tiny_backbone(
    workdir: str | Path,
    seed: int = 0,
    pixel_space: bool = False,
    prediction_type: str = "epsilon",
    resolution: int = 32,
    scheduler_overrides: dict[str, Any] | None = None,
    text_length: int = 16,
    output_scale: float = 0.1,
) -> DiffusionBackbone:
    """A randomly initialised model of SD's architecture (UNet2DConditionModel, AutoencoderKL
    with a 4x downscale, CLIP text model, a small BPE tokenizer), built from nothing outside.

    Latent models use SD 1.5's schedule; pixel-space v-prediction models use the small
    generator's recipe (cosine, zero terminal SNR, trailing spacing). `scheduler_overrides`
    changes either. The VAE's scaling factor is set to 1/std of its latents on random images:
    a random VAE gives latents of std ~0.2, which would make DDIM trajectories meaningless.

    The UNet's output convolution is scaled by `output_scale` (ADM zero-initialises that
    layer): a random UNet at full scale changes its prediction so much between neighbouring
    latents that even guidance-1 DDIM inversion does not round-trip (relative MSE ~1 for eps
    at 10 steps), unlike a trained model; at 0.1 it round-trips to ~2e-3 and CFG 7.5 still
    breaks it (~9e-2), the regime null-text inversion is about.
    """
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    if prediction_type not in ("epsilon", "v_prediction"):
        raise TintError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    workdir = Path(workdir)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_tiny_clip_tokenizer(workdir / "tiny_tokenizer", max_length=text_length))
    )
    torch.manual_seed(seed)
    text_encoder = _tiny_text_encoder(tokenizer, text_length)
    vae: nn.Module = IdentityAutoencoder() if pixel_space else _tiny_vae(resolution)
    factor = 1 if pixel_space else 4
    if resolution % (factor * 2):
        raise TintError(f"tiny backbone resolution {resolution} must be a multiple of {factor * 2}")
    unet = _tiny_unet(3 if pixel_space else 4, resolution // factor)
    with torch.no_grad():
        unet.conv_out.weight.mul_(output_scale)
        unet.conv_out.bias.mul_(output_scale)
    base = PIXEL_V_SCHEDULER_CONFIG if pixel_space and prediction_type == "v_prediction" else (
        SD15_SCHEDULER_CONFIG
    )
    config = {**base, "prediction_type": prediction_type, **(scheduler_overrides or {})}
    scheduler = DDIMScheduler.from_config(config)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    backbone = DiffusionBackbone(unet, scheduler, vae, text_encoder, tokenizer, resolution)
    if not pixel_space:
        _calibrate_latent_scale(backbone, seed)
    return backbone


def build_random_sd15_backbone(workdir: str | Path, seed: int = 0,
                               device: str | torch.device = "cpu") -> DiffusionBackbone:
    """Stable Diffusion 1.5's architecture (860M-param UNet, its VAE, CLIP ViT-L/14 text
    encoder) with random weights: for timing and FLOP counts where no weights exist.
    The tokenizer is the small test vocabulary (ids fit in CLIP's 49408-row table)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_tiny_clip_tokenizer(Path(workdir) / "tiny_tokenizer", max_length=77))
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        sample_size=512,
    )
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8,
    )
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    backbone = DiffusionBackbone(unet, scheduler, vae, text_encoder, tokenizer, resolution=512)
    _calibrate_latent_scale(backbone, seed, count=2)
    return backbone


def _tiny_text_encoder(tokenizer, text_length: int) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max(77, text_length),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _tiny_vae(resolution: int) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )


def _tiny_unet(channels: int, sample_size: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _calibrate_latent_scale(backbone: DiffusionBackbone, seed: int, count: int = 8) -> None:
    """Set the VAE scaling factor so that latents of random smooth images have unit std."""
    generator = torch.Generator().manual_seed(seed + 1)
    side = backbone.resolution
    coarse = torch.rand(count, 3, side // 4, side // 4, generator=generator)
    images = nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")
    backbone.latent_scale = 1.0
    std = float(backbone.encode_images(images).std())
    backbone.latent_scale = 1.0 / std
    backbone.vae.register_to_config(scaling_factor=backbone.latent_scale)
