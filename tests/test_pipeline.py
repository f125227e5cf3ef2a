"""`tint run` end to end on tiny data and tiny models, kill-and-resume, bad input, faults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tint.cli import main
from tint.config import config_from_dict
from tint.errors import TintError
from tint.io import load_tensors, set_threads
from tint.pipeline import NonFiniteError, run_pipeline

N_BASE, N_NOVEL, PER_CLASS, SIDE = 5, 3, 12, 32


def write_tiny_dataset(root: Path) -> Path:
    """8 classes x 12 images at 32x32: a class colour + a class-specific bar, with noise."""
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(N_BASE + N_NOVEL)]
    for c, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True)
        colour = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 151 + 30) % 256])
        for i in range(PER_CLASS):
            image = np.full((SIDE, SIDE, 3), 255.0) * 0.2 + colour * 0.8
            row = 4 + 3 * c
            image[row:row + 3, 4:28] = 255 - colour
            image += rng.normal(0, 12, image.shape)
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    (root / "splits.json").write_text(json.dumps({"base": names[:N_BASE], "novel": names[N_BASE:]}))
    return root


def tiny_config(data_root: Path, run_dir: Path, **overrides) -> dict:
    """3-way 2-shot, 2 episodes, tiny diffusion model, tiny ViT teacher, a few steps each."""
    config = {
        "name": "tiny",
        "run_dir": str(run_dir),
        "threads": 1,
        "data": {"dataset": f"folder:{data_root}", "resolution": SIDE, "episodes": None,
                 "n_way": 3, "k_shot": 2, "n_query": 3, "n_episodes": 2,
                 "base_images_per_class": 6, "min_base_classes": 3, "min_base_images": 10},
        "generator": {"name": "tint", "backbone": "tiny", "images_per_class": 4,
                      "specialize": {"ti_steps": 2, "num_steps": 3, "nti_inner_steps": 1,
                                     "bridge_steps": []},
                      "generate": {"batch_size": 4, "progress": False}},
        "teacher": {"name": "pmf", "backbone": "tiny-vit", "batch_size": 16,
                    "meta_train": {"epochs": 1, "episodes_per_epoch": 2, "n_way": 3,
                                   "k_shot": 2, "n_query": 2}},
        "students": [{"name": "without-synthetic", "arch": "conv4", "sources": ["base", "support"]},
                     {"name": "with-tint", "arch": "conv4", "sources": ["base", "synthetic", "support"]}],
        "distill": {"iterations": 6, "batch_size": 12, "eval_every": 3, "checkpoint_every": 2,
                    "lr_drop_at": 4},
        "report": {"grid_images": 3},
    }
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    set_threads(1)
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("run")
    results = run_pipeline(config_from_dict(tiny_config(data_root, run_dir)))
    return run_dir, results


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted((run_dir / "artifacts" / "distill").glob("*/student.safetensors")):
        tensors, _ = load_tensors(path)  # may map the file: copy before it is edited in place
        out |= {f"{path.parent.name}/{k}": v.clone() for k, v in tensors.items()}
    return out


def test_tiny_run_writes_every_artifact(finished_run):
    run_dir, results = finished_run
    artifacts = run_dir / "artifacts"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "log.txt").is_file()
    assert len(list((artifacts / "specialize").glob("*/*.safetensors"))) >= 3
    manifests = list((artifacts / "generate").glob("*/manifest.jsonl"))
    assert manifests and all(len(m.read_text().splitlines()) == 4 for m in manifests)
    assert len(list((artifacts / "pseudo").glob("*/pseudo_labels.safetensors"))) == 2
    assert len(list((artifacts / "distill").glob("*/student.safetensors"))) == 4  # 2 ep x 2
    assert len(list((run_dir / "export").glob("ep*/*/*.onnx"))) == 4
    assert len(list((run_dir / "export").glob("ep*/*/*.pt"))) == 4
    assert (run_dir / "report.html").is_file()
    assert (run_dir / "report" / "accuracy_curve.png").is_file()
    for model in ("teacher", "without-synthetic", "with-tint"):
        saved = json.loads((run_dir / "results" / f"{model}.json").read_text())
        assert len(saved["accuracies"]) == 2
        assert results["summary"][model]["n"] == 2
        assert all(0 <= a <= 1 for a in saved["accuracies"])
    # pseudo-labels are probabilities over the episode's 3 classes
    labels, meta = load_tensors(next((artifacts / "pseudo").glob("*/pseudo_labels.safetensors")))
    assert labels["base"].shape == (N_BASE * 6, 3) and labels["synthetic"].shape == (3 * 4, 3)
    assert torch.allclose(labels["synthetic"].sum(1), torch.ones(12), atol=1e-5)
    html = (run_dir / "report.html").read_text()
    assert "Time per stage" in html and "Resolved config" in html and "with-tint" in html
    assert results["timings"]["distill"] > 0
    assert [env["torch"] for env in results["environments"]] == [torch.__version__]


def test_rerun_skips_every_stage(finished_run):
    run_dir, results = finished_run
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("done.json")}
    before = student_weights(run_dir)
    rerun = run_pipeline(_config_of(run_dir))  # the resolved config it saved
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("done.json")} == stamps
    assert rerun["summary"] == results["summary"]
    after = student_weights(run_dir)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _config_of(run_dir: Path):
    from tint.config import load_config

    return load_config(run_dir / "config.yaml")


class Killed(Exception):
    """Stands in for a kill: raised from inside a stage."""


def test_killed_run_resumes_to_the_same_result(data_root, finished_run, tmp_path):
    """Killed during generation, then mid-distillation (after a checkpoint), then resumed:
    finished stages are not recomputed and the result equals the uninterrupted run's."""
    reference_dir, reference = finished_run
    run_dir = tmp_path / "run"
    config = config_from_dict(tiny_config(data_root, run_dir))
    generated: list[str] = []

    def kill_in_generation(label):
        generated.append(label)
        if len(generated) == 4:  # the second episode's first class
            raise Killed(label)

    def kill_mid_distillation(label, step, loss):
        if label == "ep001/with-tint" and step == 3:  # checkpoint at 2, killed at 3
            raise Killed(label)

    for hooks in ({"generate": kill_in_generation}, {"distill-step": kill_mid_distillation}):
        with pytest.raises(Killed):
            run_pipeline(config, hooks=hooks)
        finished = {p: p.stat().st_mtime_ns for p in run_dir.rglob("done.json")}
        assert finished, "stages finished before the kill keep their markers"
        if "distill-step" in hooks:
            assert list((run_dir / "artifacts" / "distill").glob("*/checkpoint.safetensors"))
    resumed = run_pipeline(config)
    for path, stamp in finished.items():  # stages finished before the last kill: skipped
        assert path.stat().st_mtime_ns == stamp
    assert resumed["summary"] == reference["summary"]
    for ep_ref, ep_new in zip(reference["episodes"], resumed["episodes"], strict=True):
        assert ep_ref["accuracy"] == ep_new["accuracy"]
        assert ep_ref["curves"] == ep_new["curves"]
    ref_w, new_w = student_weights(reference_dir), student_weights(run_dir)
    assert ref_w.keys() == new_w.keys() and all(torch.equal(ref_w[k], new_w[k]) for k in ref_w)


