"""The stage table (issue 20): the graph is declared once, the artifact folders of existing
runs keep their names, and students' step-0 weights are what docs/pipeline.md says."""

from __future__ import annotations

import ast
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tint.config import ExecutorConfig, config_from_dict, load_config
from tint.data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST
from tint.engine import stable_hash
from tint.pipeline import run_pipeline
from tint.stage_bodies import distill_config, make_context, prepare
from tint.stages import (
    STAGES,
    TABLE,
    Unit,
    default_gpus,
    locate,
    plan_units,
    timed_stages,
    unit_done,
)

ROOT = Path(__file__).resolve().parents[1]

# Folders of configs/tiny.yaml computed by the code before the stage table (commit 3b1c94b):
# store folders by name, run-dir stages (evaluate, export) by the hash of their key. The
# generated images enter the keys of the labels, students and evaluation, so those are
# pinned through the same config without a generator (nothing has to run to know them).
TINY_FOLDERS = {
    "tiny:teacher": "teacher/25f6af85180b",
    "tiny:specialize/ep000/c00": "specialize/ac642328ed34",
    "tiny:generate/ep000/c00": "generate/7aa958558b77",
    "tiny:specialize/ep000/c01": "specialize/a6d006445741",
    "tiny:generate/ep000/c01": "generate/21da4274604a",
    "tiny:specialize/ep000/c02": "specialize/5470c630f963",
    "tiny:generate/ep000/c02": "generate/89d7261b5d3c",
    "tiny:label-base/ep000": "pseudo-base/9fa49c3ba825",
    "tiny:distill/ep000/s00": "distill/7a1db6361c77",
    "tiny:specialize/ep001/c00": "specialize/414f68bd039a",
    "tiny:generate/ep001/c00": "generate/62c856df6d54",
    "tiny:specialize/ep001/c01": "specialize/f1118b981ed2",
    "tiny:generate/ep001/c01": "generate/a2c2f8886dc0",
    "tiny:specialize/ep001/c02": "specialize/54e3c5a41bc6",
    "tiny:generate/ep001/c02": "generate/2cebfbcad0b0",
    "tiny:label-base/ep001": "pseudo-base/fff3d898b0fa",
    "tiny:distill/ep001/s00": "distill/2323ce1f1db6",
    "tiny-no-generator:teacher": "teacher/25f6af85180b",
    "tiny-no-generator:label-base/ep000": "pseudo-base/9fa49c3ba825",
    "tiny-no-generator:distill/ep000/s00": "distill/7a1db6361c77",
    "tiny-no-generator:distill/ep000/s01": "distill/7a1db6361c77",
    "tiny-no-generator:evaluate/ep000": "0591d183d047",
    "tiny-no-generator:export/ep000/s00": "b08836ee614f",
    "tiny-no-generator:export/ep000/s01": "b08836ee614f",
    "tiny-no-generator:label-base/ep001": "pseudo-base/fff3d898b0fa",
    "tiny-no-generator:distill/ep001/s00": "distill/2323ce1f1db6",
    "tiny-no-generator:distill/ep001/s01": "distill/2323ce1f1db6",
    "tiny-no-generator:evaluate/ep001": "eb7a4a470737",
    "tiny-no-generator:export/ep001/s00": "6a1a958730be",
    "tiny-no-generator:export/ep001/s01": "6a1a958730be",
}
NEEDS_GENERATED_IMAGES = ("pseudo-label", "evaluate", "export")


def _tiny_folders(variant: str, run_dir: Path) -> dict[str, str]:
    config = replace(load_config(ROOT / "configs" / "tiny.yaml"), run_dir=str(run_dir))
    if variant == "tiny-no-generator":
        config = replace(config, generator=replace(config.generator, name="none"))
    ctx = make_context(config)
    episodes = prepare(ctx)
    found = {}
    for unit in plan_units(ctx, episodes):
        if variant == "tiny" and (unit.stage in NEEDS_GENERATED_IMAGES or unit.id.endswith("s01")):
            continue  # keyed on generated images: pinned through the variant without them
        episode = episodes[unit.episode] if unit.episode is not None else None
        folder, key = locate(ctx, episode, unit)
        in_store = folder.is_relative_to(ctx.store)
        found[f"{variant}:{unit.id}"] = str(folder.relative_to(ctx.store)) if in_store else stable_hash(key)
    return found


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_tiny_config_keeps_the_artifact_folders_it_had(tmp_path):
    """Every committed result keeps its numbers only if a store written before finds its
    artifacts: the keys (hence folder names) must not move."""
    found = {**_tiny_folders("tiny", tmp_path / "a"), **_tiny_folders("tiny-no-generator", tmp_path / "b")}
    assert found == TINY_FOLDERS


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run (both students, synthetic images) with each student's step-0 weights."""
    from test_pipeline import tiny_config, write_tiny_dataset

    data_root = write_tiny_dataset(tmp_path_factory.mktemp("data"))
    config = config_from_dict(tiny_config(data_root, tmp_path_factory.mktemp("run"),
                                          **{"data.n_episodes": 1, "distill.repeats": 2}))
    initial: dict[str, dict[str, torch.Tensor]] = {}

    def keep(label: str, student: torch.nn.Module) -> None:
        initial[label] = {k: v.clone() for k, v in student.state_dict().items()}

    run_pipeline(config, hooks={"student-init": keep})
    return config, initial


