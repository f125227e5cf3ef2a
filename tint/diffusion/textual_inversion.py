"""Textual inversion (Gal et al., 2022) of one class: a new token whose embedding makes the
diffusion model reproduce the class's support images (paper Sec. 3.1, Appendix B.2).

A placeholder token (``<tint-0>``) is added to the tokenizer and its embedding row is
initialised from the word ``object``. Training minimises Eq. 1 (eps target, or the v target
for v-prediction models) for prompts ``a photo of an <tint-0>`` on the cached latents of the
support images, with t drawn uniformly from [t_min, t_max) (t_min = 250: small t made the
inversion copy up-sampling artifacts). Only that one vector is a parameter: during training
the text encoder's embedding layer is wrapped so that the placeholder's id reads the trained
vector and every other id reads the untouched table, so all other rows stay bit-identical
by construction (and are checked afterwards). The learned vector is written to its row at
the end and can be saved in diffusers' textual-inversion format.

Precision: the trained vector, the optimiser state and the loss are float32; the forward pass
runs under autocast in `backbone.precision` (bf16 on CUDA by default, a no-op for fp32) with
loss scaling for fp16 (tint.devices).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tint.devices import autocast, grad_scaler
from tint.diffusion.ddim import frozen_parameters, unet_output
from tint.errors import TintError
from tint.io import load_tensors, save_tensors


@dataclass
class TextualInversionConfig:
    """Defaults of the paper: 5000 steps, Adam lr 1e-3 constant, batch 1, t in [250, 1000).

    The optimiser is AdamW with weight_decay 0 (plain Adam): diffusers' TI example decays the
    embedding (1e-2), the paper does not mention it; set `weight_decay` to match diffusers.
    t_max None means the model's num_train_timesteps.
    """

    placeholder: str = "<tint-0>"
    init_word: str = "object"
    template: str = "a photo of an {}"
    steps: int = 5000
    lr: float = 1e-3
    batch_size: int = 1
    grad_accum: int = 1
    t_min: int = 250
    t_max: int | None = None
    seed: int = 0
    weight_decay: float = 0.0
    log_every: int = 100

    def validate(self, num_train_timesteps: int) -> tuple[int, int]:
        """Return (t_min, t_max) after checking every setting."""
        t_max = num_train_timesteps if self.t_max is None else int(self.t_max)
        if not 0 <= self.t_min < t_max <= num_train_timesteps:
            raise TintError(
                f"textual inversion: need 0 <= t_min < t_max <= {num_train_timesteps}, "
                f"got t_min={self.t_min}, t_max={t_max}"
            )
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise TintError("textual inversion: steps, batch_size and grad_accum must be >= 1")
        if "{}" not in self.template:
            raise TintError(f"textual inversion template {self.template!r} needs a '{{}}' slot")
        return self.t_min, t_max


@dataclass
class TextualInversionResult:
    token: str
    token_id: int
    embedding: torch.Tensor  # [D] float32
    losses: list[float] = field(default_factory=list)  # one per optimizer step


# --- the placeholder token -----------------------------------------------------------------


def add_placeholder_token(backbone, token: str, init_word: str = "object") -> int:
    """Add `token` to the tokenizer, grow the embedding table, copy `init_word`'s row into it.

    Works for CLIP and BERT tokenizers (anything with add_tokens) and any text encoder with
    get_input_embeddings / resize_token_embeddings. Returns the new token id.
    """
    tokenizer, encoder = backbone.tokenizer, backbone.text_encoder
    init_ids = tokenizer.encode(init_word, add_special_tokens=False)
    if len(init_ids) != 1:
        raise TintError(
            f"textual inversion init word {init_word!r} is {len(init_ids)} tokens for this "
            "tokenizer; choose a word that is a single token (e.g. 'object')"
        )
    if tokenizer.add_tokens([token]) == 0:
        raise TintError(
            f"textual inversion token {token!r} is already in the tokenizer; use another "
            "placeholder (e.g. '<tint-1>') or a fresh backbone"
        )
    token_id = tokenizer.convert_tokens_to_ids(token)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        table = encoder.get_input_embeddings().weight
        table[token_id] = table[init_ids[0]]
    return int(token_id)


def _fresh_placeholder(backbone, token: str, init_word: str) -> int:
    """Add the placeholder, or (re-training the same class in one process) reset its row
    to the init word's embedding."""
    if token not in backbone.tokenizer.get_vocab():
        return add_placeholder_token(backbone, token, init_word)
    init_ids = backbone.tokenizer.encode(init_word, add_special_tokens=False)
    if len(init_ids) != 1:
        raise TintError(f"textual inversion init word {init_word!r} is not a single token")
    token_id = int(backbone.tokenizer.convert_tokens_to_ids(token))
    with torch.no_grad():
        table = backbone.text_encoder.get_input_embeddings().weight
        table[token_id] = table[init_ids[0]]
    return token_id


