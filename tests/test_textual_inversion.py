"""Textual inversion: one trainable row, Eq. 1 on t >= t_min, diffusers-compatible files."""

from __future__ import annotations

import pytest
import torch

import tint.diffusion.textual_inversion as ti
from tint.diffusion.textual_inversion import (
    TextualInversionConfig,
    add_placeholder_token,
    install_token_embedding,
    load_textual_inversion_file,
    save_textual_inversion,
    textual_inversion,
)
from tint.errors import TintError
from tint.testing import build_tiny_backbone


@pytest.fixture
def backbone(tmp_path):
    torch.set_num_threads(1)
    return build_tiny_backbone(tmp_path / "tiny", seed=0)


def support_images(k: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    coarse = torch.rand(k, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")


def embedding_table(backbone) -> torch.Tensor:
    return backbone.text_encoder.get_input_embeddings().weight.detach().clone()


def test_only_the_new_row_changes(backbone):
    before = embedding_table(backbone)
    init_id = backbone.tokenizer.encode("object", add_special_tokens=False)[0]
    config = TextualInversionConfig(steps=5, lr=1e-2)
    result = textual_inversion(backbone, support_images(2), config, progress=False)
    after = embedding_table(backbone)
    assert after.shape[0] == before.shape[0] + 1 and result.token_id == before.shape[0]
    assert torch.equal(after[: before.shape[0]], before)  # bit-identical, every other row
    assert not torch.equal(after[result.token_id], before[init_id])  # it trained
    assert torch.equal(after[result.token_id], result.embedding)
    assert len(result.losses) == 5 and all(loss > 0 for loss in result.losses)
    prompt = backbone.tokenize(["a photo of an <tint-0>"])
    assert result.token_id in prompt[0].tolist()


@pytest.mark.parametrize("pixel_v", [False, True], ids=["eps-latent", "v-pixel"])
def test_loss_on_a_fixed_batch_goes_down(tmp_path, monkeypatch, pixel_v):
    """Train on one fixed batch (fixed t and noise): Eq. 1 (eps or v target) must decrease."""
    kind = {"pixel_space": True, "prediction_type": "v_prediction", "resolution": 16}
    backbone = build_tiny_backbone(tmp_path, **(kind if pixel_v else {}))
    image = support_images(1, side=backbone.resolution)
    z0 = backbone.encode_images(image).expand(4, -1, -1, -1)
    generator = torch.Generator().manual_seed(5)
    t = torch.randint(250, 1000, (4,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    monkeypatch.setattr(ti, "sample_training_timesteps", lambda *args: t)
    monkeypatch.setattr(ti, "sample_training_noise", lambda *args: noise)
    with torch.no_grad():
        initial = ti.denoising_loss(backbone, z0, t, noise, backbone.tokenize(["a photo of an object"]))
    config = TextualInversionConfig(steps=15, lr=1e-2, batch_size=4)
    result = textual_inversion(backbone, image, config, progress=False)
    with torch.no_grad():
        final = ti.denoising_loss(backbone, z0, t, noise, backbone.tokenize(["a photo of an <tint-0>"]))
    assert result.losses[0] == pytest.approx(float(initial), rel=1e-5)
    assert float(final) < float(initial)
    assert result.losses[-1] < result.losses[0]


def test_timesteps_never_below_t_min(backbone, monkeypatch):
    seen: list[torch.Tensor] = []
    original = ti.sample_training_timesteps

    def spy(generator, batch, t_min, t_max):
        t = original(generator, batch, t_min, t_max)
        seen.append(t)
        return t

    monkeypatch.setattr(ti, "sample_training_timesteps", spy)
    config = TextualInversionConfig(steps=6, batch_size=3, grad_accum=2, t_min=900, lr=1e-2)
    result = textual_inversion(backbone, support_images(2), config, progress=False)
    drawn = torch.cat(seen)
    assert len(seen) == 12 and drawn.numel() == 36  # steps x grad_accum batches of 3
    assert int(drawn.min()) >= 900 and int(drawn.max()) < 1000
    assert len(result.losses) == 6
    assert ti.sample_training_timesteps(torch.Generator().manual_seed(0), 10_000, 250, 1000).min() >= 250


def test_nan_loss_is_a_clear_error_and_nothing_changes(backbone, tmp_path):
    before = embedding_table(backbone)
    images = support_images(2)
    images[0, 0, 0, 0] = float("nan")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TintError, match="textual inversion: loss is nan at step 0"):
        textual_inversion(backbone, images, TextualInversionConfig(steps=3), progress=False)
    assert torch.equal(embedding_table(backbone)[: before.shape[0]], before)
    assert list(out.iterdir()) == []
    # a retry in the same process re-trains the same placeholder from the init word
    result = textual_inversion(backbone, support_images(2), TextualInversionConfig(steps=1),
                               progress=False)
    assert result.token_id == before.shape[0]
    assert embedding_table(backbone).shape[0] == before.shape[0] + 1


def test_bad_settings_are_clear_errors(backbone):
    with pytest.raises(TintError, match="t_min"):
        TextualInversionConfig(t_min=1000).validate(1000)
    with pytest.raises(TintError, match="single token"):
        add_placeholder_token(backbone, "<x>", init_word="photograph album")
    add_placeholder_token(backbone, "<tint-0>")
    with pytest.raises(TintError, match="already in the tokenizer"):
        add_placeholder_token(backbone, "<tint-0>")


def test_placeholder_works_with_a_bert_tokenizer(backbone):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tint.diffusion.model import DiffusionBackbone, IdentityAutoencoder
    from tint.diffusion.small_generator import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    tokenizer.model_max_length = 12
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=64),
                        add_pooling_layer=False).eval()
    bert = DiffusionBackbone(backbone.unet, backbone.scheduler, IdentityAutoencoder(), encoder,
                             tokenizer, resolution=8)
    table = embedding_table(bert)
    token_id = add_placeholder_token(bert, "<tint-0>", "object")
    object_id = tokenizer.convert_tokens_to_ids("object")
    assert torch.equal(embedding_table(bert)[token_id], table[object_id])
    assert token_id in bert.tokenize(["a photo of an <tint-0>"])[0].tolist()


def test_saved_file_loads_into_a_diffusers_pipeline(backbone, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = textual_inversion(backbone, support_images(2), TextualInversionConfig(steps=2),
                               progress=False)
    path = save_textual_inversion(tmp_path / "learned_embeds.safetensors", result.token,
                                  result.embedding)
    token, vector = load_textual_inversion_file(path)
    assert token == "<tint-0>" and torch.equal(vector, result.embedding)

    fresh = build_tiny_backbone(tmp_path / "fresh", seed=0)  # no placeholder yet
    pipe = StableDiffusionPipeline(
        vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
        unet=fresh.unet, scheduler=fresh.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_textual_inversion(str(path))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<tint-0>")
    loaded = pipe.text_encoder.get_input_embeddings().weight[token_id]
    assert torch.equal(loaded, result.embedding)

    # our own re-use path gives the same prompt encoding as the trained backbone
    other = build_tiny_backbone(tmp_path / "other", seed=0)
    install_token_embedding(other, token, vector)
    prompt = ["a photo of an <tint-0>"]
    assert torch.equal(other.encode_prompt(prompt), backbone.encode_prompt(prompt))


def test_textual_inversion_file_errors(tmp_path):
    from tint.io import save_tensors

    with pytest.raises(TintError, match="not found"):
        load_textual_inversion_file(tmp_path / "missing.safetensors")
    save_tensors(tmp_path / "two.safetensors", {"a": torch.zeros(3), "b": torch.zeros(3)})
    with pytest.raises(TintError, match="exactly one token"):
        load_textual_inversion_file(tmp_path / "two.safetensors")
