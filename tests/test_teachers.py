"""Teachers: P>M>F ProtoNet (tiny ViT through the DINO code path), LabelHalluc, pseudo-labels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tint.errors import TintError
from tint.students.distill import DistillSource, step_generator
from tint.teachers import create_teacher
from tint.teachers.backbones import FeatureBackbone, load_feature_backbone
from tint.teachers.labelhalluc import LabelHallucTeacher, pretrain_config, pretrain_on_base
from tint.teachers.protonet import (
    ProtoNetTeacher,
    TensorEpisodeSampler,
    episode_loss,
    local_backbone_fingerprint,
    meta_train,
)
from tint.teachers.pseudo_labels import pseudo_label
from tint.testing import build_tiny_vit

RES = 32
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9],
                        [0.9, 0.9, 0.1], [0.8, 0.2, 0.9], [0.1, 0.9, 0.9]])


def coloured_images(labels: list[int], seed: int, noise: float = 0.05) -> torch.Tensor:
    """Class = background colour (+ pixel noise): separable by any sensible features."""
    g = torch.Generator().manual_seed(seed)
    base = COLOURS[torch.tensor(labels)][:, :, None, None].expand(-1, -1, RES, RES)
    return (base + noise * torch.randn(len(labels), 3, RES, RES, generator=g)).clamp(0, 1)


def striped_images(labels: list[int], seed: int) -> torch.Tensor:
    """Class = stripe orientation/period on random colours: needs learning to separate."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(labels), 3, RES, RES)
    coords = torch.arange(RES, dtype=torch.float32)
    for i, lab in enumerate(labels):
        period = 4 + 2 * (lab % 3)
        axis = coords[None, :] if lab < 3 else coords[:, None]
        stripes = ((axis + torch.randint(0, period, (1,), generator=g)) // (period / 2)) % 2
        stripes = stripes.expand(RES, RES)
        fg, bg = torch.rand(3, generator=g), torch.rand(3, generator=g)
        out[i] = fg[:, None, None] * stripes + bg[:, None, None] * (1 - stripes)
    return out


def support_and_query(n_way: int = 5, k: int = 5, q: int = 6):
    s_lab = [c for c in range(n_way) for _ in range(k)]
    q_lab = [c for c in range(n_way) for _ in range(q)]
    return (coloured_images(s_lab, 1), torch.tensor(s_lab),
            coloured_images(q_lab, 2), torch.tensor(q_lab))


def tiny_teacher(**kw) -> ProtoNetTeacher:
    return ProtoNetTeacher(build_tiny_vit(seed=0, image_size=RES), **kw).eval()


# --------------------------------------------------------------------------- P>M>F


def test_prototypes_classify_separable_data_perfectly():
    support, s_lab, query, q_lab = support_and_query()
    teacher = tiny_teacher()
    teacher.fit(support, s_lab)
    probs = teacher.predict_proba(query)
    assert probs.shape == (len(query), 5)
    assert torch.allclose(probs.sum(1), torch.ones(len(query)), atol=1e-5)
    assert teacher.accuracy(query, q_lab) == 1.0


def test_feature_cache_serves_known_ids_without_images():
    support, s_lab, query, _ = support_and_query()
    teacher = tiny_teacher()
    ids = [f"q{i}" for i in range(len(query))]
    teacher.fit(support, s_lab)
    first = teacher.predict_proba(query, ids=ids)
    assert teacher.is_cached(ids)
    assert torch.equal(teacher.predict_proba(None, ids=ids), first)


def tiny_cnn_teacher() -> ProtoNetTeacher:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    return ProtoNetTeacher(FeatureBackbone("tiny-cnn", net, 256, RES, lambda n, x: n(x)))


# A random ViT learns slowly from scratch (its CLS features barely depend on the input at
# first); a small CNN shows feature learning clearly. Both go through the same code path.
@pytest.mark.parametrize(("make", "min_drop"), [(tiny_teacher, 0.05), (tiny_cnn_teacher, 0.3)])
def test_meta_training_lowers_the_episode_loss(make, min_drop):
    labels = [c for c in range(6) for _ in range(12)]
    sampler = TensorEpisodeSampler(striped_images(labels, 0), torch.tensor(labels))
    held_out = [sampler(3, 3, 5, step_generator(99, "eval", i)) for i in range(4)]
    teacher = make()

    def mean_loss() -> float:
        with torch.no_grad():
            teacher.eval()
            return sum(float(episode_loss(teacher, e)) for e in held_out) / len(held_out)

    before = mean_loss()
    losses = meta_train(teacher, sampler, epochs=1, episodes_per_epoch=25, lr=3e-3,
                        n_way=3, k_shot=3, n_query=5, progress=False)
    assert len(losses) == 25
    assert mean_loss() < before - min_drop


def test_meta_training_needs_enough_base_classes():
    labels = [0] * 10 + [1] * 10
    sampler = TensorEpisodeSampler(coloured_images(labels, 0), torch.tensor(labels))
    with pytest.raises(TintError, match="at least 5 base classes"):
        meta_train(tiny_teacher(), sampler, episodes_per_epoch=1, progress=False)


def test_killed_meta_training_resumes_from_its_checkpoint(tmp_path):
    labels = [c for c in range(4) for _ in range(6)]
    sampler = TensorEpisodeSampler(striped_images(labels, 3), torch.tensor(labels))
    kw = dict(epochs=3, episodes_per_epoch=2, n_way=3, k_shot=2, n_query=2, progress=False)
    straight = tiny_teacher()
    meta_train(straight, sampler, **kw)

    calls = []

    def dying_sampler(*args):
        calls.append(1)
        if len(calls) == 4:  # dies during epoch 2, after the checkpoint of epoch 1
            raise RuntimeError("killed")
        return sampler(*args)

    ckpt = tmp_path / "meta.safetensors"
    with pytest.raises(RuntimeError, match="killed"):
        meta_train(tiny_teacher(), dying_sampler, checkpoint_path=ckpt, **kw)
    again = tiny_teacher()
    losses = meta_train(again, sampler, checkpoint_path=ckpt, **kw)
    assert len(losses) == 4  # epochs 2 and 3 only
    state = straight.state_dict()
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())


