"""Low-rank adapters (LoRA, Hu et al. 2022) of the UNet's attention, fine-tuned on one class's
supports: the lever DreamBooth and DataDream add when a learned token alone cannot make a small
generator draw a class it never saw (issue 14). Built on `peft` through diffusers' adapter API.

    supports --VAE--> z0 (cached) --Eq. 1 with prompt "a photo of an <token>", only the
    adapters train--> adapter tensors (float32, CPU; stored in the class artifact)

The backbone is shared by every class of a run, so an adapter is only ever attached inside
`class_adapter(...)`, which always detaches it again: outside it the UNet computes exactly what
it computed before (tested). The class token's embedding is frozen while the adapters train.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tint.devices import autocast, grad_scaler
from tint.diffusion.ddim import frozen_parameters, unet_output
from tint.diffusion.textual_inversion import diffusion_target, sample_training_batch
from tint.errors import TintError

ADAPTER = "tint-class"  # the one adapter name a class ever uses on a shared backbone
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection


@dataclass
class AdapterConfig:
    """Rank 4 and lr 1e-4 are the usual DreamBooth-LoRA values; t spans the whole range
    (the adapters must also learn the fine detail that TI's t >= 250 leaves out)."""

    rank: int = 4
    alpha: float | None = None  # None: = rank (scale 1)
    steps: int = 100
    lr: float = 1e-4
    t_min: int = 0
    batch_size: int = 1
    seed: int = 0
    targets: Sequence[str] = DEFAULT_TARGETS

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=int(self.rank), lora_alpha=float(self.alpha or self.rank),
                          init_lora_weights="gaussian", target_modules=list(self.targets))


# --- attaching and detaching ------------------------------------------------------------------


def attach_adapter(unet: torch.nn.Module, config: AdapterConfig) -> list[torch.nn.Parameter]:
    """Add a fresh adapter (B = 0, so the UNet is unchanged) and return its parameters."""
    if getattr(unet, "peft_config", None) and ADAPTER in unet.peft_config:
        raise TintError(f"the UNet already carries adapter {ADAPTER!r}; attach one class at a time")
    try:
        unet.add_adapter(config.peft_config(), adapter_name=ADAPTER)
    except ValueError as err:  # e.g. no module matches the targets
        raise TintError(f"LoRA targets {list(config.targets)} do not fit this UNet: {err}") from err
    return [p for name, p in unet.named_parameters() if f".{ADAPTER}." in name]


def detach_adapter(unet: torch.nn.Module) -> None:
    if getattr(unet, "peft_config", None) and ADAPTER in unet.peft_config:
        unet.delete_adapters(ADAPTER)


def adapter_tensors(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The attached adapter's weights, float32 on the CPU, keyed without the adapter name."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {key: value.detach().float().cpu().clone() for key, value in state.items()}


@contextmanager
def class_adapter(unet: torch.nn.Module, tensors: dict[str, torch.Tensor],
                  config: AdapterConfig) -> Iterator[None]:
    """The UNet with a stored adapter attached; detached again on exit, whatever happens."""
    from peft.utils import set_peft_model_state_dict

    params = attach_adapter(unet, config)
    try:
        result = set_peft_model_state_dict(unet, tensors, adapter_name=ADAPTER)
        missing = [k for k in getattr(result, "missing_keys", []) if ADAPTER in k]
        if result.unexpected_keys or missing or len(tensors) != len(params):
            raise TintError(f"stored LoRA weights ({len(tensors)} tensors) do not fit this UNet's "
                            f"adapter ({len(params)}): use the backbone they were trained on")
        yield
    finally:
        detach_adapter(unet)


# --- training ------------------------------------------------------------------------------


def train_class_adapter(backbone, images01: torch.Tensor, prompt: str, config: AdapterConfig,
                        progress: bool = True) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fine-tune a fresh adapter on the supports [K,3,M,M] with Eq. 1; return (weights, losses).

    The UNet, text encoder and VAE stay frozen and the adapter is detached before returning.
    """
    t_max = backbone.num_train_timesteps
    if not 0 <= config.t_min < t_max or config.steps < 1 or config.batch_size < 1:
        raise TintError(f"LoRA: need 0 <= t_min < {t_max}, steps >= 1 and batch_size >= 1, got "
                        f"t_min={config.t_min}, steps={config.steps}, batch_size={config.batch_size}")
    latents = backbone.encode_images(images01).float()
    with torch.no_grad():
        text = backbone.encode_ids(backbone.tokenize([prompt]))
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # the adapters' Gaussian initialisation
    with frozen_parameters(backbone.unet, backbone.text_encoder, backbone.vae):
        params = attach_adapter(backbone.unet, config)
        try:
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
            losses = _train(backbone, latents, text, generator, optimizer, config, t_max, progress)
            tensors = adapter_tensors(backbone.unet)
        finally:
            detach_adapter(backbone.unet)
    return tensors, losses


def _train(backbone, latents, text, generator, optimizer, config, t_max, progress) -> list[float]:
    scaler = grad_scaler(backbone.device, backbone.precision)
    losses: list[float] = []
    for step in tqdm(range(config.steps), desc="LoRA", disable=not progress, leave=False):
        optimizer.zero_grad(set_to_none=True)
        z0, t, noise = sample_training_batch(latents, generator, config.batch_size,
                                             config.t_min, t_max)
        with autocast(backbone.device, backbone.precision):
            noisy, target = diffusion_target(backbone, z0, noise, t)
            pred = unet_output(backbone, noisy, t, text.expand(z0.shape[0], -1, -1))
            loss = torch.mean((pred - target.float()) ** 2)
        if not math.isfinite(loss.item()):
            raise TintError(f"LoRA: loss is {loss.item()} at step {step}; nothing was written. "
                            "Lower generator.specialize.lora_lr or run the model in float32")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return losses
