"""Distillation loop: batch composition, loss mixing, exact kill-and-resume, NaN handling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tint.errors import TintError
from tint.io import load_tensors
from tint.students import create_student
from tint.students.distill import (
    CHECKPOINT_NAME,
    DistillConfig,
    DistillSource,
    compose_batch,
    distill,
    distillation_loss,
    enabled_sources,
    load_student,
    query_accuracy,
    random_resized_crop_flip,
    source_indices,
)

RES = 32
N_WAY = 3


def _soft(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, N_WAY, generator=g).softmax(dim=1)


def _sources(seed: int = 0) -> dict[str, DistillSource]:
    g = torch.Generator().manual_seed(seed)
    return {
        "base": DistillSource(_soft(20, seed + 1), images=torch.rand(20, 3, RES, RES, generator=g)),
        "synthetic": DistillSource(_soft(15, seed + 2),
                                   images=torch.rand(15, 3, RES, RES, generator=g)),
        "support": DistillSource(torch.arange(6) % N_WAY,
                                 images=torch.rand(6, 3, RES, RES, generator=g)),
    }


class _Kill(Exception):
    pass


def test_batch_has_equal_parts_of_enabled_sources():
    sources = _sources()
    names = enabled_sources(sources, DistillConfig())
    batch = compose_batch(sources, names, 150, seed=0, step=3)
    assert {n: len(batch[n][0]) for n in batch} == {"base": 50, "synthetic": 50, "support": 50}
    assert batch["support"][1].dtype == torch.long and batch["base"][1].shape == (50, N_WAY)

    no_synth = enabled_sources(sources, DistillConfig(sources=("base", "support")))
    batch = compose_batch(sources, no_synth, 150, seed=0, step=3)
    assert {n: len(batch[n][0]) for n in batch} == {"base": 75, "support": 75}

    # An enabled but absent source is skipped: the others share the batch.
    only_two = {k: v for k, v in sources.items() if k != "base"}
    batch = compose_batch(only_two, enabled_sources(only_two, DistillConfig()), 151, 0, 0)
    assert [len(batch[n][0]) for n in ("synthetic", "support")] == [76, 75]


def test_each_image_is_used_once_per_pass():
    idx = torch.cat([source_indices(seed=1, name="support", size=6, share=4, step=s)
                     for s in range(3)])  # 12 draws = two full passes
    assert sorted(idx[:6].tolist()) == list(range(6))
    assert sorted(idx[6:].tolist()) == list(range(6))
    assert not torch.equal(idx[:6], idx[6:])  # a new order per pass


def test_no_enabled_source_is_an_error():
    with pytest.raises(TintError, match="none of the enabled sources"):
        enabled_sources({"base": _sources()["base"]}, DistillConfig(sources=("support",)))
    with pytest.raises(TintError, match="unknown source"):
        DistillConfig(sources=("base", "laion"))


def test_loss_is_ce_on_hard_and_kl_on_soft_targets():
    torch.manual_seed(0)
    logits = {"support": torch.randn(4, N_WAY), "base": torch.randn(3, N_WAY)}
    hard = torch.tensor([0, 2, 1, 2])
    soft = _soft(3, 5)
    temperature = 2.0

    loss = distillation_loss(logits, {"support": hard, "base": soft}, temperature)

    ce = sum(-math.log(torch.softmax(logits["support"][i], 0)[hard[i]]) for i in range(4))
    kl = 0.0
    for i in range(3):
        student = torch.softmax(logits["base"][i] / temperature, 0)
        teacher = soft[i] ** (1 / temperature)
        teacher = teacher / teacher.sum()
        kl += float((teacher * (teacher.log() - student.log())).sum())
    expected = (ce + temperature**2 * kl) / 7
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_augmentation_is_seeded_and_identity_without_crop():
    x = torch.rand(5, 3, RES, RES)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = random_resized_crop_flip(x, gen()), random_resized_crop_flip(x, gen())
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x)
    same = random_resized_crop_flip(x, gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(same, x, atol=1e-5)


def _config(**kw) -> DistillConfig:
    settings = dict(iterations=8, batch_size=12, lr_drop_at=4, eval_every=4,
                    checkpoint_every=3, log_every=1, seed=7)
    settings.update(kw)
    return DistillConfig(**settings)


def _student() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_student("conv4", N_WAY, image_size=RES)


def test_killed_run_resumes_to_bit_identical_weights(tmp_path):
    sources = _sources()
    calls = []
    eval_fn = lambda model: calls.append(1) or 0.5  # noqa: E731

    reference = _student()
    ref = distill(reference, sources, _config(), tmp_path / "ref", eval_fn, progress=False)

    def kill_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise _Kill

    run_dir = tmp_path / "killed"
    with pytest.raises(_Kill):
        distill(_student(), sources, _config(), run_dir, eval_fn, progress=False,
                on_step=kill_at_5)
    _, meta = load_tensors(run_dir / CHECKPOINT_NAME)
    assert meta["step"] == 3

    resumed = _student()  # fresh weights: everything must come from the checkpoint
    result = distill(resumed, sources, _config(), run_dir, eval_fn, progress=False)
    assert result.resumed_from == 3
    ref_state, new_state = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    assert [e["loss"] for e in result.history] == [e["loss"] for e in ref.history]
    assert [e["step"] for e in result.history if "accuracy" in e] == [4, 8]
    log_steps = [json.loads(line)["step"] for line in
                 (run_dir / "history.jsonl").read_text().splitlines()]
    assert log_steps == list(range(1, 9))

    loaded, meta = load_student(result.final_path)
    assert meta["arch"] == "conv4" and meta["num_classes"] == N_WAY and meta["image_size"] == RES
    assert all(torch.equal(loaded.state_dict()[k], new_state[k]) for k in new_state)


def test_training_fits_the_support_labels(tmp_path):
    support = _sources()["support"]
    student = _student()
    cfg = _config(iterations=30, batch_size=6, augment=False, lr_drop_at=None,
                  checkpoint_every=30, eval_every=30, sources=("support",))
    eval_fn = query_accuracy(support.images, support.targets)
    result = distill(student, {"support": support}, cfg, tmp_path, eval_fn, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 0.5
    assert result.history[-1]["accuracy"] == 1.0


def test_nan_loss_stops_with_stage_and_step_and_keeps_checkpoint(tmp_path):
    sources = _sources()
    distill(_student(), sources, _config(iterations=3), tmp_path, progress=False)
    bad = dict(sources)
    bad["base"] = DistillSource(torch.full((20, N_WAY), float("nan")),
                                images=sources["base"].images)
    with pytest.raises(TintError, match=r"distill: loss is nan at step 4.*step 3"):
        distill(_student(), bad, _config(iterations=6), tmp_path, progress=False)
    _, meta = load_tensors(tmp_path / CHECKPOINT_NAME)
    assert meta["step"] == 3


def test_changed_settings_do_not_resume_silently(tmp_path):
    distill(_student(), _sources(), _config(iterations=3), tmp_path, progress=False)
    with pytest.raises(TintError, match="different distillation settings"):
        distill(_student(), _sources(), _config(iterations=3, lr=0.5), tmp_path, progress=False)


def test_bf16_channels_last_option_trains(tmp_path):
    student = _student()
    cfg = _config(iterations=2, bf16=True, channels_last=True)
    result = distill(student, _sources(), cfg, tmp_path, progress=False)
    assert all(math.isfinite(e["loss"]) for e in result.history)
    loaded, _ = load_student(result.final_path)
    x = torch.rand(2, 3, RES, RES)
    with torch.no_grad():
        assert torch.allclose(loaded(x), student.eval()(x), atol=1e-5)


# --------------------------------------------------------------------------- consistent recipe


class _RecordingTeacher:
    """A fixed random linear teacher that records every batch it labels."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(11)
        self.weight = torch.randn(3 * RES * RES, N_WAY, generator=g) * 0.05
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return (x.flatten(1) @ self.weight).softmax(1)