def test_support_finetuning_is_undone_for_the_next_episode():
    support, s_lab, query, q_lab = support_and_query()
    teacher = tiny_teacher(finetune_steps=2, finetune_lr=1e-2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.fit(support, s_lab)
    assert any(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert teacher.accuracy(query, q_lab) == 1.0
    teacher.fit(support[:10], s_lab[:10])  # next episode starts from the meta-trained weights
    teacher.finetune_steps = 0
    teacher.fit(support, s_lab)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_teacher_weights_round_trip_and_vit_loads_from_a_folder(tmp_path):
    backbone = build_tiny_vit(seed=3, image_size=RES)
    backbone.network.save_pretrained(tmp_path / "vit")
    loaded = load_feature_backbone(f"vit:{tmp_path / 'vit'}")
    x = torch.rand(2, 3, 48, 48)  # resized to the ViT's 32x32 inside
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), backbone.eval()(x), atol=1e-6)

    teacher = tiny_teacher(scale=7.0)
    teacher.save(tmp_path / "teacher.safetensors")
    other = create_teacher("pmf", backbone="tiny-vit", input_size=RES, seed=5,
                           weights=tmp_path / "teacher.safetensors")
    assert float(other.scale.detach()) == 7.0
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in other.state_dict().items())


def test_a_resaved_vit_folder_gets_a_new_teacher_key(tmp_path):
    """A `vit:<folder>` teacher is keyed by the folder's content: weights re-saved under the
    same path must not reuse the teacher meta-trained on the old ones."""
    build_tiny_vit(seed=3, image_size=RES).network.save_pretrained(tmp_path / "vit")
    before = local_backbone_fingerprint(f"vit:{tmp_path / 'vit'}")
    build_tiny_vit(seed=4, image_size=RES).network.save_pretrained(tmp_path / "vit")
    assert before is not None and local_backbone_fingerprint(f"vit:{tmp_path / 'vit'}") != before
    assert local_backbone_fingerprint("efficientnet-lite0") is None  # named: the name is the key


def test_missing_dino_weights_and_unknown_names_are_clear_errors():
    with pytest.raises(TintError, match="efficientnet-lite0"):
        load_feature_backbone("vit:/nonexistent/dino-folder")
    with pytest.raises(TintError, match="unknown teacher"):
        create_teacher("clip")
    with pytest.raises(TintError, match="unknown teacher backbone"):
        create_teacher("pmf", backbone="resnet50")