def test_nan_loss_names_the_stage_and_keeps_artifacts(data_root, tmp_path):
    config = config_from_dict(tiny_config(data_root, tmp_path / "run", **{"distill.lr": 1e30}))
    with pytest.raises(NonFiniteError, match="stage distill"):
        run_pipeline(config)
    assert list((tmp_path / "run" / "artifacts" / "pseudo").glob("*/done.json"))
    assert list((tmp_path / "run" / "artifacts" / "specialize").glob("*/done.json"))


def test_too_few_base_classes_is_a_clear_error(data_root, tmp_path):
    config = config_from_dict(tiny_config(data_root, tmp_path / "run", **{"data.min_base_classes": 6}))
    with pytest.raises(TintError, match="data.min_base_classes"):
        run_pipeline(config)


def test_cli_rejects_bad_config_before_any_work(data_root, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("distill:\n  lr: abc\n")
    run_dir = tmp_path / "never"
    assert main(["run", str(path), "--run-dir", str(run_dir)]) == 2
    assert "distill.lr: expected float, got 'abc'" in capsys.readouterr().err
    assert not run_dir.exists()
    assert main(["run", "--set", "generator.nmae=tint", "--run-dir", str(run_dir)]) == 2
    assert "generator.nmae: unknown key" in capsys.readouterr().err
    assert not run_dir.exists()


def test_experiment_shares_artifacts_and_reruns_for_free(data_root, tmp_path):
    """Two alphas: one specialisation per class serves both; a second run computes nothing."""
    import yaml

    from tint.experiment import load_experiment, run_experiment

    base = tiny_config(data_root, tmp_path / "unused")
    base["students"] = [{"name": "with-tint", "arch": "conv4"}]
    base["export"] = {"enabled": False}
    base["report"] = {"enabled": False}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({
        "name": "alpha", "out_dir": str(tmp_path / "exp"), "base": "base.yaml",
        "store": str(tmp_path / "store"), "set": {"distill.iterations": 2},
        "grid": {"alpha": [{"label": "0.5", "set": {"generator.generate.alpha": 0.5}},
                           {"label": "1.0", "set": {"generator.generate.alpha": 1.0}}]},
    }))
    experiment = load_experiment(tmp_path / "exp.yaml")
    computed: list[str] = []
    rows = run_experiment(experiment, hooks={"*": lambda stage, label: computed.append(stage)})
    assert computed.count("specialize") == 2 * 3  # 2 episodes x 3 classes, not x 2 alphas
    assert computed.count("generate") == 2 * 2 * 3 and computed.count("teacher") == 1
    assert [(r["alpha"], r["model"]) for r in rows] == [
        ("0.5", "teacher"), ("0.5", "with-tint"), ("1.0", "teacher"), ("1.0", "with-tint")]
    table = (tmp_path / "exp" / "results.md").read_text()
    assert "| alpha | model | accuracy (95% CI) | episodes |" in table
    assert (tmp_path / "exp" / "results.csv").is_file() and (tmp_path / "exp" / "results.png").is_file()
    assert "delta vs alpha=0.5 (paired, 95% CI)" in table
    delta = rows[3]["delta vs alpha=0.5"]["mean"]
    assert delta == pytest.approx(rows[3]["mean"] - rows[1]["mean"])
    computed.clear()
    again = run_experiment(experiment, hooks={"*": lambda stage, label: computed.append(stage)})
    assert computed == [] and again == rows

    # Another experiment on the same store: alpha left at its default (1.0) is the
    # "1.0" cell above, so nothing is computed again.
    (tmp_path / "exp2.yaml").write_text(yaml.safe_dump({
        "name": "default", "out_dir": str(tmp_path / "exp2"), "base": "base.yaml",
        "store": str(tmp_path / "store"), "set": {"distill.iterations": 2}, "fid": True,
        "grid": {"alpha": [{"label": "default", "set": {}}]},
    }))
    other = run_experiment(load_experiment(tmp_path / "exp2.yaml"),
                           hooks={"*": lambda stage, label: computed.append(stage)})
    assert set(computed) <= {"prepare", "evaluate"}, computed  # per-run-dir stages only
    assert [r["mean"] for r in other] == [r["mean"] for r in rows[2:]]
    assert other[0]["fid"] > 0 and len(list((tmp_path / "store" / "fid").glob("*/done.json"))) == 2 * 3


