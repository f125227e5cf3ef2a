"""Resolution bridge: the paper's 84 -> 96 -> SR x4 -> 512 chain, its adaptation, loaders."""

from __future__ import annotations

import pytest
import torch

from tint.diffusion.bridge import (
    InterpolationSuperResolver,
    ResolutionBridge,
    SuperResolver,
    load_super_resolver,
    resize,
)
from tint.errors import TintError


class RecordingResolver:
    """Nearest-neighbour x4 that records the sizes it was given."""

    scale = 4

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        self.seen.append(x01.shape[-1])
        return x01.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)


def test_paper_chain_runs_sr_at_96_and_lands_on_512():
    sr = RecordingResolver()
    bridge = ResolutionBridge(512, super_resolver=sr)
    assert bridge.plan(84) == [96, "sr", 512]
    out = bridge.to_model(torch.rand(2, 3, 84, 84))
    assert out.shape == (2, 3, 512, 512)
    assert sr.seen == [96]
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_chain_adapts_to_other_model_sizes():
    sr = RecordingResolver()
    assert ResolutionBridge(32, super_resolver=sr).plan(84) == [32]  # shrink: one resize
    assert ResolutionBridge(84, super_resolver=sr).plan(84) == []
    assert ResolutionBridge(128, super_resolver=sr).plan(32) == ["sr"]  # 32 * 4 = 128
    assert ResolutionBridge(256, super_resolver=sr).plan(84) == ["sr", 256]  # 84*4=336 -> 256
    out = ResolutionBridge(32, super_resolver=sr).to_model(torch.rand(3, 3, 84, 84))
    assert out.shape == (3, 3, 32, 32) and sr.seen == []


def test_bilinear_only_ablation_is_one_resize():
    bridge = ResolutionBridge(512)  # no super-resolver
    assert bridge.plan(84) == [512]
    x = torch.rand(1, 3, 84, 84)
    direct = torch.nn.functional.interpolate(x, size=(512, 512), mode="bilinear",
                                             align_corners=False).clamp(0, 1)
    assert torch.allclose(bridge.to_model(x), direct)


def test_constant_image_survives_the_round_trip():
    x = torch.full((1, 3, 84, 84), 0.3)
    bridge = ResolutionBridge(512, super_resolver=InterpolationSuperResolver("bicubic"))
    up = bridge.to_model(x)
    assert torch.allclose(up, torch.full_like(up, 0.3), atol=1e-5)
    down = bridge.to_dataset(up, 84)
    assert down.shape == (1, 3, 84, 84)
    assert torch.allclose(down, x, atol=1e-5)


def test_to_dataset_smooth_image_round_trip_is_close():
    coarse = torch.rand(1, 3, 6, 6)
    x = resize(coarse, 84)
    back = ResolutionBridge.to_dataset(ResolutionBridge(512).to_model(x), 84)
    assert (back - x).abs().mean() < 0.02


def test_bad_images_are_refused():
    bridge = ResolutionBridge(64)
    with pytest.raises(TintError, match="RGB"):
        bridge.to_model(torch.rand(1, 1, 84, 84))
    with pytest.raises(TintError, match="square"):
        bridge.to_model(torch.rand(1, 3, 84, 60))


def test_load_super_resolver_specs(tmp_path):
    assert load_super_resolver(None) is None
    assert load_super_resolver("none") is None
    bilinear = load_super_resolver("bilinear")
    assert isinstance(bilinear, SuperResolver)
    assert bilinear(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    with pytest.raises(TintError, match="no such file"):
        load_super_resolver(str(tmp_path / "missing.pt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(TintError, match="model_index.json"):
        load_super_resolver(str(tmp_path / "folder"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(TintError, match="TorchScript"):
        load_super_resolver(str(junk))


class _Upsample4(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, scale_factor=4.0, mode="nearest")


class _WrongScale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")


def test_torchscript_super_resolver(tmp_path):
    path = tmp_path / "sr.pt"
    torch.jit.script(_Upsample4()).save(str(path))
    sr = load_super_resolver(str(path))
    out = ResolutionBridge(512, super_resolver=sr).to_model(torch.rand(2, 3, 84, 84))
    assert out.shape == (2, 3, 512, 512)
    bad = tmp_path / "bad.pt"
    torch.jit.script(_WrongScale()).save(str(bad))
    with pytest.raises(TintError, match="expected"):
        load_super_resolver(str(bad))(torch.rand(1, 3, 8, 8))


def test_local_diffusers_super_resolution_pipeline(tmp_path):
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=16,
                    down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8),
                    layers_per_block=1, norm_num_groups=8)
    unet = UNet2DModel(sample_size=8, in_channels=6, out_channels=3, block_out_channels=(16, 16),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       layers_per_block=1, norm_num_groups=8)
    LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler()).save_pretrained(
        tmp_path / "sr")
    sr = load_super_resolver(str(tmp_path / "sr"))
    sr.steps = 2
    x = torch.rand(2, 3, 8, 8)
    out = sr(x)
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, sr(x))  # seeded: same input, same output
    assert ResolutionBridge(32, super_resolver=sr).plan(8) == ["sr"]
