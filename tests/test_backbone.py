"""The diffusion backbone: tiny random builder, SD folder loading, dispatch by spec."""

from __future__ import annotations

import pytest
import torch

from tint.diffusion.backbone import (
    load_backbone,
    load_stable_diffusion,
    save_backbone,
)
from tint.diffusion.model import SD15_SCHEDULER_CONFIG, DiffusionBackbone, IdentityAutoencoder
from tint.errors import TintError
from tint.testing import build_tiny_backbone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> DiffusionBackbone:
    torch.set_num_threads(1)
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny"), seed=0)


def smooth_images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")


def test_tiny_backbone_shapes_and_calibrated_latents(tiny):
    assert tiny.prediction_type == "epsilon"
    assert tiny.num_train_timesteps == 1000
    assert tiny.latent_shape == (4, 8, 8)
    z = tiny.encode_images(smooth_images(8, 32, seed=3))
    assert z.shape == (8, 4, 8, 8)
    # scaling factor = 1/std of latents of random images: unit-scale latents for DDIM
    assert 0.5 < float(z.std()) < 2.0
    assert tiny.vae.config.scaling_factor == pytest.approx(tiny.latent_scale)
    x = tiny.decode_latents(z)
    assert x.shape == (8, 3, 32, 32) and x.min() >= 0 and x.max() <= 1


def test_tiny_tokenizer_knows_the_prompt_words(tiny):
    for word in "a photo of an object".split():
        assert len(tiny.tokenizer.encode(word, add_special_tokens=False)) == 1
    ids = tiny.tokenize(["a photo of an object", "a cat"])
    assert ids.shape == (2, tiny.text_length)
    hidden = tiny.encode_prompt(["a photo of an object", "a cat"])
    assert hidden.shape == (2, tiny.text_length, 32)
    assert not torch.allclose(hidden[0], hidden[1])


def test_sd15_scheduler_defaults(tiny):
    config = tiny.scheduler.config
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                "clip_sample", "set_alpha_to_one", "steps_offset"):
        assert config[key] == SD15_SCHEDULER_CONFIG[key]
    assert type(tiny.scheduler).__name__ == "DDIMScheduler"


def test_pixel_space_v_backbone_uses_identity_autoencoder(tmp_path):
    backbone = build_tiny_backbone(tmp_path, pixel_space=True, prediction_type="v_prediction",
                                   resolution=16)
    assert isinstance(backbone.vae, IdentityAutoencoder)
    assert backbone.prediction_type == "v_prediction"
    assert backbone.scheduler.config.timestep_spacing == "trailing"
    x = smooth_images(2, 16)
    z = backbone.encode_images(x)
    assert torch.allclose(z, 2 * x - 1)
    assert torch.allclose(backbone.decode_latents(z), x, atol=1e-6)


def test_encode_images_rejects_bad_shapes(tiny):
    with pytest.raises(TintError, match=r"\[B, 3, H, W\]"):
        tiny.encode_images(torch.rand(2, 1, 32, 32))
    with pytest.raises(TintError, match="multiple"):
        tiny.encode_images(torch.rand(1, 3, 30, 30))


def test_bert_text_encoder_works_through_the_same_path(tiny):
    """The text encoder is anything mapping ids to hidden states (MiniLM/BERT for ours)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tint.diffusion.small_generator import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    tokenizer.model_max_length = 12
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=64),
                        add_pooling_layer=False).eval()
    backbone = DiffusionBackbone(tiny.unet, tiny.scheduler, IdentityAutoencoder(), encoder,
                                 tokenizer, resolution=8)
    assert backbone.latent_scale == 1.0
    hidden = backbone.encode_prompt(["a photo of an object"])
    assert hidden.shape == (1, 12, 32)


def test_load_stable_diffusion_missing_folder(tmp_path):
    with pytest.raises(TintError, match="does not exist"):
        load_stable_diffusion(tmp_path / "no_such_model")


def test_load_stable_diffusion_folder_without_unet(tmp_path, tiny):
    folder = save_backbone(tiny, tmp_path / "sd")
    import shutil

    shutil.rmtree(folder / "unet")
    with pytest.raises(TintError, match="missing subfolder.*unet"):
        load_stable_diffusion(folder)


def test_saved_tiny_sd_folder_loads_back(tmp_path, tiny):
    folder = save_backbone(tiny, tmp_path / "sd")
    loaded = load_stable_diffusion(folder)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.resolution == tiny.resolution
    assert loaded.latent_scale == pytest.approx(tiny.latent_scale)
    for (name, a), b in zip(tiny.unet.state_dict().items(), loaded.unet.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    prompt = ["a photo of an object"]
    assert torch.equal(tiny.tokenize(prompt), loaded.tokenize(prompt))
    assert torch.allclose(tiny.encode_prompt(prompt), loaded.encode_prompt(prompt))
    x = smooth_images(1, 32)
    assert torch.allclose(tiny.encode_images(x), loaded.encode_images(x), atol=1e-5)


def test_load_backbone_dispatch(tmp_path, monkeypatch):
    backbone = load_backbone("tiny", workdir=tmp_path / "w")
    assert backbone.prediction_type == "epsilon" and not backbone.is_pixel_space
    pixel = load_backbone("tiny-pixel-v", workdir=tmp_path / "p", resolution=16)
    assert pixel.is_pixel_space and pixel.prediction_type == "v_prediction"

    import tint.diffusion.backbone as loaders

    seen = []
    monkeypatch.setattr(loaders, "load_small_generator", lambda path: seen.append(path) or backbone)
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "tint_generator.json").write_text("{}")
    assert load_backbone(str(folder)) is backbone
    assert seen and str(seen[0]) == str(folder)
    with pytest.raises(TintError):
        load_backbone(tmp_path / "nothing_here")


def test_uncached_hub_id_is_a_clear_error_offline():
    with pytest.raises(TintError, match="local cache"):
        load_stable_diffusion("nobody-tint-test/no-such-model", local_files_only=True)