def test_real_efficientnet_lite0_loads_offline():
    backbone = load_feature_backbone("efficientnet-lite0").eval()
    with torch.no_grad():
        feats = backbone(torch.rand(2, 3, RES, RES))
    assert feats.shape == (2, 1280) and backbone.feature_dim == 1280
    assert torch.isfinite(feats).all() and feats.std() > 0


# --------------------------------------------------------------------------- LabelHalluc


class _FlattenNet(nn.Module):
    """Features = mean colour per channel (separable for coloured images)."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) - 0.5

    forward = embed


def test_labelhalluc_logistic_regression_is_perfect_on_separable_features():
    support, s_lab, query, q_lab = support_and_query()
    teacher = create_teacher("labelhalluc", network=_FlattenNet(), C=10.0)
    teacher.fit(support, s_lab)
    probs = teacher.predict_proba(query)
    assert probs.shape == (len(query), 5) and probs.dtype == torch.float32
    assert teacher.accuracy(query, q_lab) == 1.0


def test_labelhalluc_pretraining_is_checkpointed_and_reused(tmp_path):
    labels = torch.tensor([c for c in range(4) for _ in range(6)])
    base = DistillSource(labels, images=coloured_images(labels.tolist(), 0))
    cfg = pretrain_config(iterations=3, batch_size=8)
    model = pretrain_on_base("conv4", base, tmp_path, cfg, image_size=RES, progress=False)
    assert model.head.out_features == 4
    again = pretrain_on_base("conv4", base, tmp_path, cfg, image_size=RES, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in again.state_dict().items())
    teacher = create_teacher("labelhalluc", weights=tmp_path / "student.safetensors")
    support, s_lab, query, _ = support_and_query(n_way=3)
    teacher.fit(support, s_lab)
    assert teacher.predict_proba(query).shape == (len(query), 3)
    assert isinstance(teacher, LabelHallucTeacher)


# --------------------------------------------------------------------------- pseudo-labels


class CountingTeacher:
    """Wraps a teacher and counts its forward passes (and can fail on demand)."""

    def __init__(self, teacher, fail_on_call: int | None = None):
        self.teacher, self.calls, self.fail_on_call = teacher, 0, fail_on_call

    def predict_proba(self, x, ids=None):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed")
        return self.teacher.predict_proba(x)


def test_pseudo_labels_are_cached_and_reused(tmp_path):
    support, s_lab, query, _ = support_and_query()
    inner = tiny_teacher()
    inner.fit(support, s_lab)
    counting = CountingTeacher(inner)
    path = tmp_path / "synthetic_labels.safetensors"

    probs = pseudo_label(counting, query, path, chunk_size=8, progress=False)
    assert probs.shape == (len(query), 5) and counting.calls == 4
    again = pseudo_label(counting, query, path, chunk_size=8, progress=False)
    assert counting.calls == 4 and torch.equal(again, probs)
    # another support set / teacher must not reuse the file
    pseudo_label(counting, query, path, key_extra="episode-2", chunk_size=8, progress=False)
    assert counting.calls == 8


def test_pseudo_labelling_by_item_id_resumes_after_a_kill(tmp_path):
    support, s_lab, query, _ = support_and_query()
    inner = tiny_teacher()
    inner.fit(support, s_lab)
    ids = [f"img{i}" for i in range(len(query))]
    loaded: list[str] = []

    def load(batch_ids: list[str]) -> torch.Tensor:
        loaded.extend(batch_ids)
        return query[[ids.index(i) for i in batch_ids]]

    path = tmp_path / "base_labels.safetensors"
    with pytest.raises(RuntimeError, match="killed"):
        pseudo_label(CountingTeacher(inner, fail_on_call=3), ids, path, load=load,
                     chunk_size=10, progress=False)
    resumed = CountingTeacher(inner)
    probs = pseudo_label(resumed, ids, path, load=load, chunk_size=10, progress=False)
    assert resumed.calls == 1  # only the chunk that was not finished
    assert torch.allclose(probs, inner.predict_proba(query), atol=1e-6)
    with pytest.raises(TintError, match="load"):
        pseudo_label(inner, ids, tmp_path / "x.safetensors", progress=False)
