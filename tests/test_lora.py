"""tint-lora: UNet adapters fine-tuned on the supports (issue 14's lever beyond the paper).

The adapters must fit the supports better than the bare UNet, be stored in the class
artifact, be attached while that class's images are made, and never stay on the shared
backbone afterwards (the next class, or TINT proper, must see the untouched UNet).
"""

from __future__ import annotations

import pytest
import torch

from tint.diffusion.lora import AdapterConfig, class_adapter, train_class_adapter
from tint.diffusion.textual_inversion import diffusion_target
from tint.errors import TintError
from tint.generators import create_generator
from tint.generators.base import load_artifact
from tint.generators.tint import (
    LORA_PREFIX,
    draw_image,
    load_tint_artifact,
    sample_images,
)
from tint.io import load_tensors, save_tensors
from tint.testing import build_tiny_backbone, tiny_pixel_v_backbone

torch.set_num_threads(1)
RES = 24
FAST = {"num_steps": 2, "bridge_steps": [], "dataset_resolution": RES, "ti_steps": 1,
        "nti_inner_steps": 1, "lora_steps": 2, "progress": False}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny"), seed=0)


def _supports(k: int = 2, res: int = RES) -> torch.Tensor:
    return torch.rand(k, 3, res, res, generator=torch.Generator().manual_seed(0))


def _unet_probe(backbone) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, *backbone.latent_shape, generator=g)
    text = backbone.encode_prompt(["a photo of an object"]).expand(2, -1, -1)
    with torch.no_grad():
        return backbone.unet(z, torch.tensor([100, 700]), encoder_hidden_states=text).sample


def _support_loss(backbone, images, prompt, times=(850, 950)) -> float:
    """Eq. 1 on the supports over fixed (t, noise) draws: what the adapters minimise."""
    z0 = backbone.encode_images(images).float()
    g = torch.Generator().manual_seed(5)
    text = backbone.encode_prompt([prompt])
    total = 0.0
    with torch.no_grad():
        for t in times:
            noise = torch.randn(z0.shape, generator=g)
            ts = torch.full((z0.shape[0],), t)
            noisy, target = diffusion_target(backbone, z0, noise, ts)
            pred = backbone.unet(noisy, ts, encoder_hidden_states=text.expand(z0.shape[0], -1, -1))
            total += torch.mean((pred.sample - target) ** 2).item()
    return total / len(times)


def test_trained_adapters_fit_the_supports_and_leave_the_unet_as_it_was(tmp_path):
    # a pixel-space v-prediction model (the small generator's recipe); at t >= 800 the target
    # is mostly the image itself, which a random tiny UNet's adapters can learn in 100 steps
    backbone = tiny_pixel_v_backbone(tmp_path)
    before = _unet_probe(backbone)
    flags = [p.requires_grad for p in backbone.unet.parameters()]
    images = torch.zeros(4, 3, backbone.resolution, backbone.resolution)
    images[:, 0], images[:, 1] = 0.9, 0.2
    images[:, :, : backbone.resolution // 2] *= 0.3  # one two-tone class
    prompt = "a photo of an object"
    config = AdapterConfig(rank=4, steps=100, lr=1e-2, t_min=800, batch_size=4, seed=0)
    tensors, losses = train_class_adapter(backbone, images, prompt, config, progress=False)
    assert torch.equal(_unet_probe(backbone), before)  # detached after training
    assert [p.requires_grad for p in backbone.unet.parameters()] == flags  # as before
    assert len(losses) == 100 and tensors and all(v.dtype == torch.float32 for v in tensors.values())
    bare = _support_loss(backbone, images, prompt)
    with class_adapter(backbone.unet, tensors, config):
        adapted = _support_loss(backbone, images, prompt)
        assert not torch.equal(_unet_probe(backbone), before)
    assert adapted < 0.95 * bare, (adapted, bare)  # measured: 0.605 vs 0.665
    assert torch.equal(_unet_probe(backbone), before)


def test_adapter_is_detached_even_when_the_work_inside_fails(backbone):
    before = _unet_probe(backbone)
    config = AdapterConfig(steps=1)
    tensors, _ = train_class_adapter(backbone, _supports(2, backbone.resolution), "a photo",
                                     config, progress=False)
    with pytest.raises(RuntimeError), class_adapter(backbone.unet, tensors, config):
        raise RuntimeError("boom")
    assert torch.equal(_unet_probe(backbone), before)


def test_weights_of_another_shape_are_refused_by_name(backbone):
    tensors, _ = train_class_adapter(backbone, _supports(2, backbone.resolution), "a photo",
                                     AdapterConfig(rank=4, steps=1), progress=False)
    with pytest.raises(TintError, match="do not fit"), \
            class_adapter(backbone.unet, dict(list(tensors.items())[:-2]), AdapterConfig(rank=4)):
        pass
    with pytest.raises(Exception, match="size mismatch|do not fit"), \
            class_adapter(backbone.unet, tensors, AdapterConfig(rank=2)):
        pass
    before = _unet_probe(backbone)
    assert torch.equal(before, _unet_probe(backbone))


def test_lora_artifact_carries_its_adapters_and_generation_uses_them(backbone, tmp_path):
    module = create_generator("tint-lora")
    before = _unet_probe(backbone)
    path = module.specialize(backbone, "red thing", _supports(), tmp_path / "art", FAST)
    tensors, meta = load_artifact(path)
    assert meta["generator"] == "tint-lora" and meta["lora"]["rank"] == 4
    assert any(k.startswith(LORA_PREFIX) for k in tensors)
    assert torch.equal(_unet_probe(backbone), before)

    artifact = load_tint_artifact(path, "tint-lora")
    draws = [draw_image(0, "red thing", i, artifact.num_supports, backbone.latent_shape,
                        module.GenerateSettings()) for i in range(2)]
    with_adapters = sample_images(backbone, artifact, draws)
    assert torch.equal(sample_images(backbone, artifact, draws), with_adapters)  # deterministic
    artifact.lora.clear()
    without = sample_images(backbone, artifact, draws)
    assert not torch.allclose(with_adapters, without)
    assert torch.equal(_unet_probe(backbone), before)

    paths = module.generate(backbone, path, 2, tmp_path / "img", 0, {"progress": False})
    assert len(paths) == 2
    with pytest.raises(TintError, match="made by generator 'tint-lora', not 'tint'"):
        create_generator("tint").generate(backbone, path, 2, tmp_path / "img2", 0, {})


def test_a_lora_artifact_stripped_of_its_weights_is_refused(backbone, tmp_path):
    module = create_generator("tint-lora")
    path = module.specialize(backbone, "blue thing", _supports(), tmp_path / "art", FAST)
    tensors, meta = load_tensors(path)
    save_tensors(path, {k: v for k, v in tensors.items() if not k.startswith(LORA_PREFIX)}, meta)
    with pytest.raises(TintError, match="without its LoRA weights"):
        module.generate(backbone, path, 1, tmp_path / "img", 0, {"progress": False})