def test_every_folder_key_and_need_comes_from_the_table(finished):
    """Walk the plan: each unit's needs, key and folder are its table record's."""
    config, _ = finished
    ctx = make_context(config)
    episodes = prepare(ctx)
    units = plan_units(ctx, episodes)
    assert {u.stage for u in units} == set(STAGES)  # this config plans every stage
    seen: set[str] = set()
    for unit in units:
        stage = STAGES[unit.stage]
        episode = episodes[unit.episode] if unit.episode is not None else None
        assert unit.needs == tuple(n.id for n in stage.needs(ctx, episode, unit))
        assert set(unit.needs) <= seen, unit.id  # the local order runs needs first
        seen.add(unit.id)
        key = stage.key(ctx, episode, unit)
        assert locate(ctx, episode, unit) == (stage.folder(ctx, episode, unit, key), key)
        folder = stage.folder(ctx, episode, unit, key)
        if folder.is_relative_to(ctx.store):
            assert folder == ctx.store / folder.parent.name / stable_hash(key)
        assert folder.is_dir(), unit.id  # the run wrote it where the table says


def test_resources_and_timings_come_from_the_table():
    assert default_gpus() == ExecutorConfig().gpus  # the config's defaults say the same
    assert set(timed_stages()) == {"prepare", "report", *(s.runs_as for s in TABLE)}
    assert STAGES["label-base"].runs_as == "pseudo-label"  # seeded and timed as before


def test_no_other_module_builds_a_store_path_or_plans_units():
    """The folder formula (<store>/<stage>/<hash of key>) and the graph live in tint/stages.py.
    (`tint experiment`'s FID cache, <store>/fid/, is no stage of a run and keeps its own.)"""
    pattern = re.compile(r"store\s*/\s*\"(?!fid\")[a-z-]+\"\s*/\s*stable_hash")
    for path in (ROOT / "tint").rglob("*.py"):
        text = path.read_text()
        if path.name == "stages.py":
            continue
        assert not pattern.search(text), path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                assert node.name not in ("plan_units", "unit_location", "run_unit"), (path, node.name)


def test_students_of_one_episode_start_from_their_own_keyed_weights(finished):
    """docs/pipeline.md, "Students share their randomness": a student's step-0 weights
    are seeded from its stage key, so the with- and without-synthetic students of an
    episode start from different weights (sharing them would have changed every committed
    student); what they share is the seed of their batches and augmentations."""
    config, initial = finished
    without, with_tint = initial["ep000/without-synthetic"], initial["ep000/with-tint"]
    assert any(not torch.equal(without[k], with_tint[k]) for k in without)
    assert any(not torch.equal(without[k], initial["ep000/without-synthetic/r1"][k]) for k in without)
    ctx = make_context(config)
    episode = prepare(ctx)[0]
    seeds = [distill_config(ctx, episode, s).seed for s in config.students]
    assert seeds[0] == seeds[1]
    assert distill_config(ctx, episode, config.students[0], repeat=1).seed != seeds[0]


def test_step0_weights_are_reproduced_by_the_same_key(finished, tmp_path):
    """The same student (same key) starts from the same weights in another run dir."""
    config, initial = finished
    again: dict[str, dict[str, torch.Tensor]] = {}

    def keep(label: str, student: torch.nn.Module) -> None:
        again[label] = {k: v.clone() for k, v in student.state_dict().items()}

    one_student = replace(config, run_dir=str(tmp_path / "again"), students=config.students[:1],
                          distill=replace(config.distill, repeats=1))
    run_pipeline(one_student, hooks={"student-init": keep})
    first = initial["ep000/without-synthetic"]
    assert all(torch.equal(first[k], again["ep000/without-synthetic"][k]) for k in first)


def test_asking_about_a_student_without_synthetic_images_generates_nothing(finished, tmp_path):
    """A Ray driver asks whether each ready unit is done: for a student that reads no
    generated image that must not generate (or specialise) anything in the driver."""
    config, _ = finished
    computed: list[str] = []
    ctx = make_context(replace(config, run_dir=str(tmp_path / "fresh")), hooks={"*": lambda s, label: computed.append(s)})
    episodes = prepare(ctx)
    by_id = {u.id: u for u in plan_units(ctx, episodes)}
    assert not unit_done(ctx, episodes, by_id["distill/ep000/s00"])
    assert computed == ["prepare"]


def test_a_base_pretrained_student_starts_from_the_base_classifiers_features(finished, tmp_path):
    """distill.base_init_steps: the student's step-0 backbone is the one trained on the base
    classes' true labels (saved under base-init/), its head is fresh, and its key is new
    while a student without the option keeps the key it had."""
    from tint.io import load_tensors

    config, _ = finished
    at_start: dict[str, dict[str, torch.Tensor]] = {}

    def keep(label: str, student: torch.nn.Module) -> None:
        at_start[label] = {k: v.clone() for k, v in student.state_dict().items()}

    pretrained = replace(config, run_dir=str(tmp_path / "pre"), students=config.students[:1],
                         distill=replace(config.distill, repeats=1, base_init_steps=3))
    run_pipeline(pretrained, hooks={"student-init": keep})
    ctx = make_context(pretrained)
    episodes = prepare(ctx)
    folder, key = locate(ctx, episodes[0], Unit("distill", 0, 0, 0))
    assert key["distill"]["base_init_steps"] == 3
    base, _ = load_tensors(folder / "base-init" / "student.safetensors")
    start = at_start["ep000/without-synthetic"]
    backbone = {k: v for k, v in start.items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(v, base[k]) for k, v in backbone.items())
    assert base["head.weight"].shape[0] > start["head.weight"].shape[0]  # base classes vs episode
    plain = make_context(replace(config, run_dir=str(tmp_path / "plain")))
    plain_key = locate(plain, prepare(plain)[0], Unit("distill", 0, 0, 0))[1]
    assert "base_init_steps" not in plain_key["distill"]
