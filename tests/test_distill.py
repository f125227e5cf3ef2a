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
