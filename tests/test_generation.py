"""TINT generation (Algorithm 2, Eq. 3-4), artifacts, manifest/resume and the CLI, tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tint.generators.base as generator_base
import tint.generators.tint as tint_gen
from tint.diffusion.ddim import ddim_invert, ddim_sample
from tint.errors import TintError
from tint.generators import create_generator
from tint.generators.base import (
    MANIFEST_NAME,
    completed_indices,
    image_relpath,
    install_token_embedding,
    read_manifest,
    save_tensors,
)
from tint.generators.tint import (
    GenerateSettings,
    blend_latents,
    draw_image,
    generate,
    load_tint_artifact,
    sample_images,
    save_tint_artifact,
    specialize,
)
from tint.io import load_tensors
from tint.testing import build_tiny_backbone

STEPS = 5
K = 3


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny"), seed=0)


def smooth_images(n: int, side: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")


def make_artifact(backbone, folder: Path, class_name: str = "cat", seed: int = 0,
                  z_T: torch.Tensor | None = None) -> Path:
    """An artifact like specialize writes, without TI/NTI (fast): z_T from DDIM inversion,
    per-step unconditional embeddings = the empty prompt plus per-support perturbations."""
    g = torch.Generator().manual_seed(seed)
    token = f"<tint-{class_name}>"
    object_id = backbone.tokenizer.convert_tokens_to_ids("object</w>")
    table = backbone.text_encoder.get_input_embeddings().weight
    embedding = table[object_id].detach().clone() + 0.1 * torch.randn(table.shape[1], generator=g)
    install_token_embedding(backbone, token, embedding)
    prompt = f"a photo of an {token}"
    cond = backbone.encode_prompt([prompt])
    if z_T is None:
        z0 = backbone.encode_images(smooth_images(K, backbone.resolution, seed))
        z_T = torch.cat([ddim_invert(backbone, z0[k:k + 1], cond, STEPS)[-1] for k in range(K)])
    empty = backbone.encode_prompt([""])
    uncond = empty.expand(K, STEPS, -1, -1) + 0.05 * torch.randn(K, STEPS, *empty.shape[1:],
                                                                 generator=g)
    return save_tint_artifact(folder / f"{class_name}.safetensors", backbone,
                              class_name=class_name, token=token, prompt=prompt,
                              embedding=embedding, z_T=z_T, uncond=uncond, guidance=7.5,
                              dataset_resolution=20, extra={"backbone": "tiny"})


@pytest.fixture(scope="module")
def artifact(backbone, tmp_path_factory):
    return make_artifact(backbone, tmp_path_factory.mktemp("art"))


def draws_for(artifact_path, backbone, indices, seed=0, **settings):
    art = load_tint_artifact(artifact_path)
    s = GenerateSettings(**settings)
    return [draw_image(seed, art.class_name, i, art.num_supports, backbone.latent_shape, s)
            for i in indices]


# --- Eq. 3-4 ----------------------------------------------------------------------------------


def test_blend_rescales_to_the_interpolated_norm():
    g = torch.Generator().manual_seed(0)
    z_T = 0.5 * torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    alpha = torch.tensor([0.0, 0.25, 0.7, 1.0])
    out = blend_latents(z_T, noise, alpha)
    want = (1 - alpha) * z_T.flatten(1).norm(dim=1) + alpha * noise.flatten(1).norm(dim=1)
    assert torch.allclose(out.flatten(1).norm(dim=1), want, rtol=1e-6)
    assert torch.equal(out[0], z_T[0]) and torch.equal(out[3], noise[3])
    blended = (1 - alpha[1]) * z_T[1] + alpha[1] * noise[1]  # direction of Eq. 3 is kept
    cosine = torch.nn.functional.cosine_similarity(out[1].flatten(), blended.flatten(), dim=0)
    assert cosine > 1 - 1e-6
    assert blended.norm() < want[1] - 1e-3  # plain Eq. 3 alone would lose norm
    with pytest.raises(TintError, match="alpha"):
        blend_latents(z_T, noise, 1.5)


# --- Algorithm 2 --------------------------------------------------------------------------------


def test_alpha_zero_reproduces_the_nti_reconstruction(backbone, artifact):
    art = load_tint_artifact(artifact)
    draws = draws_for(artifact, backbone, range(4), alpha=0.0)
    images = sample_images(backbone, art, draws)
    cond = backbone.encode_prompt([art.prompt])
    for draw, image in zip(draws, images, strict=True):
        z0 = ddim_sample(backbone, art.z_T[draw.k:draw.k + 1], cond,
                         art.uncond[draw.k].unsqueeze(1), 7.5, STEPS)
        assert torch.allclose(image, backbone.decode_latents(z0)[0], atol=1e-5)


def test_alpha_one_does_not_depend_on_z_T(backbone, tmp_path):
    first = make_artifact(backbone, tmp_path / "a", seed=0)
    other_z = 3.0 * torch.randn(K, *backbone.latent_shape)
    second = make_artifact(backbone, tmp_path / "b", seed=0, z_T=other_z)
    assert not torch.equal(load_tint_artifact(first).z_T, load_tint_artifact(second).z_T)
    draws = draws_for(first, backbone, range(3), alpha=1.0)
    a = sample_images(backbone, load_tint_artifact(first), draws)
    b = sample_images(backbone, load_tint_artifact(second), draws)
    assert torch.equal(a, b)
    half = draws_for(first, backbone, range(3), alpha=0.5)  # ... while alpha < 1 does
    assert not torch.allclose(sample_images(backbone, load_tint_artifact(first), half),
                              sample_images(backbone, load_tint_artifact(second), half))


def test_batched_equals_one_at_a_time(backbone, artifact, tmp_path):
    art = load_tint_artifact(artifact)
    draws = draws_for(artifact, backbone, range(5), alpha_range=(0.2, 0.9))
    assert len({d.k for d in draws}) > 1  # the batch mixes supports (per-sample u_t,k)
    batched = sample_images(backbone, art, draws)
    single = torch.cat([sample_images(backbone, art, [d]) for d in draws])
    assert torch.allclose(batched, single, atol=1e-4)
    generate(backbone, artifact, 5, tmp_path / "b4", seed=1, settings={"batch_size": 4,
                                                                       "progress": False})
    generate(backbone, artifact, 5, tmp_path / "b1", seed=1, settings={"batch_size": 1,
                                                                       "progress": False})
    for i in range(5):
        a = _png(tmp_path / "b4" / image_relpath("cat", i))
        b = _png(tmp_path / "b1" / image_relpath("cat", i))
        assert (a - b).abs().max() <= 1  # 8-bit rounding at most


def _png(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.int16))


def test_seeds_images_and_manifest(backbone, artifact, tmp_path):
    settings = {"alpha_range": (0.0, 1.0), "batch_size": 3, "progress": False}
    paths = generate(backbone, artifact, 4, tmp_path / "s0", seed=0, settings=settings)
    again = generate(backbone, artifact, 4, tmp_path / "s0b", seed=0, settings=settings)
    other = generate(backbone, artifact, 4, tmp_path / "s1", seed=1, settings=settings)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(paths, other, strict=True))
    from PIL import Image

    assert Image.open(paths[0]).size == (20, 20)  # the dataset resolution, not the model's
    rows = read_manifest(tmp_path / "s0")
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    for row in rows:
        assert row["class"] == "cat" and 0 <= row["k"] < K and 0.0 <= row["alpha"] <= 1.0
        assert row["seed"] == 0 and (tmp_path / "s0" / row["file"]).is_file()
    assert len({r["alpha"] for r in rows}) == 4  # random alpha per image


def test_resume_makes_exactly_the_missing_images(backbone, artifact, tmp_path, monkeypatch):
    out = tmp_path / "gen"
    settings = {"batch_size": 2, "progress": False}
    first = generate(backbone, artifact, 6, out, seed=0, settings=settings)
    reference = {p.name: p.read_bytes() for p in first}
    manifest = out / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:3]) + "\n" + lines[3][:17])  # killed mid-append
    (out / image_relpath("cat", 5)).unlink()

    made: list[int] = []
    real = tint_gen.sample_latents

    def spy(backbone, artifact, draws, cond, guidance):
        made.extend(d.index for d in draws)
        return real(backbone, artifact, draws, cond, guidance)

    monkeypatch.setattr(tint_gen, "sample_latents", spy)
    again = generate(backbone, artifact, 6, out, seed=0, settings=settings)
    assert sorted(made) == [3, 4, 5]
    assert {p.name: p.read_bytes() for p in again} == reference
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[:3]]
    assert len(rows) == 3
    assert len(read_manifest(out)) == 6
    assert completed_indices(out, "cat") == set(range(6))
    made.clear()
    generate(backbone, artifact, 6, out, seed=0, settings=settings)
    assert made == []


def test_kill_mid_batch_leaves_nothing_half_written(backbone, artifact, tmp_path, monkeypatch):
    out = tmp_path / "gen"
    calls = {"n": 0}
    real = generator_base.write_image

    def dying_write(path, x01):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the process is killed while writing image 3
        return real(path, x01)

    monkeypatch.setattr(generator_base, "write_image", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generate(backbone, artifact, 6, out, seed=0, settings={"batch_size": 2, "progress": False})
    assert completed_indices(out, "cat") == {0, 1}
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(generator_base, "write_image", real)
    paths = generate(backbone, artifact, 6, out, seed=0, settings={"batch_size": 2,
                                                                   "progress": False})
    assert len(paths) == 6 and len(read_manifest(out)) == 6


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("support, match", [
    (torch.zeros(0, 3, 20, 20), "no support images"),
    (torch.rand(2, 1, 20, 20), "channels"),
    (torch.rand(2, 4, 20, 20), "channels"),
    ((torch.rand(2, 3, 20, 20) * 255).to(torch.uint8), "float32"),
    (torch.rand(2, 3, 24, 24), "resolution is 20"),
    (torch.rand(2, 3, 20, 16), "square"),
    (torch.full((2, 3, 20, 20), float("nan")), "finite"),
])
def test_bad_support_is_refused_before_any_work(backbone, tmp_path, support, match):
    with pytest.raises(TintError, match=match):
        specialize(backbone, "cat", support, tmp_path, {"dataset_resolution": 20})
    assert list(tmp_path.iterdir()) == []


def test_nan_artifact_is_refused_and_nothing_written(backbone, artifact, tmp_path):
    tensors, meta = load_tensors(artifact)
    tensors["uncond"][0, 1, 2, 3] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, tensors, meta)
    with pytest.raises(TintError, match="NaN"):
        generate(backbone, bad, 3, tmp_path / "out", settings={"progress": False})
    assert not (tmp_path / "out").exists()
    with pytest.raises(TintError, match="NaN"):
        tint_gen.save_tint_artifact(tmp_path / "x.safetensors", backbone, class_name="x",
                                    token="<x>", prompt="a photo of an <x>",
                                    embedding=torch.full((32,), float("nan")),
                                    z_T=tensors["z_T"], uncond=tensors["uncond"], guidance=7.5,
                                    dataset_resolution=20)
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_generate_settings(backbone, artifact, tmp_path):
    for settings, match in [({"alpha": 1.5}, "alpha"), ({"alpha_range": (0.8, 0.2)}, "alpha_range"),
                            ({"batch_size": 0}, "batch_size"), ({"nope": 1}, "unknown")]:
        with pytest.raises(TintError, match=match):
            generate(backbone, artifact, 2, tmp_path, settings=settings)
    with pytest.raises(TintError, match="generator"):
        create_generator("no-such-generator")


# --- Algorithm 1 end to end -------------------------------------------------------------------

FAST = {"ti_steps": 3, "num_steps": STEPS, "nti_inner_steps": 10, "nti_lr": 0.1,
        "nti_schedule": "constant", "dataset_resolution": 20, "progress": False}


def test_specialize_writes_artifact_and_alpha_zero_reconstructs(backbone, tmp_path):
    from tint.diffusion.textual_inversion import load_textual_inversion_file

    support = smooth_images(2, 20, seed=5)
    path = specialize(backbone, "dog house", support, tmp_path, FAST)
    assert path.name == "dog_house-" + path.name.split("-")[1]  # sanitised, kept distinct
    art = load_tint_artifact(path)
    meta = art.meta
    assert meta["settings"]["ti_steps"] == 3 and meta["settings"]["nti_lr"] == 0.1
    assert meta["class"] == "dog house" and meta["support_count"] == 2
    assert meta["bridge"] == [32] and meta["dataset_resolution"] == 20
    assert art.uncond.shape == (2, STEPS, backbone.text_length, 32)
    token, vector = load_textual_inversion_file(path.with_suffix(".ti.safetensors"))
    assert token == art.token and torch.equal(vector, art.embedding)

    # alpha = 0 starts from z_T,k and uses u_t,k: it lands on the support's latent far more
    # closely than the same CFG sampling with the plain empty-prompt embedding.
    draws = draws_for(path, backbone, range(4), alpha=0.0)
    cond = tint_gen.prepare_backbone(backbone, art)
    latents = tint_gen.sample_latents(backbone, art, draws, cond, 7.5)
    z0 = backbone.encode_images(load_tensors(path)[0]["support"])
    empty = backbone.encode_prompt([""])
    for draw, latent in zip(draws, latents, strict=True):
        plain = ddim_sample(backbone, art.z_T[draw.k:draw.k + 1], cond, empty, 7.5, STEPS)
        nti_error = torch.mean((latent - z0[draw.k]) ** 2)
        plain_error = torch.mean((plain[0] - z0[draw.k]) ** 2)
        assert nti_error * 10 < plain_error


def test_cli_specialize_then_generate(tmp_path, capsys):
    from PIL import Image

    from tint.cli import main

    root = tmp_path / "data"
    for c, name in enumerate(["apple", "boat"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            colour = (200 * c + 20 * i, 80, 255 - 40 * i)
            Image.new("RGB", (30, 30), colour).save(root / name / f"{i}.png")
    art, gen = tmp_path / "artifacts", tmp_path / "images"
    specialize_args = ["specialize", "--backbone", "tiny", "--dataset", f"folder:{root}",
                       "--resolution", "24", "--n-way", "2", "--k-shot", "2", "--ti-steps", "2",
                       "--num-steps", "4", "--nti-inner-steps", "2", "--out", str(art),
                       "--threads", "1"]
    assert main(specialize_args) == 0
    assert sorted(p.name for p in art.glob("*.safetensors")) == [
        "apple.safetensors", "apple.ti.safetensors", "boat.safetensors", "boat.ti.safetensors"]
    generate_args = ["generate", "--artifacts", str(art), "--n-per-class", "3", "--batch-size",
                     "2", "--alpha-range", "0.5", "1.0", "--out", str(gen), "--threads", "1"]
    assert main(generate_args) == 0
    rows = read_manifest(gen)
    assert sorted((r["class"], r["index"]) for r in rows) == [
        ("apple", 0), ("apple", 1), ("apple", 2), ("boat", 0), ("boat", 1), ("boat", 2)]
    assert all(Image.open(gen / r["file"]).size == (24, 24) for r in rows)
    before = {r["file"]: (gen / r["file"]).stat().st_mtime_ns for r in rows}
    capsys.readouterr()
    assert main(specialize_args) == 0  # resumed: nothing to do
    assert "2 of 2 classes already done" in capsys.readouterr().out
    assert main(generate_args) == 0
    assert {r["file"]: (gen / r["file"]).stat().st_mtime_ns for r in read_manifest(gen)} == before
    changed = specialize_args[:-4] + ["--ti-steps", "3", "--out", str(art)]
    assert main(changed) == 2  # other settings on the same folder: refused, not overwritten
    assert "other settings" in capsys.readouterr().err

    from tint.data.episodes import Episode, save_episodes

    used = json.loads((art / "specialize.json").read_text())["supports"]
    other = Episode(classes=["apple", "boat"], support=[used["apple"][::-1], used["boat"]],
                    query=[[], []])
    save_episodes(tmp_path / "episodes.json", [other], {"dataset": f"folder:{root}",
                                                       "resolution": 24})
    from_file = ["specialize", "--backbone", "tiny", "--episodes", str(tmp_path / "episodes.json"),
                 "--episode", "0"] + specialize_args[7:]
    assert main(from_file) == 2  # another episode's supports: refused, not reused
    assert "support images" in capsys.readouterr().err


def test_resume_refuses_to_mix_seeds_or_alphas(backbone, artifact, tmp_path):
    out = tmp_path / "gen"
    generate(backbone, artifact, 2, out, seed=0, settings={"progress": False})
    for seed, settings in [(1, {}), (0, {"alpha": 0.5})]:
        with pytest.raises(TintError, match="another output folder"):
            generate(backbone, artifact, 3, out, seed=seed, settings={**settings, "progress": False})
    assert len(read_manifest(out)) == 2
