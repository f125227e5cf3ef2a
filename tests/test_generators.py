"""Every registered generator, one parametrised test each (as timm tests every list_models()).

Each generator must state the whole `tint.generators.base.Generator` contract, resolve its
default settings (and round-trip them through config.yaml), refuse every out-of-range value
its ``RANGES`` name with the full key path, and specialise + generate 2 images with the
tiny random backbone. A new generator fails here until it is given fast settings below.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch
from PIL import Image

from tint.errors import TintError
from tint.generators import available_generators, create_generator, resolve_settings
from tint.generators.base import read_manifest
from tint.settings import Range, Settings, plain
from tint.testing import build_tiny_backbone

torch.set_num_threads(1)
RES = 24  # dataset resolution; the tiny backbone works at 32
FAST_DIFFUSION = {"num_steps": 2, "bridge_steps": [], "dataset_resolution": RES}
FAST_TI = {**FAST_DIFFUSION, "ti_steps": 1}

# generator -> (specialize settings, generate settings) small enough for a test
FAST: dict[str, tuple[dict, dict]] = {
    "tint": ({**FAST_TI, "nti_inner_steps": 1}, {"batch_size": 2}),
    "tint-lora": ({**FAST_TI, "nti_inner_steps": 1, "lora_steps": 2}, {"batch_size": 2}),
    "plain-ti": (FAST_TI, {"batch_size": 2}),
    "da-fusion": (FAST_TI, {"batch_size": 2}),
    "none": ({"dataset_resolution": RES}, {}),
    "real-mining": ({"feature_backbone": "tiny-vit", "dataset_resolution": RES},
                    {"threshold": -1.0}),  # + the pool folder, made per test
    "nao": ({**FAST_DIFFUSION, "seedselect": False,
             "description_template": "a photo of a {class_name}"}, {"batch_size": 2}),
}
IMAGES = {"none": 0}  # generators that make no image by design


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny"), seed=0)


def _supports(k: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(k, 3, RES, RES, generator=g)


def _outside(rule: Range) -> float:
    """A value just outside `rule`."""
    if rule.low is not None:
        return rule.low if rule.low_open else rule.low - 1
    return rule.high if rule.high_open else rule.high + 1


@pytest.mark.parametrize("name", available_generators())
def test_generator_states_the_whole_contract(name):
    module = create_generator(name)
    assert module.NAME == name
    assert isinstance(module.REQUIRED_TENSORS, tuple) and isinstance(module.MAY_RETURN_FEWER, bool)
    assert callable(module.specialize) and callable(module.generate)
    for cls in (module.SpecializeSettings, module.GenerateSettings):
        assert dataclasses.is_dataclass(cls) and issubclass(cls, Settings)
        assert set(cls.RANGES) <= {f.name for f in dataclasses.fields(cls)}, cls
    assert name in FAST, f"give generator {name!r} fast test settings in FAST"


@pytest.mark.parametrize("name", available_generators())
def test_default_settings_resolve_and_round_trip(name):
    specialize, generate = resolve_settings(name, {}, {})
    assert specialize == create_generator(name).SpecializeSettings()
    again = resolve_settings(name, plain(specialize), plain(generate))  # as config.yaml holds them
    assert again == (specialize, generate)


@pytest.mark.parametrize("name", available_generators())
def test_every_range_rule_refuses_a_value_outside_it(name):
    module = create_generator(name)
    for part, cls in (("specialize", module.SpecializeSettings), ("generate", module.GenerateSettings)):
        hints = typing.get_type_hints(cls)
        for field, rule in cls.RANGES.items():
            values = [_outside(rule)] + (["nan"] if "float" in str(hints[field]) else [])
            for value in values:
                given = {field: value}
                with pytest.raises(TintError, match=rf"^generator\.{part}\.{field}: must be "):
                    resolve_settings(name, *((given, {}) if part == "specialize" else ({}, given)))


@pytest.mark.parametrize("name", available_generators())
def test_specialize_then_generate_two_images(name, backbone, tmp_path):
    module = create_generator(name)
    spec, gen = FAST[name]
    if name == "real-mining":
        pool = tmp_path / "pool"
        for i in range(3):
            (pool / "x").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (60 * i, 90, 200)).save(pool / "x" / f"{i}.png")
        gen = {**gen, "pool": str(pool)}
    spec_settings, gen_settings = resolve_settings(name, _quiet(module.SpecializeSettings, spec),
                                                   _quiet(module.GenerateSettings, gen))
    artifact = module.specialize(backbone, "red thing", _supports(), tmp_path / "art", spec_settings)
    assert Path(artifact).is_file()
    paths = module.generate(backbone, artifact, 2, tmp_path / "img", 0, gen_settings)
    wanted = IMAGES.get(name, 2)
    assert len(paths) == wanted and all(p.is_file() for p in paths)
    rows = [r for r in read_manifest(tmp_path / "img") if r["class"] == "red thing"]
    assert sorted(r["index"] for r in rows) == list(range(wanted))
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (RES, RES)


def _quiet(cls: type, values: dict) -> dict:
    """`values` with progress bars off where the settings have them."""
    has_progress = "progress" in {f.name for f in dataclasses.fields(cls)}
    return {**values, "progress": False} if has_progress else values
