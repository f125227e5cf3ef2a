"""The diffusion backbone: everything TINT needs from a text-to-image diffusion model.

One plain structure (`DiffusionBackbone`) holds the UNet, the DDIM scheduler (its config says
eps- or v-prediction), the autoencoder (a real ``AutoencoderKL`` or `IdentityAutoencoder` for
pixel-space models), the text encoder and its tokenizer. Nothing below is SD-specific where it
need not be: the text encoder is any module mapping token ids to hidden states (CLIP for SD,
MiniLM/BERT for tint's own small generator).

Loaders, in the order `load_backbone` tries them:
- ``"tiny"`` / ``"tiny-pixel-v"``: `build_tiny_backbone`, random weights, no file from outside;
- a folder containing ``tint_generator.json``: tint's own small generator;
- a local diffusers Stable Diffusion folder or a hub id: `load_stable_diffusion`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tint.errors import TintError

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
        """Move UNet, autoencoder and text encoder to `device` (and `dtype`); returns self."""
        for module in (self.unet, self.vae, self.text_encoder):
            # nn.Module.to: diffusers' override warns on every dtype cast (for nothing here)
            nn.Module.to(module, device=device, dtype=dtype)
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


# --- tiny random backbone for tests --------------------------------------------------------

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


# --- one entry point by name / path --------------------------------------------------------


# The small text-to-image generator shipped with tint (see docs/generator.md).
EMBEDDED_GENERATOR = "tint-clipart"
EMBEDDED_GENERATOR_DIR = Path(__file__).resolve().parent.parent / "assets" / "generator"


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


def compile_unet(backbone: DiffusionBackbone, mode: str = "max-autotune-no-cudagraphs") -> DiffusionBackbone:
    """`torch.compile` the UNet for sampling (an option, off by default: the first batch
    pays minutes of compilation, worth it only for thousands of images)."""
    if not hasattr(backbone.unet, "_orig_mod"):
        backbone.unet = torch.compile(backbone.unet, mode=mode, fullgraph=False)
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
    if text in ("sd15-random", "tiny", "tiny-pixel-v"):
        build = build_random_sd15_backbone if text == "sd15-random" else build_tiny_backbone
        if text == "tiny-pixel-v":
            kwargs.setdefault("pixel_space", True)
            kwargs.setdefault("prediction_type", "v_prediction")
        workdir = kwargs.pop("workdir", None)
        if workdir is not None:
            return build(workdir, **kwargs)
        # The folder only holds the tokenizer files while they are read into memory.
        with tempfile.TemporaryDirectory(prefix=f"tint_{text}_") as scratch:
            return build(scratch, **kwargs)
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
        from tint.diffusion.small_generator import load_small_generator

        return load_small_generator(path)
    return load_stable_diffusion(text, **kwargs)
