"""FID on 64-dim features: the exact distance, the extractors, the protocol and `tint fid`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tint.cli import main
from tint.errors import TintError
from tint.evaluation.fid import (
    InceptionStem64,
    create_extractor,
    extract_features,
    feature_stats,
    fid_between,
    fid_from_features,
    fid_protocol,
    frechet_distance,
)

torch.set_num_threads(1)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(a)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    s1, s2 = rng.uniform(0.1, 3, 64), rng.uniform(0.1, 3, 64)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_covariances_match_symmetric_formula():
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2): the right side is symmetric PSD (eigh only).
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 16), _random_spd(rng, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    r1 = _sqrtm_psd(s1)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(_sqrtm_psd(r1 @ s2 @ r1)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_samples_approaches_the_analytic_value():
    rng = np.random.default_rng(2)
    d = 8
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = np.diag(np.full(d, 1.0)), np.diag(np.full(d, 4.0))
    a = rng.multivariate_normal(mu1, s1, size=20000)
    b = rng.multivariate_normal(mu2, s2, size=20000)
    analytic = d * 0.25 + d * (1 + 4 - 2 * 2)  # 2 + 8 = 10
    assert fid_from_features(a, b) == pytest.approx(analytic, rel=0.05)
    mu_a, sigma_a = feature_stats(a)
    assert mu_a.shape == (d,) and sigma_a.shape == (d, d)


def test_fid_of_a_set_against_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(30, 64))  # fewer samples than dims: singular covariance
    value = fid_from_features(features, features)
    assert np.isfinite(value) and value == pytest.approx(0.0, abs=1e-3)
    shifted = fid_from_features(features, features + 1.0)
    assert shifted == pytest.approx(64.0, rel=1e-3)  # |mu shift|^2 = 64 * 1^2


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(TintError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(TintError):
        feature_stats(np.zeros((1, 4)))


def _pytorch_fid_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under pytorch-fid's InceptionV3 key names (stem + a few later keys)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"Conv2d_1a_3x3": (32, 3), "Conv2d_2a_3x3": (32, 32), "Conv2d_2b_3x3": (64, 32)}
    state: dict[str, torch.Tensor] = {}
    for name, (out_ch, in_ch) in shapes.items():
        state[f"{name}.conv.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g) * 0.2
        state[f"{name}.bn.weight"] = torch.rand(out_ch, generator=g) + 0.5
        state[f"{name}.bn.bias"] = torch.randn(out_ch, generator=g) * 0.1
        state[f"{name}.bn.running_mean"] = torch.randn(out_ch, generator=g) * 0.1
        state[f"{name}.bn.running_var"] = torch.rand(out_ch, generator=g) + 0.5
    # keys beyond the stem, as in the real file: must be ignored
    state["Conv2d_3b_1x1.conv.weight"] = torch.randn(80, 64, 1, 1, generator=g)
    state["Mixed_5b.branch1x1.conv.weight"] = torch.randn(64, 192, 1, 1, generator=g)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g)
    return state


def test_inception_stem_loads_pytorch_fid_key_names(tmp_path):
    state = _pytorch_fid_like_state_dict()
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, weights)
    model = create_extractor("inception-64", weights)
    assert torch.equal(model.Conv2d_2b_3x3.conv.weight, state["Conv2d_2b_3x3.conv.weight"])
    assert torch.equal(model.Conv2d_1a_3x3.bn.running_var, state["Conv2d_1a_3x3.bn.running_var"])
    images = torch.rand(3, 3, 40, 52)
    features = model(images)
    assert features.shape == (3, 64) and torch.isfinite(features).all()
    # The 299x299 resize and [-1,1] scaling happen inside: a manual pass agrees.
    x = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    for block in (model.Conv2d_1a_3x3, model.Conv2d_2a_3x3, model.Conv2d_2b_3x3):
        x = torch.relu(block.bn(block.conv(x)))
    pooled = torch.nn.functional.max_pool2d(x, 3, 2)
    assert pooled.shape[-2:] == (73, 73)  # pytorch-fid's block-0 output size
    assert torch.allclose(features, pooled.mean(dim=(2, 3)), atol=1e-5)


def test_inception_stem_errors_are_user_facing(tmp_path):
    with pytest.raises(TintError, match="inception-weights"):
        create_extractor("inception-64", None)
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(TintError, match="pytorch-fid"):
        create_extractor("inception-64", bad)
    with pytest.raises(TintError, match="choose one of"):
        create_extractor("inception-2048")
    assert set(InceptionStem64().state_dict()) >= {"Conv2d_2b_3x3.bn.running_mean"}


@pytest.fixture(scope="module")
def efficientnet_features():
    return create_extractor("efficientnet-lite0-64")


def test_offline_extractor_gives_64_dim_features(efficientnet_features):
    images = torch.rand(4, 3, 32, 32)
    features = extract_features(images, efficientnet_features, batch_size=3)
    assert features.shape == (4, 64) and np.isfinite(features).all()
    again = extract_features(images, efficientnet_features)
    assert np.allclose(features, again, atol=1e-5)
    assert fid_between(images, images, efficientnet_features) == pytest.approx(0.0, abs=1e-3)


def _blob_images(color: tuple[float, float, float], n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(color).view(1, 3, 1, 1).expand(n, 3, 24, 24)
    return (base + 0.15 * torch.randn(n, 3, 24, 24, generator=g)).clamp(0, 1)


def test_fid_separates_different_image_sets(efficientnet_features):
    red_a, red_b = _blob_images((0.9, 0.1, 0.1), 8, 0), _blob_images((0.9, 0.1, 0.1), 8, 1)
    blue = _blob_images((0.1, 0.1, 0.9), 8, 2)
    same_kind = fid_between(red_a, red_b, efficientnet_features)
    other_kind = fid_between(red_a, blue, efficientnet_features)
    assert other_kind > 3 * same_kind


class MeanColour(torch.nn.Module):
    """A cheap stand-in extractor: per-channel mean and std (6 dims)."""

    name = "mean-colour"

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_protocol_structure_and_identical_sets():
    classes = {f"c{i}": list(_blob_images((i / 7, 0.5, 1 - i / 7), 10, i)) for i in range(7)}
    report = fid_protocol(classes, classes, MeanColour(), n_per_class=10, n_episodes=3, n_way=5)
    assert len(report.episodes) == 3 and all(len(ep) == 5 for ep in report.episodes)
    assert len(report.per_class) == 15 and len(report.per_episode) == 3
    assert all(row["n_real"] == 10 and row["n_generated"] == 10 for row in report.per_class)
    assert report.mean == pytest.approx(0.0, abs=1e-6)  # all images drawn: same sets
    shifted = {c: [(x * 0.5) for x in imgs] for c, imgs in classes.items()}
    worse = fid_protocol(classes, shifted, MeanColour(), n_per_class=6, n_episodes=2, n_way=3)
    assert worse.mean > 0.01 and all(row["n_real"] == 6 for row in worse.per_class)
    assert worse.features == "mean-colour"


def _write_class_folders(root, colours, n):
    for name, colour in colours.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i, image in enumerate(_blob_images(colour, n, hash(name) % 100)):
            array = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            Image.fromarray(array).save(folder / f"{i}.png")


def test_tint_fid_cli_protocol_and_flat_sets(tmp_path, capsys):
    colours = {"apple": (0.9, 0.1, 0.1), "sky": (0.2, 0.4, 0.9)}
    _write_class_folders(tmp_path / "real", colours, 4)
    _write_class_folders(tmp_path / "gen", colours, 4)
    out = tmp_path / "fid.json"
    code = main(["fid", "--real", str(tmp_path / "real"), "--generated", str(tmp_path / "gen"),
                 "--per-class", "3", "--episodes", "2", "--n-way", "2", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["features"] == "efficientnet-lite0-64"
    assert "OFFLINE SUBSTITUTE" in result["feature_description"]
    assert len(result["fid_per_episode"]) == 2 and np.isfinite(result["fid_mean"])
    assert "efficientnet-lite0-64" in capsys.readouterr().out

    # real images straight from a dataset spec, generated images from a generator's manifest
    from tint.generators.base import image_relpath, write_image, write_manifest_rows

    gen_out = tmp_path / "generated"
    for name, colour in colours.items():
        rows = []
        for i, image in enumerate(_blob_images(colour, 3, 7)):
            write_image(gen_out / image_relpath(name, i), image)
            rows.append({"file": image_relpath(name, i), "class": name, "index": i})
        write_manifest_rows(gen_out, rows)
    code = main(["fid", "--real-dataset", f"folder:{tmp_path / 'real'}", "--resolution", "24",
                 "--generated", str(gen_out), "--per-class", "3", "--episodes", "1",
                 "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and len(result["episodes"][0]) == 2
    assert all(row["n_generated"] == 3 for row in result["per_class"])

    code = main(["fid", "--real", str(tmp_path / "real" / "apple"),
                 "--generated", str(tmp_path / "gen" / "apple"), "--out", str(out)])
    assert code == 0 and json.loads(out.read_text())["n_real"] == 4
    assert main(["fid", "--real", str(tmp_path / "nope"), "--generated", str(tmp_path)]) == 2