def install_token_embedding(backbone, token: str, vector: torch.Tensor) -> int:
    """Make `token` mean `vector` in this backbone (add it if absent): how a saved class
    embedding is used again, e.g. by the generate stage on a freshly loaded backbone."""
    tokenizer, encoder = backbone.tokenizer, backbone.text_encoder
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_id = int(tokenizer.convert_tokens_to_ids(token))
    table = encoder.get_input_embeddings().weight
    if vector.reshape(-1).shape[0] != table.shape[1]:
        raise TintError(
            f"embedding for {token!r} has {vector.numel()} values but this text encoder uses "
            f"{table.shape[1]}; it was learned with another model"
        )
    with torch.no_grad():
        table[token_id] = vector.reshape(-1).to(table.device, table.dtype)
    return token_id


class _PlaceholderEmbedding(nn.Module):
    """Embedding layer whose row `token_id` is the trainable `vector`; the table is frozen."""

    def __init__(self, base: nn.Embedding, token_id: int) -> None:
        super().__init__()
        self.base = base
        self.token_id = token_id
        self.vector = nn.Parameter(base.weight[token_id].detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:  # text models may read .weight (e.g. for dtype)
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.base(input_ids)
        is_token = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(is_token, self.vector.to(rows.dtype), rows)


@contextmanager
def _train_placeholder(encoder: nn.Module, token_id: int):
    """Swap in the placeholder layer for training; always restore the original layer."""
    base = encoder.get_input_embeddings()
    layer = _PlaceholderEmbedding(base, token_id)
    was_training = encoder.training
    encoder.eval()  # no dropout: the prompt must encode the same way every step
    encoder.set_input_embeddings(layer)
    try:
        yield layer
    finally:
        encoder.set_input_embeddings(base)
        encoder.train(was_training)


# --- training ------------------------------------------------------------------------------


def sample_training_timesteps(
    generator: torch.Generator, batch: int, t_min: int, t_max: int
) -> torch.Tensor:
    """t ~ U{t_min, ..., t_max - 1} (Eq. 1 restricted to t >= t_min)."""
    return torch.randint(t_min, t_max, (batch,), generator=generator)


def sample_training_noise(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """The noise of Eq. 1, drawn on the CPU so a seed gives the same run on any device."""
    return torch.randn(shape, generator=generator)


def diffusion_target(backbone, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(noisy latents z_t, regression target): eps, or v = sqrt(a) eps - sqrt(1-a) z0."""
    alphas = backbone.scheduler.alphas_cumprod.to(z0.device, torch.float32)[t.to(z0.device)]
    a = alphas.sqrt().view(-1, 1, 1, 1)
    s = (1.0 - alphas).clamp(min=0).sqrt().view(-1, 1, 1, 1)
    noisy = a * z0 + s * noise
    if backbone.prediction_type == "epsilon":
        return noisy, noise
    if backbone.prediction_type == "v_prediction":
        return noisy, a * noise - s * z0
    raise TintError(f"prediction_type {backbone.prediction_type!r} is not supported")


def textual_inversion(
    backbone,
    images01: torch.Tensor,
    config: TextualInversionConfig | None = None,
    progress: bool = True,
) -> TextualInversionResult:
    """Learn one token embedding for the K support images [K,3,R,R] of a class (Eq. 1)."""
    config = config or TextualInversionConfig()
    t_min, t_max = config.validate(backbone.num_train_timesteps)
    if images01.ndim != 4 or images01.shape[0] < 1:
        raise TintError(f"textual inversion needs images [K, 3, R, R], got {tuple(images01.shape)}")
    latents = backbone.encode_images(images01).float()  # cached once: the VAE is frozen
    token_id = _fresh_placeholder(backbone, config.placeholder, config.init_word)
    table_before = backbone.text_encoder.get_input_embeddings().weight.detach().clone()
    input_ids = backbone.tokenize([config.template.format(config.placeholder)])
    generator = torch.Generator().manual_seed(config.seed)
    frozen = frozen_parameters(backbone.unet, backbone.text_encoder, backbone.vae)
    with frozen, _train_placeholder(backbone.text_encoder, token_id) as layer:
        optimizer = torch.optim.AdamW([layer.vector], lr=config.lr, weight_decay=config.weight_decay)
        losses = _train(backbone, layer, latents, input_ids, generator, optimizer,
                        config, t_min, t_max, progress)
        vector = layer.vector.detach().clone()
    _write_row(backbone, token_id, vector, table_before)
    return TextualInversionResult(config.placeholder, token_id, vector.cpu(), losses)


def _train(backbone, layer, latents, input_ids, generator, optimizer, config, t_min, t_max,
           progress) -> list[float]:
    losses: list[float] = []
    scaler = grad_scaler(backbone.device, backbone.precision)
    bar = tqdm(range(config.steps), desc="textual inversion", disable=not progress, leave=False)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(config.grad_accum):
            with autocast(backbone.device, backbone.precision):
                loss = _batch_loss(backbone, latents, input_ids, generator, config, t_min, t_max)
            if not math.isfinite(loss.item()):
                raise TintError(
                    f"textual inversion: loss is {loss.item()} at step {step}; nothing was "
                    "written. Check the images (NaN?) and run the model in float32"
                )
            scaler.scale(loss / config.grad_accum).backward()
            total += loss.item() / config.grad_accum
        scaler.step(optimizer)
        scaler.update()
        losses.append(total)
        if config.log_every and step % config.log_every == 0:
            bar.set_postfix(loss=f"{total:.4f}")
    return losses


def _batch_loss(backbone, latents, input_ids, generator, config, t_min, t_max) -> torch.Tensor:
    """Eq. 1 on one random batch (`sample_training_batch`)."""
    z0, t, noise = sample_training_batch(latents, generator, config.batch_size, t_min, t_max)
    return denoising_loss(backbone, z0, t, noise, input_ids)


def sample_training_batch(latents: torch.Tensor, generator: torch.Generator, batch_size: int,
                          t_min: int, t_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z0, t, noise) for Eq. 1: support latents with replacement, t in [t_min, t_max), noise;
    always drawn in this order from `generator` (TI and the LoRA adapters train on it)."""
    picks = torch.randint(latents.shape[0], (batch_size,), generator=generator)
    z0 = latents[picks.to(latents.device)]
    t = sample_training_timesteps(generator, batch_size, t_min, t_max)
    noise = sample_training_noise(generator, tuple(z0.shape)).to(z0.device)
    return z0, t, noise


def denoising_loss(backbone, z0, t, noise, input_ids) -> torch.Tensor:
    """Eq. 1 for given latents, timesteps, noise and prompt ids (batch 1 ids broadcast)."""
    noisy, target = diffusion_target(backbone, z0, noise, t)
    text = backbone.encode_ids(input_ids.expand(z0.shape[0], -1))
    pred = unet_output(backbone, noisy, t, text)
    return torch.mean((pred - target.float()) ** 2)


def _write_row(backbone, token_id: int, vector: torch.Tensor, table_before: torch.Tensor) -> None:
    """Store the learned vector in its row; every other row must be exactly as before."""
    table = backbone.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[token_id] = vector.to(table.dtype)
    others = torch.ones(table.shape[0], dtype=torch.bool)
    others[token_id] = False
    if not torch.equal(table[others], table_before[others]):
        raise TintError("textual inversion changed embedding rows other than the new token")


# --- diffusers textual-inversion files -----------------------------------------------------


def save_textual_inversion(path: str | Path, token: str, embedding: torch.Tensor) -> Path:
    """Write {token: vector[D]} as safetensors: what diffusers' load_textual_inversion reads
    (``pipe.load_textual_inversion(path)`` adds the token to any SD pipeline)."""
    vector = embedding.detach().float().cpu().reshape(-1)
    save_tensors(path, {token: vector})
    return Path(path)


def load_textual_inversion_file(path: str | Path) -> tuple[str, torch.Tensor]:
    """Read a diffusers-format textual-inversion file -> (token, vector [D])."""
    tensors, _ = load_tensors(path)
    if len(tensors) != 1:
        raise TintError(
            f"{path}: a textual-inversion file holds exactly one token, found {len(tensors)} "
            f"tensors ({', '.join(sorted(tensors)) or 'none'})"
        )
    token, vector = next(iter(tensors.items()))
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.ndim != 1:
        raise TintError(f"{path}: expected one vector for {token!r}, got shape {tuple(vector.shape)}")
    return token, vector