class _RecordingStudent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _student()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(x.detach().clone())
        return self.net(x)


def _unlabelled_sources() -> dict[str, DistillSource]:
    sources = _sources()
    return {"base": DistillSource(None, images=sources["base"].images),
            "synthetic": DistillSource(None, images=sources["synthetic"].images),
            "support": sources["support"]}


def _consistent(**kw) -> DistillConfig:
    return _config(recipe="consistent", warmup=2, **kw)


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_consistent_teacher_sees_exactly_the_students_mixed_views(tmp_path, mix):
    teacher, student = _RecordingTeacher(), _RecordingStudent()
    cfg = _consistent(iterations=3, mix=mix)
    distill(student, _unlabelled_sources(), cfg, tmp_path, progress=False, teacher=teacher)
    assert len(teacher.seen) == len(student.seen) == 3
    for t_view, s_view in zip(teacher.seen, student.seen, strict=True):
        assert t_view.shape[0] == cfg.batch_size  # every transfer image, supports included
        assert torch.equal(s_view[: len(t_view)], t_view)  # the same pixels
        assert s_view.shape[0] == cfg.batch_size + 4  # + the 4 supports' unmixed views (CE)
    # Mixed: no view of the batch equals an augmented image of the sources on its own.
    views = teacher.seen[0]
    assert not torch.equal(views, views[torch.randperm(len(views))])