def test_experiment_rejects_a_bad_cell_before_any_work(data_root, tmp_path):
    import yaml

    from tint.experiment import load_experiment, run_experiment

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config(data_root, tmp_path / "x")))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "exp"), "base": "base.yaml",
        "grid": {"lr": [{"label": "ok", "set": {"distill.lr": 0.01}},
                        {"label": "bad", "set": {"distill.lr": "abc"}}]},
    }))
    with pytest.raises(TintError, match="cell bad: distill.lr: expected float, got 'abc'"):
        run_experiment(load_experiment(tmp_path / "exp.yaml"))
    assert not (tmp_path / "exp" / "cells").exists()


def test_capped_real_mining_uses_what_the_pool_has(data_root, tmp_path):
    """Mining may find fewer images than asked for: the run goes on with them, scores the
    pool once for all classes, and a rerun does not try to mine again."""
    pool = data_root  # the tiny dataset's folders stand in for an unlabelled pool
    config = tiny_config(data_root, tmp_path / "run", **{
        "generator.name": "real-mining", "generator.images_per_class": 4,
        "generator.specialize": {"feature_backbone": "tiny-vit"},
        "generator.generate": {"pool": str(pool), "threshold": -1.0, "max_per_class": 2,
                               "progress": False},
        "data.n_episodes": 1, "distill.iterations": 2, "export": {"enabled": False},
        "report": {"enabled": False}})
    computed: list[str] = []
    results = run_pipeline(config_from_dict(config), hooks={"*": lambda s, label: computed.append(s)})
    synthetic = results["episodes"][0]["_synthetic"]
    assert [len(paths) for paths in synthetic] == [2, 2, 2]
    assert len(list((tmp_path / "run" / "artifacts" / "pool-features").glob("*.safetensors"))) == 1
    computed.clear()
    run_pipeline(config_from_dict(config), hooks={"*": lambda s, label: computed.append(s)})
    assert "generate" not in computed


