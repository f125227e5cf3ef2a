"""Generators beside TINT: none, plain TI, DA-Fusion, real-data mining, NAO's interface."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tint.data.images import load_image, to_tensor
from tint.diffusion.bridge import ResolutionBridge
from tint.errors import TintError
from tint.generators import create_generator
from tint.generators.base import MANIFEST_NAME, artifact_path, read_manifest
from tint.generators.plain_ti import table3_variants
from tint.io import load_tensors
from tint.testing import build_tiny_backbone

torch.set_num_threads(1)

RES = 24  # dataset resolution (the tiny backbone works at 32)
FAST_TI = {"ti_steps": 2, "num_steps": 4, "dataset_resolution": RES}


def _supports(colour: tuple[float, float, float], k: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(colour).view(1, 3, 1, 1).expand(k, 3, RES, RES)
    return (base + 0.1 * torch.randn(k, 3, RES, RES, generator=g)).clamp(0, 1)


CLASSES = {"red thing": (0.9, 0.1, 0.1), "blue.thing": (0.1, 0.2, 0.9)}


@pytest.fixture(scope="module")
def latent_backbone(tmp_path_factory):
    return build_tiny_backbone(tmp_path_factory.mktemp("latent"), seed=0)


@pytest.fixture(scope="module")
def pixel_backbone(tmp_path_factory):
    return build_tiny_backbone(tmp_path_factory.mktemp("pixel"), seed=0, pixel_space=True)


def _read(path) -> torch.Tensor:
    return to_tensor(load_image(path, None))[0]


def _check_images(paths, n, class_name, out):
    assert len(paths) == n
    for path in paths:
        with Image.open(path) as img:
            assert img.size == (RES, RES) and img.mode == "RGB"
    rows = [r for r in read_manifest(out) if r["class"] == class_name]
    assert sorted(r["index"] for r in rows) == list(range(n))


def test_registry_knows_every_baseline_and_table3_variant():
    for name in ("none", "plain-ti", "da-fusion", "real-mining", "nao"):
        module = create_generator(name)
        assert module.NAME == name
        assert callable(module.specialize) and callable(module.generate)
        module.SpecializeSettings(), module.GenerateSettings()
    for label, (generator, overrides) in table3_variants().items():
        settings_cls = create_generator(generator).SpecializeSettings
        assert set(overrides) <= set(settings_cls.__dataclass_fields__), label


def test_none_writes_no_images_and_an_empty_manifest(tmp_path):
    gen = create_generator("none")
    art = gen.specialize(None, "red thing", _supports(CLASSES["red thing"]), tmp_path / "a",
                         {"dataset_resolution": RES})
    assert art == artifact_path(tmp_path / "a", "red thing") and art.is_file()
    assert gen.generate(None, art, 100, tmp_path / "img") == []
    assert (tmp_path / "img" / MANIFEST_NAME).read_text() == ""
    assert not [p for p in (tmp_path / "img").rglob("*.png")]
    with pytest.raises(TintError):
        gen.specialize(None, "x", torch.rand(2, 3, 16, 16), tmp_path / "a", {"dataset_resolution": RES})


def test_plain_ti_images_per_class_resumable_and_batch_independent(latent_backbone, tmp_path):
    gen = create_generator("plain-ti")
    arts = [gen.specialize(latent_backbone, name, _supports(c, seed=i), tmp_path / "art", FAST_TI)
            for i, (name, c) in enumerate(CLASSES.items())]
    _, meta = load_tensors(arts[0])
    assert meta["generator"] == "plain-ti"
    assert meta["settings"]["ti_t_min"] == 0 and meta["bridge"] == [32]
    out = tmp_path / "img"
    for art, name in zip(arts, CLASSES, strict=True):
        paths = gen.generate(latent_backbone, art, 3, out, seed=1, settings={"batch_size": 2})
        _check_images(paths, 3, name, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    gen.generate(latent_backbone, arts[0], 3, out, seed=1)  # all done: no work
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    # each image has its own RNG: batch size never changes it
    one_by_one = gen.generate(latent_backbone, arts[0], 3, tmp_path / "img1", seed=1,
                              settings={"batch_size": 1})
    first = sorted(p for p in out.rglob("*.png") if p.parent.name.startswith("red"))
    for a, b in zip(first, one_by_one, strict=True):
        assert (_read(a) - _read(b)).abs().max() <= 2 / 255  # batched convs: float round-off


def test_da_fusion_strength_zero_returns_the_support(pixel_backbone, tmp_path):
    gen = create_generator("da-fusion")
    supports = torch.stack([_supports(CLASSES["red thing"], 1)[0], _supports(CLASSES["blue.thing"], 1)[0]])
    art = gen.specialize(pixel_backbone, "mixed", supports, tmp_path / "art", FAST_TI)
    out = tmp_path / "s0"
    paths = gen.generate(pixel_backbone, art, 4, out, settings={"strength": 0.0})
    _check_images(paths, 4, "mixed", out)
    rows = sorted(read_manifest(out), key=lambda r: r["index"])
    # strength 0 = the support after the bridge's round trip (24 -> 32 -> 24) and 8-bit PNG
    round_trip = ResolutionBridge.to_dataset(ResolutionBridge(32).to_model(supports), RES)
    for path, row in zip(paths, rows, strict=True):
        image = _read(path)
        assert (image - round_trip[row["k"]]).abs().max() < 3 / 255
        assert (image - round_trip[1 - row["k"]]).abs().mean() > 0.3
    noisy = gen.generate(pixel_backbone, art, 2, tmp_path / "s1", settings={"strength": 1.0})
    _check_images(noisy, 2, "mixed", tmp_path / "s1")


def test_da_fusion_random_strength_and_shared_ti_artifact(latent_backbone, tmp_path):
    plain = create_generator("plain-ti")
    art = plain.specialize(latent_backbone, "red thing", _supports(CLASSES["red thing"]),
                           tmp_path / "art", FAST_TI)
    gen = create_generator("da-fusion")  # reads the plain-ti artifact: one TI serves both
    out = tmp_path / "img"
    paths = gen.generate(latent_backbone, art, 5, out, seed=3,
                         settings={"strength_range": [0.25, 0.75], "batch_size": 5})
    _check_images(paths, 5, "red thing", out)
    strengths = [r["strength"] for r in read_manifest(out)]
    assert all(0.25 <= s <= 0.75 for s in strengths) and len(set(strengths)) == 5
    with pytest.raises(TintError, match="strength"):
        gen.generate(latent_backbone, art, 1, out, settings={"strength": 1.5})


def _write_pool(folder, n_each=4):
    for j, (name, colour) in enumerate((("reds", (0.9, 0.1, 0.1)), ("blues", (0.1, 0.2, 0.9)))):
        (folder / name).mkdir(parents=True)
        for i, img in enumerate(_supports(colour, n_each, seed=10 + j)):
            array = (img.permute(1, 2, 0).numpy() * 255).astype("uint8")
            Image.fromarray(array).resize((40, 40)).save(folder / name / f"{i}.png")


def test_real_mining_ranks_the_pool_by_image_features(tmp_path):
    _write_pool(tmp_path / "pool")
    gen = create_generator("real-mining")
    art = gen.specialize(None, "red thing", _supports(CLASSES["red thing"]), tmp_path / "art",
                         {"dataset_resolution": RES})
    out = tmp_path / "img"
    settings = {"pool": str(tmp_path / "pool"), "threshold": -1.0, "max_per_class": 6,
                "progress": False}
    paths = gen.generate(None, art, 100, out, settings=settings)
    _check_images(paths, 6, "red thing", out)  # capped by max_per_class
    rows = sorted(read_manifest(out), key=lambda r: r["index"])
    assert all("/reds/" in r["source"] for r in rows[:4])  # the red pool images rank first
    sims = [r["similarity"] for r in rows]
    assert sims == sorted(sims, reverse=True)
    assert list((out / ".pool-features").glob("*.safetensors"))  # features cached
    # a threshold between the two groups keeps only the red images
    cut = (sims[3] + sims[4]) / 2
    strict = gen.generate(None, art, 100, tmp_path / "img2", settings={**settings, "threshold": cut})
    assert len(strict) == 4


def test_real_mining_with_a_local_clip_model(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from tint.testing import write_tiny_clip_tokenizer

    folder = tmp_path / "clip"
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(tmp_path / "tok")))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_pool(tmp_path / "pool", n_each=2)
    gen = create_generator("real-mining")
    art = gen.specialize(None, "red thing", _supports(CLASSES["red thing"]), tmp_path / "art",
                         {"clip_model": str(folder), "dataset_resolution": RES})
    paths = gen.generate(None, art, 3, tmp_path / "img",
                         settings={"pool": str(tmp_path / "pool"), "threshold": -1.0, "progress": False})
    _check_images(paths, 3, "red thing", tmp_path / "img")
    assert {r["similarity_kind"] for r in read_manifest(tmp_path / "img")} == {"clip-text-image-cosine"}


def test_nao_explains_what_it_needs(tmp_path):
    gen = create_generator("nao")
    with pytest.raises(TintError, match="text description.*CLIP.*SeedSelect"):
        gen.specialize(None, "red thing", _supports(CLASSES["red thing"]), tmp_path)


def test_nao_seeds_without_seedselect_run_on_the_diffusion_model(latent_backbone, tmp_path):
    gen = create_generator("nao")
    settings = {"seedselect": False, "description_template": "a photo of a {class_name}",
                "num_steps": 4, "dataset_resolution": RES}
    art = gen.specialize(latent_backbone, "red thing", _supports(CLASSES["red thing"]),
                         tmp_path / "art", settings)
    paths = gen.generate(latent_backbone, art, 3, tmp_path / "img", settings={"batch_size": 2})
    _check_images(paths, 3, "red thing", tmp_path / "img")
    rows = read_manifest(tmp_path / "img")
    assert all(r["seedselect"] is False and 0 <= r["path_t"] <= 1 for r in rows)
    _, meta = load_tensors(art)
    assert meta["prompt"] == "a photo of a red thing" and meta["seedselect"] is False


def test_nao_norm_aware_centroid_and_path():
    from tint.generators.nao import chi_log_pdf, norm_aware_centroid, norm_aware_path, typical_norm

    g = torch.Generator().manual_seed(0)
    seeds = torch.randn(5, 4, 8, 8, generator=g)
    dim = seeds[0].numel()
    centroid = norm_aware_centroid(seeds)
    assert centroid.norm() == pytest.approx(typical_norm(dim), rel=1e-5)
    plain_mean = seeds.mean(0)
    assert chi_log_pdf(centroid.norm(), dim) > chi_log_pdf(plain_mean.norm(), dim)
    path = norm_aware_path(centroid, seeds[0], 6)
    assert torch.allclose(path[0], centroid, atol=1e-5) and torch.allclose(path[-1], seeds[0], atol=1e-5)
    norms = path.flatten(1).norm(dim=1)
    expected = torch.linspace(float(centroid.norm()), float(seeds[0].norm()), 6)
    assert torch.allclose(norms, expected, rtol=1e-4)
    # chi density integrates to 1 (sanity of the normalising constant)
    r = torch.linspace(1e-3, 30, 20000, dtype=torch.float64)
    assert torch.trapezoid(chi_log_pdf(r, dim).exp(), r) == pytest.approx(1.0, rel=1e-3)
    json.dumps(table3_variants())  # the variant table is plain data (usable in configs)
