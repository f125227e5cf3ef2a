"""Tests of tint's own small generator and its pretraining (tiny configs, one thread)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tint.diffusion import pretrain
from tint.diffusion import small_generator as sg

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------
# oracle sampling: the schedule, the latent scaling and the DDIM sampler agree
class _Out:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


class MixtureOracle(nn.Module):
    """The exact v of a data distribution made of a few points (the Bayes-optimal model)."""

    def __init__(self, points: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.points = points  # [M, C, H, W]
        self.alphas = alphas_cumprod.double()
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the backbone a device and dtype
        self.config = argparse.Namespace(in_channels=points.shape[1])

    def forward(self, z, t, encoder_hidden_states=None):
        ab = self.alphas[t.long()].view(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        zd = z.double()
        diff = zd[:, None] - a[:, None] * self.points.double()[None]  # [B, M, ...]
        logits = -(diff.flatten(2) ** 2).sum(-1) / (2 * (s.view(-1, 1) ** 2).clamp_min(1e-12))
        weights = torch.softmax(logits, dim=1).view(*logits.shape, 1, 1, 1)
        x0 = (weights * self.points.double()[None]).sum(1)
        v = (a * zd - x0) / s.clamp_min(1e-12)
        return _Out(v.float())


def _oracle_backbone(points: torch.Tensor):
    from tint.diffusion.backbone import DiffusionBackbone

    encoder = nn.Embedding(4, 8)
    tokenizer = argparse.Namespace(model_max_length=2)
    scheduler = sg.build_scheduler()
    return DiffusionBackbone(
        unet=MixtureOracle(points, scheduler.alphas_cumprod),
        scheduler=scheduler,
        vae=sg.space_to_depth_autoencoder(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        resolution=points.shape[-1] * sg.PATCH,
    )


@pytest.mark.parametrize("num_points", [1, 3])
def test_oracle_sampling_recovers_the_data(num_points: int) -> None:
    from tint.diffusion.ddim import ddim_sample

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(num_points, 3, 8, 8, generator=gen)
    backbone = _oracle_backbone(sg.space_to_depth_autoencoder().encode(images))
    zT = torch.randn((16, *backbone.latent_shape), generator=gen)
    text = torch.zeros(16, 2, 8)
    z0 = ddim_sample(backbone, zT, text, None, guidance=1.0, num_steps=25)
    out = backbone.decode_latents(z0)
    dist = ((out[:, None] - images[None]) ** 2).flatten(2).mean(-1)  # [16, M]
    assert dist.min(1).values.max() < 1e-4  # every sample lands on a data point
    if num_points > 1:
        assert len(set(dist.argmin(1).tolist())) > 1  # and not all on the same one


def test_schedule_is_v_cosine_zero_terminal_snr_trailing() -> None:
    scheduler = sg.build_scheduler()
    assert scheduler.config.prediction_type == "v_prediction"
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR
    scheduler.set_timesteps(10)
    assert int(scheduler.timesteps[0]) == 999  # trailing spacing starts at pure noise


def test_space_to_depth_round_trip_and_noise_is_per_pixel() -> None:
    ae = sg.space_to_depth_autoencoder()
    x = torch.rand(2, 3, 8, 8)
    z = ae.encode(x)
    assert z.shape == (2, 12, 4, 4)
    assert torch.allclose(ae.decode(z), x, atol=1e-6)
    assert torch.allclose(z.norm(), (x * 2 - 1).norm())  # orthogonal: norms preserved


# --------------------------------------------------------------------------------------
# a tiny generator of this architecture: MiniLM's tokenizer + a tiny random BertModel
@pytest.fixture(scope="module")
def tiny_text():
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(sg.minilm_path()))
    tokenizer.model_max_length = 8
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    return BertModel(config, add_pooling_layer=False), tokenizer


@pytest.fixture()
def tiny_backbone(tiny_text):
    encoder, tokenizer = tiny_text
    return sg.build_small_generator("tiny", resolution=16, text_encoder=encoder, tokenizer=tokenizer)


def _fake_pool(n_cats: int = 3, per_cat: int = 4, side: int = 16):
    """Solid-colour squares on white, one colour per category (learnable in a few steps)."""
    images = np.full((n_cats * per_cat, side, side, 3), 255, dtype=np.uint8)
    colours = np.array([[220, 30, 30], [30, 180, 40], [30, 60, 220]], dtype=np.uint8)
    for i in range(n_cats * per_cat):
        images[i, 4:12, 4:12] = colours[i // per_cat % 3]
    labels = np.repeat(np.arange(n_cats), per_cat)
    return images, labels


def _tiny_config(**kw) -> pretrain.PretrainConfig:
    base = dict(size="tiny", resolution=16, batch_size=8, lr=2e-3, warmup_steps=2, steps=40,
                scale_jitter=0.0, translate_jitter=0.0)
    base.update(kw)
    return pretrain.PretrainConfig(**base)


def _text_tables(tiny_text, n_cats: int):
    encoder, tokenizer = tiny_text
    table = sg.encode_text(encoder, tokenizer, [pretrain.caption_for(f"c.cat{i}") for i in range(n_cats)])
    return table, sg.encode_text(encoder, tokenizer, [""])


def _fixed_loss(unet, images: np.ndarray, text: torch.Tensor) -> float:
    x0 = torch.nn.functional.pixel_unshuffle(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, sg.PATCH)
    alphas = sg.build_scheduler().alphas_cumprod.float()
    with torch.no_grad():
        return float(pretrain.diffusion_loss(unet, alphas, x0, text, torch.Generator().manual_seed(5)))


def test_training_steps_lower_the_loss(tmp_path: Path, tiny_text, monkeypatch) -> None:
    monkeypatch.setattr(pretrain.sg, "build_unet", _tiny_unet_for(tiny_text))
    images, labels = _fake_pool()
    table, empty = _text_tables(tiny_text, 3)
    cfg = _tiny_config()
    before_unet = pretrain.sg.build_unet("tiny", 16)
    text = table[torch.from_numpy(labels)]
    before = _fixed_loss(before_unet, images, text)
    unet, ema, state = pretrain.train(tmp_path, cfg, images, labels, table, empty,
                                      max_steps=40, progress=False)
    assert state.step == 40
    assert _fixed_loss(unet, images, text) < 0.7 * before
    assert (tmp_path / pretrain.CHECKPOINT).is_file()


def _tiny_unet_for(tiny_text):
    """build_unet with the tiny text encoder's width (32) instead of MiniLM's 384."""
    original = sg.build_unet
    width = int(tiny_text[0].config.hidden_size)

    def build(size="tiny", resolution=16, cross_attention_dim=width):
        return original(size, resolution, cross_attention_dim=width)

    return build


def test_checkpoint_round_trips_bit_exactly_and_resumes(tmp_path: Path, tiny_text, monkeypatch) -> None:
    monkeypatch.setattr(pretrain.sg, "build_unet", _tiny_unet_for(tiny_text))
    images, labels = _fake_pool()
    table, empty = _text_tables(tiny_text, 3)
    cfg = _tiny_config(steps=10)
    unet, ema, optimizer_state = pretrain.train(tmp_path / "a", cfg, images, labels, table, empty,
                                                max_steps=3, progress=False)
    saved, meta = pretrain.load_tensors(tmp_path / "a" / pretrain.CHECKPOINT)
    assert meta["step"] == 3
    assert any(k.startswith("opt.") for k in saved)
    for k, v in unet.state_dict().items():
        assert torch.equal(saved[f"unet.{k}"], v)
    for k, v in ema.state_dict().items():
        assert torch.equal(saved[f"ema.{k}"], v)
    # resume from the checkpoint: 3 + 2 steps == 5 straight steps, bit for bit
    resumed, _, state = pretrain.train(tmp_path / "a", cfg, images, labels, table, empty,
                                       max_steps=5, progress=False)
    assert state.step == 5
    # the generator export (diffusers layout + marker) round-trips too
    out = sg.save_small_generator(tmp_path / "gen", ema, resolution=16, size="tiny")
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    for k, v in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    half = sg.save_small_generator(tmp_path / "gen16", ema, resolution=16, dtype=torch.float16)
    parts16 = UNet2DConditionModel.from_pretrained(str(half / "unet"))
    assert json.loads((half / sg.MARKER_FILE).read_text())["weights_dtype"] == "float16"
    assert next(parts16.parameters()).dtype == torch.float16  # load_small_generator upcasts


def test_resume_equals_uninterrupted_training(tmp_path: Path, tiny_text, monkeypatch) -> None:
    monkeypatch.setattr(pretrain.sg, "build_unet", _tiny_unet_for(tiny_text))
    images, labels = _fake_pool()
    table, empty = _text_tables(tiny_text, 3)
    cfg = _tiny_config(steps=10)
    straight, _, _ = pretrain.train(tmp_path / "s", cfg, images, labels, table, empty,
                                    max_steps=4, progress=False)
    pretrain.train(tmp_path / "r", cfg, images, labels, table, empty, max_steps=2, progress=False)
    resumed, _, _ = pretrain.train(tmp_path / "r", cfg, images, labels, table, empty,
                                   max_steps=4, progress=False)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
