"""Tests of tint's own small generator and its pretraining (tiny configs, one thread)."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

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