def test_a_flipped_bit_in_a_finished_student_is_recomputed_not_trusted(finished_run):
    """Issue 15.1: the marker's hashes catch the damage; the student is rebuilt from its
    checkpoint, so the rerun ends with the same weights and accuracies."""
    run_dir, results = finished_run
    before = student_weights(run_dir)
    path = sorted((run_dir / "artifacts" / "distill").glob("*/student.safetensors"))[0]
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x04
    path.write_bytes(bytes(data))
    computed: list[str] = []
    rerun = run_pipeline(_config_of(run_dir), hooks={"*": lambda s, label: computed.append(s)})
    assert computed == ["distill"]
    assert rerun["summary"] == results["summary"]
    after = student_weights(run_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _small(data_root: Path, run_dir: Path, **overrides) -> dict:
    return tiny_config(data_root, run_dir, **{"data.n_episodes": 1, "export": {"enabled": False},
                                              "report": {"enabled": False}, **overrides})


def test_students_with_the_same_sources_get_identical_weights(data_root, tmp_path):
    """Issue 15.3: students of one episode share their seeds (not derived from their names),
    so two students that read the same data are the same student; repeats differ."""
    config = _small(data_root, tmp_path / "run", **{"distill.repeats": 2})
    config["students"] = [{"name": n, "arch": "conv4", "sources": ["base", "support"]} for n in ("a", "b")]
    results = run_pipeline(config_from_dict(config))
    episode = results["episodes"][0]
    assert episode["accuracy"]["a"] == episode["accuracy"]["b"]
    assert episode["repeats"]["a"] == episode["repeats"]["b"] and len(episode["repeats"]["a"]) == 2
    assert episode["accuracy"]["a"] == pytest.approx(sum(episode["repeats"]["a"]) / 2)
    folders = sorted((tmp_path / "run" / "artifacts" / "distill").glob("*/student.safetensors"))
    assert len(folders) == 2  # one per repeat, shared by a and b
    first, second = (load_tensors(p)[0] for p in folders)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # repeats: other seeds


def test_the_no_synthetic_student_is_shared_across_generator_settings(data_root, tmp_path):
    """Issue 10.3: keyed on the base labels it reads, the no-synthetic student is computed
    once for every synthetic count (and the same student as before, bit for bit)."""
    store = tmp_path / "store"
    first = run_pipeline(config_from_dict(_small(data_root, tmp_path / "a")), store=store)
    computed: list[tuple[str, str]] = []
    second = run_pipeline(config_from_dict(_small(data_root, tmp_path / "b", **{"generator.images_per_class": 2})),
                          store=store, hooks={"*": lambda s, label: computed.append((s, label))})
    assert ("distill", "ep000/with-tint") in computed
    assert ("distill", "ep000/without-synthetic") not in computed
    acc = [r["episodes"][0]["accuracy"]["without-synthetic"] for r in (first, second)]
    assert acc[0] == acc[1]


def test_the_unit_graph_is_data_in_a_runnable_order(data_root, tmp_path):
    from tint.stage_bodies import make_context, prepare
    from tint.stages import plan_units, unit_done

    ctx = make_context(config_from_dict(_small(data_root, tmp_path / "run")))
    episodes = prepare(ctx)
    units = plan_units(ctx, episodes)
    by_id = {u.id: u for u in units}
    assert by_id["distill/ep000/s00"].needs == ("label-base/ep000",)  # not waiting for generation
    assert {"generate/ep000/c00", "label-base/ep000"} <= set(by_id["pseudo-label/ep000"].needs)
    seen: set[str] = set()
    for unit in units:  # the local order runs every unit after what it needs
        assert set(unit.needs) <= seen, unit.id
        seen.add(unit.id)
    assert not any(unit_done(ctx, episodes, u) for u in units)


def test_consistent_recipe_labels_online_with_no_label_stages(data_root, tmp_path):
    """Issue 21: distill.recipe=consistent needs the teacher and the images, not the
    pseudo-label stages; it is keyed apart from the paper recipe and resumes for free."""
    from tint.stage_bodies import make_context, prepare
    from tint.stages import plan_units, student_location

    overrides = {"distill.recipe": "consistent", "distill.teacher_size": 16, "distill.warmup": 2,
                 "distill.feature_weight": 1.0}
    config = config_from_dict(_small(data_root, tmp_path / "run", **overrides))
    ctx = make_context(config)
    episodes = prepare(ctx)
    by_id = {u.id: u for u in plan_units(ctx, episodes)}
    assert not any(u.startswith(("label-base", "pseudo-label")) for u in by_id)
    assert by_id["distill/ep000/s00"].needs == ("teacher",)
    assert set(by_id["distill/ep000/s01"].needs) == {"teacher", *(f"generate/ep000/c{c:02d}" for c in range(3))}

    results = run_pipeline(config)
    accuracy = results["episodes"][0]["accuracy"]
    assert 0 <= accuracy["with-tint"] <= 1 and 0 <= accuracy["without-synthetic"] <= 1
    store = tmp_path / "run" / "artifacts"
    assert not (store / "pseudo-base").exists() and not (store / "pseudo").exists()
    computed: list[tuple[str, str]] = []
    again = run_pipeline(config, hooks={"*": lambda s, label: computed.append((s, label))})
    assert computed == [] and again["episodes"][0]["accuracy"] == accuracy
    assert 0 <= accuracy["teacher-online"] <= 1 and "teacher-online" in results["models"]
    paper = config_from_dict(_small(data_root, tmp_path / "paper"))
    paper_folder = make_context(paper).store  # same episode, paper recipe: another student
    ctx_paper = make_context(paper)
    assert student_location(ctx_paper, prepare(ctx_paper)[0], 0)[1] != student_location(ctx, episodes[0], 0)[1]
    assert paper_folder != store
