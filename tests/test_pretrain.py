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
from tint.errors import TintError

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
    from tint.diffusion.model import DiffusionBackbone

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
    """Random weights, output layer scaled by 0.1 (ADM zero-initialises it): a random UNet at
    full output scale is far rougher than a trained one, and DDIM inversion then does not
    round-trip even without guidance (the same choice as build_tiny_backbone)."""
    encoder, tokenizer = tiny_text
    backbone = sg.build_small_generator("tiny", resolution=16, text_encoder=encoder,
                                        tokenizer=tokenizer)
    with torch.no_grad():
        backbone.unet.conv_out.weight.mul_(0.1)
        backbone.unet.conv_out.bias.mul_(0.1)
    return backbone


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


def test_training_steps_lower_the_loss(tmp_path: Path, tiny_pool) -> None:
    images, labels, table, empty = tiny_pool
    cfg = _tiny_config()
    before_unet = pretrain.sg.build_unet("tiny", 16)
    text = table[torch.from_numpy(labels)]
    before = _fixed_loss(before_unet, images, text)
    unet, ema, state = pretrain.train(tmp_path, cfg, images, labels, table, empty,
                                      max_steps=40, progress=False)
    assert state.step == 40
    assert _fixed_loss(unet, images, text) < 0.7 * before
    assert (tmp_path / pretrain.CHECKPOINT).is_file()


@pytest.fixture()
def tiny_pool(tiny_text, monkeypatch):
    """(images, labels, caption table, empty caption) of a fake pool, with build_unet
    patched to the tiny text encoder's width: what each training test starts from."""
    monkeypatch.setattr(pretrain.sg, "build_unet", _tiny_unet_for(tiny_text))
    images, labels = _fake_pool()
    table, empty = _text_tables(tiny_text, 3)
    return images, labels, table, empty


def _tiny_unet_for(tiny_text):
    """build_unet with the tiny text encoder's width (32) instead of MiniLM's 384."""
    original = sg.build_unet
    width = int(tiny_text[0].config.hidden_size)

    def build(size="tiny", resolution=16, cross_attention_dim=width):
        return original(size, resolution, cross_attention_dim=width)

    return build


