"""Run configuration: validation names the key, overrides, resolved YAML round-trip."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from tint.config import (
    RunConfig,
    apply_override,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    save_resolved,
)
from tint.errors import TintError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_packaged_demo_validate():
    assert isinstance(config_from_dict({}), RunConfig)
    demo = load_config()
    assert demo.name == "demo"
    assert demo.data.n_way == 5 and demo.data.k_shot == 5
    assert [s.name for s in demo.students] == ["without-synthetic", "with-tint"]
    assert "synthetic" not in demo.students[0].sources


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_configs_demo_is_the_embedded_default():
    assert load_config(REPO / "configs" / "demo.yaml") == load_config()


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_experiments_validate(path):
    from tint.experiment import cell_config, cells, load_experiment

    experiment = load_experiment(path)
    for full in (False, True):
        for cell in cells(experiment, full):
            cell_config(experiment, cell)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"distill": {"lr": "abc"}}, "distill.lr: expected float, got 'abc'"),
        ({"distill": {"iterations": 1.5}}, "distill.iterations: expected int, got 1.5"),
        ({"distill": {"bf16": "yes"}}, "distill.bf16: expected bool, got 'yes'"),
        ({"data": {"resolutoin": 84}}, "data.resolutoin: unknown key"),
        ({"teacher": {"meta_train": {"epoch": 3}}}, "teacher.meta_train.epoch: unknown key"),
        ({"students": [{"name": "a", "sources": ["base", "laion"]}]}, "students[0].sources[1]"),
        ({"students": {"name": "a"}}, "students: expected list"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"data": {"n_way": 0}}, "data.n_way: must be >= 1"),
        ({"students": []}, "students: list at least one"),
        ({"students": [{"name": "a"}, {"name": "a"}]}, "students[1].name"),
        ({"generator": {"images_per_class": -1}}, "generator.images_per_class: must be >= 0"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(data, message):
    with pytest.raises(TintError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_yaml_number_forms_are_accepted():
    config = config_from_dict(yaml.safe_load("distill:\n  lr: 1e-3\n  weight_decay: 0\n"))
    assert config.distill.lr == pytest.approx(1e-3) and isinstance(config.distill.weight_decay, float)


def test_set_overrides_nested_keys_lists_and_free_form_settings():
    data: dict = {}
    for assignment in ("distill.lr=0.05", "students.1.arch=resnet12", "data.first_episodes=null",
                       "generator.specialize.ti_steps=7", "distill.sources=[base, support]"):
        data = apply_override(data, assignment)
    config = config_from_dict(data)
    assert config.distill.lr == 0.05
    assert config.students[1].arch == "resnet12" and config.students[0].arch == "conv4"
    assert config.data.first_episodes is None
    assert config.generator.specialize.ti_steps == 7
    # every other setting of the generator is filled in with its default
    assert config.generator.specialize.ti_t_min == 250 and config.generator.generate.alpha == 1.0
    assert config.distill.sources == ("base", "support")



def test_an_emptied_free_form_mapping_stays_empty_under_later_overrides():
    # --set executor.gpus={} then another executor key: the stage map must not come back
    data: dict = {}
    for assignment in ("executor.gpus={}", "executor.name=local", "executor.gpus.distill=0.5"):
        data = apply_override(data, assignment)
    assert data["executor"]["gpus"] == {"distill": 0.5}
    assert config_from_dict(apply_override({}, "executor.gpus.distill=0.5")).executor.gpus[
        "specialize"] == 1  # a plain override keeps the other stages' defaults

@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("distill.lrr=1", "distill.lrr: unknown key"),
        ("distill.lr", "expected KEY=VALUE"),
        ("students.5.arch=conv4", "students.5: no such list index"),
        ("name.x=1", "name.x: name is not a mapping"),
    ],
)
def test_bad_overrides_are_rejected(assignment, message):
    with pytest.raises(TintError) as err:
        apply_override({}, assignment)
    assert message in str(err.value)


def test_override_type_is_checked_after_parsing():
    with pytest.raises(TintError, match="distill.lr: expected float, got 'abc'"):
        load_config(None, ["distill.lr=abc"])


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(None, ["distill.iterations=17", "generator.generate.alpha=0.5"])
    save_resolved(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert config_to_dict(again) == yaml.safe_load(dump_config(config))
    text = (tmp_path / "config.yaml").read_text()
    assert "iterations: 17" in text and "momentum: 0.9" in text  # defaults are written out


def test_missing_or_invalid_files_are_clear(tmp_path):
    with pytest.raises(TintError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [1, 2\n")
    with pytest.raises(TintError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(TintError, match="must be a mapping"):
        load_config(bad)


def test_component_settings_are_resolved_with_every_default():
    config = load_config(None, ["teacher.settings.scale=5"])
    assert asdict(config.teacher.settings) == {"scale": 5.0, "finetune_steps": 0, "finetune_lr": 1e-4}
    assert config.generator.specialize.nti_inner_steps == 2  # the demo's own value
    assert config.generator.specialize.template == "a photo of an {}"  # a default
    text = dump_config(config)
    assert "finetune_lr: 0.0001" in text and "alpha: 1.0" in text and "ti_t_min: 250" in text


def test_settings_are_typed_once_at_load():
    """The config holds the components' settings objects from load on (stage bodies read
    them as they are); a code-built config holding such objects keeps them."""
    from tint.config import check_components
    from tint.generators.tint import GenerateSettings, SpecializeSettings
    from tint.teachers.settings import PMFSettings

    config = load_config(None, ["generator.generate.alpha=1e-1"])  # YAML 1.1 reads a string
    assert isinstance(config.generator.generate, GenerateSettings)
    assert isinstance(config.generator.specialize, SpecializeSettings)
    assert isinstance(config.teacher.settings, PMFSettings)
    assert isinstance(config.generator.generate.alpha, float) and config.generator.generate.alpha == 0.1
    generate = config.generator.generate
    check_components(config)  # checked again (e.g. by run_pipeline): the same objects
    assert config.generator.generate is generate
    built = RunConfig()
    built.generator.generate = GenerateSettings(alpha=0.25)
    check_components(built)
    assert built.generator.generate.alpha == 0.25 and isinstance(built.generator.specialize, SpecializeSettings)
    built.generator.generate = GenerateSettings(alpha=2.0)
    with pytest.raises(TintError, match=r"generator.generate.alpha: must be in \[0, 1\], got 2.0"):
        check_components(built)


def test_a_bad_generator_setting_fails_at_load_naming_its_key():
    with pytest.raises(TintError, match="generator.generate.alpha: expected float, got 'high'"):
        load_config(None, ["generator.generate.alpha=high"])
    with pytest.raises(TintError, match="generator.specialize.ti_stpes: unknown key"):
        load_config(None, ["generator.specialize.ti_stpes=3"])


def test_empty_config_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(TintError, match="empty.yaml: the config is empty"):
        load_config(empty)