def test_mixing_is_seeded_and_mixes_pairs():
    from tint.students.distill import mix_batch

    x = torch.rand(6, 3, RES, RES)
    for mode in ("cutmix", "mixup"):
        a, b = mix_batch(x, seed=1, step=4, mode=mode), mix_batch(x, seed=1, step=4, mode=mode)
        assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
        assert not torch.equal(a, mix_batch(x, seed=1, step=5, mode=mode))
    cut = mix_batch(x, seed=1, step=4, mode="cutmix")
    # cutmix: each pixel comes from the image itself or from one partner
    from_self = (cut == x).all(dim=1)
    assert from_self.any() and (~from_self).any()
    assert torch.equal(mix_batch(x, 1, 4, "none"), x)


def test_consistent_killed_run_resumes_to_bit_identical_weights(tmp_path):
    sources = _unlabelled_sources()
    reference = _student()
    ref = distill(reference, sources, _consistent(), tmp_path / "ref", progress=False,
                  teacher=_RecordingTeacher())

    def kill_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise _Kill

    with pytest.raises(_Kill):
        distill(_student(), sources, _consistent(), tmp_path / "k", progress=False,
                on_step=kill_at_5, teacher=_RecordingTeacher())
    resumed = _student()
    result = distill(resumed, sources, _consistent(), tmp_path / "k", progress=False,
                     teacher=_RecordingTeacher())
    assert result.resumed_from == 3
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in reference.state_dict().items())
    assert [e["loss"] for e in result.history] == [e["loss"] for e in ref.history]


def test_consistent_schedule_and_settings():
    cfg = DistillConfig(recipe="consistent", iterations=100, warmup=10, lr=0.1)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # cosine decay
    assert lrs[-1] < 0.001
    with pytest.raises(TintError, match="distill.recipe"):
        DistillConfig(recipe="patient")
    with pytest.raises(TintError, match="distill.mix"):
        DistillConfig(mix="blend")


def test_recipes_need_their_inputs(tmp_path):
    with pytest.raises(TintError, match="teacher online"):
        distill(_student(), _unlabelled_sources(), _consistent(), tmp_path, progress=False)
    with pytest.raises(TintError, match="have no labels"):
        distill(_student(), _unlabelled_sources(), _config(), tmp_path / "p", progress=False)


def test_paper_key_and_fingerprint_ignore_the_consistent_settings():
    """The paper recipe's students keep the keys they had before the recipes existed."""
    from tint.students.distill import config_fingerprint, trajectory_settings

    paper = DistillConfig()
    assert not set(trajectory_settings(paper)) & {"recipe", "mix", "mix_alpha", "teacher_size", "warmup"}
    assert config_fingerprint(paper) == config_fingerprint(DistillConfig(mix="mixup", warmup=5))
    consistent = DistillConfig(recipe="consistent")
    assert config_fingerprint(consistent) != config_fingerprint(DistillConfig(recipe="consistent", mix="mixup"))
    # a consistent run's cosine spans `iterations`: it cannot be extended
    assert config_fingerprint(consistent) != config_fingerprint(DistillConfig(recipe="consistent",
                                                                              iterations=5))


class _FeatureTeacher(_RecordingTeacher):
    feature_dim = 7

    def features_and_probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x.detach().clone())
        feats = x.flatten(1)[:, : self.feature_dim] * 3 - 1
        return feats, (x.flatten(1) @ self.weight).softmax(1)


def test_feature_matching_trains_a_projection_that_is_not_exported_and_resumes_exactly(tmp_path):
    sources = _unlabelled_sources()
    cfg = _consistent(feature_weight=2.0)
    reference = _student()
    ref = distill(reference, sources, cfg, tmp_path / "ref", progress=False, teacher=_FeatureTeacher())
    tensors, _ = load_tensors(tmp_path / "ref" / CHECKPOINT_NAME)
    assert any(k.startswith("model.projector.") for k in tensors)  # trained, checkpointed
    student_file, _ = load_tensors(ref.final_path)
    assert not any("projector" in k for k in student_file)  # not part of the student
    plain = _student()
    distill(plain, sources, _consistent(), tmp_path / "plain", progress=False, teacher=_FeatureTeacher())
    assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in reference.state_dict().items())

    def kill_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise _Kill

    with pytest.raises(_Kill):
        distill(_student(), sources, cfg, tmp_path / "k", progress=False, on_step=kill_at_5,
                teacher=_FeatureTeacher())
    resumed = _student()
    distill(resumed, sources, cfg, tmp_path / "k", progress=False, teacher=_FeatureTeacher())
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in reference.state_dict().items())
    with pytest.raises(TintError, match="feature_weight"):
        distill(_student(), sources, cfg, tmp_path / "x", progress=False, teacher=_RecordingTeacher())