def test_checkpoint_round_trips_bit_exactly_and_resumes(tmp_path: Path, tiny_pool) -> None:
    images, labels, table, empty = tiny_pool
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
    assert json.loads((half / sg.MARKER_FILE).read_text())["weights_dtype"] == "float16"
    stored, _ = pretrain.load_tensors(half / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    loaded16 = UNet2DConditionModel.from_pretrained(str(half / "unet"))
    assert next(loaded16.parameters()).dtype == torch.float32  # loading upcasts
    for k, v in ema.state_dict().items():
        assert torch.equal(loaded16.state_dict()[k], v.half().float())


def test_resume_equals_uninterrupted_training(tmp_path: Path, tiny_pool) -> None:
    images, labels, table, empty = tiny_pool
    cfg = _tiny_config(steps=10)
    straight, _, _ = pretrain.train(tmp_path / "s", cfg, images, labels, table, empty,
                                    max_steps=4, progress=False)
    pretrain.train(tmp_path / "r", cfg, images, labels, table, empty, max_steps=2, progress=False)
    resumed, _, _ = pretrain.train(tmp_path / "r", cfg, images, labels, table, empty,
                                   max_steps=4, progress=False)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_warm_start_continues_from_an_exported_generator(tmp_path: Path, tiny_pool) -> None:
    images, labels, table, empty = tiny_pool
    cfg = _tiny_config(steps=10)
    _, ema, _ = pretrain.train(tmp_path / "a", cfg, images, labels, table, empty,
                               max_steps=3, progress=False)
    exported = sg.save_small_generator(tmp_path / "gen", ema, resolution=16, size="tiny",
                                       dtype=torch.float16)
    # zero steps: the new run's model and EMA are exactly the exported (fp16) weights
    unet, ema2, state = pretrain.train(tmp_path / "b", cfg, images, labels, table, empty,
                                       max_steps=0, deadline=0.0, progress=False,
                                       init_from=exported)
    assert state.step == 0
    for k, v in ema.state_dict().items():
        assert torch.equal(unet.state_dict()[k], v.half().float()), k
        assert torch.equal(ema2.state_dict()[k], v.half().float()), k
    with pytest.raises(TintError, match="--init-from"):
        pretrain.train(tmp_path / "c", cfg, images, labels, table, empty, max_steps=1,
                       progress=False, init_from=tmp_path / "missing")


# --------------------------------------------------------------------------------------
# the text encoder: real MiniLM offline, frozen
def test_real_minilm_loads_offline_and_stays_frozen(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder, tokenizer = sg.load_text_encoder()
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    states = sg.encode_text(encoder, tokenizer, ["a photo of a fruit", ""])
    assert states.shape == (2, sg.PROMPT_LENGTH, sg.TEXT_DIM)
    assert not states.requires_grad
    assert not torch.allclose(states[0], states[1])  # the caption matters
    for k, v in encoder.state_dict().items():
        assert torch.equal(before[k], v)


def test_training_never_touches_the_text_encoder(tmp_path: Path, tiny_text, monkeypatch) -> None:
    """Captions are encoded once, without grad; training then sees only fixed tensors."""
    monkeypatch.setattr(pretrain.sg, "build_unet", _tiny_unet_for(tiny_text))
    encoder = sg.freeze(tiny_text[0])
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    images, labels = _fake_pool()
    table, empty = _text_tables(tiny_text, 3)
    assert not table.requires_grad and not empty.requires_grad
    pretrain.train(tmp_path, _tiny_config(), images, labels, table, empty, max_steps=2,
                   progress=False)
    assert all(p.grad is None for p in encoder.parameters())
    for k, v in encoder.state_dict().items():
        assert torch.equal(before[k], v)


# --------------------------------------------------------------------------------------
# the pool: no val/novel image ever enters pretraining
def _is_held_out(category: str, held: set[str], base: set[str]) -> bool:
    if category in base:
        return False
    return any(category == h or category.startswith(h + ".") for h in held)


def test_pool_excludes_every_val_and_novel_image(tmp_path: Path) -> None:
    from tint.data.openclipart import load_split, scan_openclipart

    split = load_split()
    held, base = set(split["val"]) | set(split["novel"]), set(split["base"])
    pool = pretrain.build_pool_files(include_abstract=True)
    pool_paths = {p for files in pool.values() for p in files}
    held_paths = {p for c, files in scan_openclipart().items() if _is_held_out(c, held, base)
                  for p in files}
    assert held_paths and not pool_paths & held_paths
    assert not held & set(pool)
    assert set(split["base"]) <= set(pool)  # base classes are in, small categories too
    assert any(len(files) < 20 for files in pool.values())
    # the run folder records exactly what was loaded: a few files per category, checked
    few = {c: files[:2] for c, files in list(pool.items())[:3]}
    images, labels, categories = pretrain.load_pool(tmp_path, 16, few)
    record = json.loads((tmp_path / pretrain.POOL_FILES).read_text())
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    assert record["digest"] == pretrain.files_digest([tuple(e) for e in record["files"]])
    assert set(record["held_out_classes"]) == held
    assert not {p for _, p in record["files"]} & held_paths


def test_embedded_generator_was_trained_on_this_pool() -> None:
    """The committed checkpoint names the SHA-256 of the file list it was trained on; it
    must be the pool above (which excludes every val/novel image)."""
    marker = json.loads((sg.EMBEDDED_DIR / sg.MARKER_FILE).read_text())
    pool = pretrain.build_pool_files(include_abstract=marker["config"]["include_abstract"])
    entries = [(c, f) for c, files in pool.items() for f in files]
    assert marker["data_digest"] == pretrain.files_digest(entries)


def test_abstract_images_get_their_share_of_draws() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    weights = pretrain.sampling_weights(labels, ["shapes.stars", "food.fruit"], 0.35)
    assert float(weights[:90].sum()) == pytest.approx(0.35)
    assert float(weights[90:].sum()) == pytest.approx(0.65)


# --------------------------------------------------------------------------------------
# TINT (textual inversion + null-text inversion) runs on this architecture
def test_textual_inversion_runs_on_the_small_generator(tiny_backbone) -> None:
    from tint.diffusion.textual_inversion import TextualInversionConfig, textual_inversion

    table_before = tiny_backbone.text_encoder.get_input_embeddings().weight.detach().clone()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = textual_inversion(tiny_backbone, images, TextualInversionConfig(steps=4, lr=1e-2),
                               progress=False)
    assert result.embedding.shape == (32,)
    assert all(np.isfinite(result.losses))
    table = tiny_backbone.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[: table_before.shape[0]], table_before)  # only the new row
    assert not torch.allclose(table[result.token_id], table_before[tiny_backbone.tokenizer.convert_tokens_to_ids("object")])


def test_null_text_inversion_beats_plain_inversion_under_cfg(tiny_backbone) -> None:
    from tint.diffusion.ddim import ddim_invert, ddim_sample
    from tint.diffusion.null_text import NullTextConfig, null_text_inversion

    steps = 10
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    image = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear")
    z0 = tiny_backbone.encode_images(image)
    cond = tiny_backbone.encode_prompt(["a photo of an object"])
    uncond = tiny_backbone.encode_prompt([""])
    config = NullTextConfig(num_steps=steps, guidance=7.5, inner_steps=10, lr=0.1,
                            schedule="constant")
    result = null_text_inversion(tiny_backbone, z0, cond, uncond, config)
    trajectory = ddim_invert(tiny_backbone, z0, cond, num_steps=steps)
    plain = ddim_sample(tiny_backbone, trajectory[-1], cond, uncond, guidance=7.5, num_steps=steps)
    nti = ddim_sample(tiny_backbone, result.z_T, cond, result.uncond_embeddings[:, None],
                      guidance=7.5, num_steps=steps)
    err_plain = float(((plain - z0) ** 2).mean())
    err_nti = float(((nti - z0) ** 2).mean())
    assert err_nti * 100 <= err_plain, (err_nti, err_plain)


# --------------------------------------------------------------------------------------
# the command end to end: pool -> training -> export -> loss curve -> grid -> loader
def test_pretrain_command_end_to_end(tmp_path: Path, tiny_text, monkeypatch) -> None:
    from tint.cli import main
    from tint.data.openclipart import pretraining_pool

    few = {c: files[:3] for c, files in sorted(pretraining_pool().items())[:2]}
    monkeypatch.setattr(pretrain, "build_pool_files", lambda include_abstract=True: few)
    monkeypatch.setattr(pretrain.sg, "load_text_encoder",
                        lambda prompt_length=8: (sg.freeze(tiny_text[0]), tiny_text[1]))
    monkeypatch.setattr(pretrain.sg, "build_unet", _tiny_unet_for(tiny_text))
    out, export = tmp_path / "run", tmp_path / "export"
    argv = ["pretrain-generator", "--out", str(out), "--size", "tiny", "--resolution", "16",
            "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "1", "--export",
            str(export), "--grid-per-class", "2", "--grid-steps", "2"]
    assert main(argv) == 0
    for name in ("checkpoint.safetensors", "loss_curve.png", "samples.png", "pool_files.json",
                 "summary.json", "generator/tint_generator.json"):
        assert (out / name).is_file(), name
    marker = json.loads((export / sg.MARKER_FILE).read_text())
    assert marker["text_encoder"] == sg.TEXT_ENCODER_PACKAGE and marker["resolution"] == 16
    assert marker["steps"] == 3 and marker["data_digest"]
    provenance = (export / "PROVENANCE.md").read_text()
    assert marker["data_digest"] in provenance and "tint pretrain-generator" in provenance
    assert (export / "loss_curve.png").is_file()
    # resume once more without the openclipart files and without the text encoder (as on a
    # GPU machine): the pool and the caption states come from the run folder's caches
    monkeypatch.setattr(pretrain, "build_pool_files", None)
    load_encoder = pretrain.sg.load_text_encoder

    def no_encoder(*args, **kwargs):
        raise AssertionError("the text encoder was loaded despite captions.safetensors")

    monkeypatch.setattr(pretrain.sg, "load_text_encoder", no_encoder)
    assert (out / pretrain.CAPTIONS).is_file()
    assert main([*argv[:-4], "--max-steps", "4", "--pool-from-cache", "--no-grid"]) == 0
    monkeypatch.setattr(pretrain.sg, "load_text_encoder", load_encoder)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    parts = sg.load_small_generator_parts(export)  # (real MiniLM: the marker names it)
    assert next(parts["unet"].parameters()).dtype == torch.float32
    assert parts["scheduler"].config.prediction_type == "v_prediction"


def test_embedded_generator_loads_and_samples() -> None:
    from tint.diffusion.backbone import load_backbone

    backbone = load_backbone("tint-clipart")
    assert backbone.resolution == 32 and backbone.latent_shape == (12, 16, 16)
    assert next(backbone.unet.parameters()).dtype == torch.float32
    assert sum(f.stat().st_size for f in sg.EMBEDDED_DIR.rglob("*.safetensors")) <= 25e6
    images = pretrain.sample_images(backbone, ["a photo of a fruit", ""], seed=0, guidance=4.0,
                                    steps=2)
    assert images.shape == (2, 3, 32, 32) and bool(torch.isfinite(images).all())
