"""The P>M>F teacher: a pretrained backbone + a prototypical classifier (Hu et al., 2022).

Stages, as in P>M>F and appendix B.1 of the paper:

1. **Pretrained** backbone (``tint.teachers.backbones``): DINO ViT-B/16 when available,
   EfficientNet-Lite0 offline.
2. **Meta-training** (``meta_train``) on base-class episodes: the whole backbone and the
   classifier's scale are trained with Adam (lr 3e-3, weight decay 1e-6) on a cosine
   schedule. Paper setting: 100 epochs x 400 episodes of 5-way 5-shot 15-query.
3. **Prototypes** from the episode's support set (``fit``); optionally a few steps of
   support fine-tuning on pseudo-episodes made by augmenting the support set (P>M>F's
   test-time fine-tuning; off by default, as the paper did not use it in-domain).

Classification is ``scale * cos(feature, prototype)`` with a learnable ``scale``.
Frozen-backbone features are computed in batches under ``no_grad`` and cached per item id,
so base images pseudo-labelled for many episodes are embedded once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tint.engine import weights_fingerprint
from tint.errors import TintError
from tint.io import load_tensors, save_tensors
from tint.students.distill import (
    load_checkpoint,
    random_resized_crop_flip,
    save_checkpoint,
    step_generator,
)
from tint.teachers.backbones import FeatureBackbone, load_feature_backbone

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- episodes


@dataclass
class EpisodeTensors:
    """One episode in memory; labels are 0..n_way-1."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor


# (n_way, k_shot, n_query, generator) -> EpisodeTensors
EpisodeSampler = Callable[[int, int, int, torch.Generator], EpisodeTensors]


def _draw_episode(per_class: Sequence[Sequence[int]], n_way: int, k_shot: int, n_query: int,
                  generator: torch.Generator) -> tuple[list[int], list[int], list[int], list[int]]:
    """Indices and labels of support and query images for one random episode."""
    if len(per_class) < n_way:
        raise TintError(f"meta-training needs at least {n_way} base classes with "
                        f"{k_shot + n_query} images each, found {len(per_class)}; lower "
                        "n_way/n_query or add base classes")
    classes = torch.randperm(len(per_class), generator=generator)[:n_way].tolist()
    s_idx, s_lab, q_idx, q_lab = [], [], [], []
    for label, c in enumerate(classes):
        members = per_class[c]
        order = torch.randperm(len(members), generator=generator)[: k_shot + n_query].tolist()
        chosen = [members[i] for i in order]
        s_idx += chosen[:k_shot]
        q_idx += chosen[k_shot:]
        s_lab += [label] * k_shot
        q_lab += [label] * n_query
    return s_idx, s_lab, q_idx, q_lab


def _eligible(groups: dict, min_size: int, what: str) -> list:
    kept = [g for g in groups.values() if len(g) >= min_size]
    dropped = len(groups) - len(kept)
    if dropped:
        log.info("meta-training: %d %s with fewer than %d images skipped", dropped, what, min_size)
    return kept


class TensorEpisodeSampler:
    """Base-class episodes drawn from images held in memory (``images[i]`` has ``labels[i]``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        groups: dict[int, list[int]] = {}
        for i, lab in enumerate(labels.tolist()):
            groups.setdefault(lab, []).append(i)
        self.groups = groups

    def __call__(self, n_way: int, k_shot: int, n_query: int,
                 generator: torch.Generator) -> EpisodeTensors:
        per_class = _eligible(self.groups, k_shot + n_query, "classes")
        s, sl, q, ql = _draw_episode(per_class, n_way, k_shot, n_query, generator)
        return EpisodeTensors(self.images[s], torch.tensor(sl), self.images[q], torch.tensor(ql))


class DatasetEpisodeSampler:
    """Base-class episodes from a ``FewShotDataset`` (anything with ``.items`` and
    ``.load_tensor(items)``), loading only the images of each episode."""

    def __init__(self, dataset, classes: Sequence[str]) -> None:
        missing = [c for c in classes if c not in dataset.items]
        if missing:
            raise TintError(f"meta-training: base classes not in the dataset: {missing[:5]}")
        self.dataset = dataset
        self.groups = {c: list(dataset.items[c]) for c in classes}

    def __call__(self, n_way: int, k_shot: int, n_query: int,
                 generator: torch.Generator) -> EpisodeTensors:
        per_class = _eligible(self.groups, k_shot + n_query, "base classes")
        s, sl, q, ql = _draw_episode(per_class, n_way, k_shot, n_query, generator)
        return EpisodeTensors(self.dataset.load_tensor(s), torch.tensor(sl),
                              self.dataset.load_tensor(q), torch.tensor(ql))


# --------------------------------------------------------------------------- the classifier


def prototypes(features: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean feature per class, ``[n_way, D]``."""
    one_hot = F.one_hot(labels, n_way).to(features.dtype)
    counts = one_hot.sum(0)
    if bool((counts == 0).any()):
        raise TintError(f"support set: every label 0..{n_way - 1} needs at least one image")
    return (one_hot.T @ features) / counts[:, None]


def cosine_logits(features: torch.Tensor, protos: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return scale * F.normalize(features, dim=-1) @ F.normalize(protos, dim=-1).T


class ProtoNetTeacher(nn.Module):
    """P>M>F ProtoNet: ``fit(support, labels)`` then ``predict_proba(x) -> [B, N]``."""

    def __init__(self, backbone: FeatureBackbone, scale: float = 10.0, batch_size: int = 64,
                 finetune_steps: int = 0, finetune_lr: float = 1e-4, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.batch_size = batch_size
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr
        self.seed = seed
        self._cache: dict[str, torch.Tensor] = {}
        self._protos: torch.Tensor | None = None
        self._pre_finetune: dict[str, torch.Tensor] | None = None

    # ---- features

    def clear_cache(self) -> None:
        """Forget cached features (called whenever the backbone's weights change)."""
        self._cache.clear()

    def is_cached(self, ids: Sequence[str]) -> bool:
        return all(i in self._cache for i in ids)

    @torch.no_grad()
    def features(self, x: torch.Tensor | None = None,
                 ids: Sequence[str] | None = None) -> torch.Tensor:
        """Backbone features ``[B, D]`` in eval mode, batched; cached by item id if given.

        ``x`` may be None when every id is already cached."""
        if ids is not None and x is not None and len(ids) != len(x):
            raise TintError(f"teacher: {len(ids)} ids for {len(x)} images")
        if ids is not None and self.is_cached(ids):
            return torch.stack([self._cache[i] for i in ids])
        if x is None:
            raise TintError("teacher: images are needed for items whose features are not cached")
        was_training = self.training
        self.eval()
        try:
            chunks = [x[i:i + self.batch_size].to(self.device)
                      for i in range(0, len(x), self.batch_size)]
            feats = torch.cat([self.backbone(c).float().cpu() for c in chunks])
        finally:
            self.train(was_training)
        if ids is not None:
            self._cache.update(zip(ids, feats, strict=True))
        return feats

    @property
    def device(self) -> torch.device:
        """Where the backbone lives (move the teacher with ``.to(device)``)."""
        return self.scale.device

    # ---- episode fitting and prediction

    @property
    def num_classes(self) -> int:
        if self._protos is None:
            raise TintError("teacher: call fit(support, labels) before predicting")
        return len(self._protos)

    def fit(self, support: torch.Tensor, labels: torch.Tensor,
            ids: Sequence[str] | None = None) -> None:
        """Prototypes of the support set (after optional support fine-tuning)."""
        labels = labels.long()
        n_way = int(labels.max()) + 1
        self._restore_meta_trained()
        if self.finetune_steps > 0:
            self._pre_finetune = {k: v.clone() for k, v in self.state_dict().items()}
            self.finetune_on_support(support, labels, n_way)
            ids = None  # features of the fine-tuned backbone are episode-specific
        self._protos = prototypes(self.features(support, ids), labels, n_way)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor | None = None,
                      ids: Sequence[str] | None = None) -> torch.Tensor:
        """Soft class probabilities ``[B, N]`` over the fitted episode's classes."""
        feats = self.features(x, None if self._pre_finetune is not None else ids)
        return cosine_logits(feats, self._protos_or_raise(), self.scale.cpu()).softmax(dim=1)

    @torch.no_grad()
    def online(self, support: torch.Tensor, labels: torch.Tensor, size: int | None = None) -> OnlineProtoNet:
        """The teacher as a function of a batch (the consistent distillation recipe):
        prototypes of `support` and every batch at `size` px (None: the backbone's own),
        nothing cached (each view is new), on the teacher's device. Call ``fit`` first when
        support fine-tuning is on: the function uses the backbone as it is now."""
        self.eval()
        labels = labels.long()
        protos = prototypes(self.backbone(support.to(self.device), size).float(), labels.to(self.device),
                            int(labels.max()) + 1)
        return OnlineProtoNet(self.backbone, protos, self.scale.detach(), size)

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy on labelled images (the episode's queries)."""
        return float((self.predict_proba(x).argmax(1) == labels).float().mean())

    def _protos_or_raise(self) -> torch.Tensor:
        if self._protos is None:
            raise TintError("teacher: call fit(support, labels) before predict_proba")
        return self._protos

    # ---- support fine-tuning (P>M>F test-time stage, optional)

    def finetune_on_support(self, support: torch.Tensor, labels: torch.Tensor, n_way: int) -> None:
        """A few SGD steps: prototypes from the support set, queries = augmented support."""
        optimizer = torch.optim.SGD(self.parameters(), lr=self.finetune_lr, momentum=0.9)
        support, labels = support.to(self.device), labels.to(self.device)
        self.eval()  # BN statistics stay those of meta-training (25 images are too few)
        for step in range(self.finetune_steps):
            gen = step_generator(self.seed, "finetune", step)
            queries = random_resized_crop_flip(support, gen)
            feats = self.backbone(torch.cat([support, queries]))
            protos = prototypes(feats[: len(support)], labels, n_way)
            loss = F.cross_entropy(cosine_logits(feats[len(support):], protos, self.scale), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def _restore_meta_trained(self) -> None:
        if self._pre_finetune is not None:
            self.load_state_dict(self._pre_finetune)
            self._pre_finetune = None

    # ---- persistence

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        """Meta-trained weights (backbone + scale) as safetensors."""
        self._restore_meta_trained()
        save_tensors(path, self.state_dict(), {"teacher": "pmf",
                                               "backbone": self.backbone.name, **(meta or {})})

    def load(self, path: str | Path) -> None:
        tensors, meta = load_tensors(path)
        if (meta or {}).get("backbone") not in (None, self.backbone.name):
            raise TintError(f"{path}: saved for backbone {meta['backbone']!r}, "
                            f"not {self.backbone.name!r}")
        try:
            self.load_state_dict(tensors)
        except RuntimeError as err:
            raise TintError(f"{path}: weights do not fit this teacher ({err})") from err
        self.clear_cache()


class OnlineProtoNet:
    """A fitted, frozen ProtoNet as a function of a batch: probabilities, or features too."""

    def __init__(self, backbone: FeatureBackbone, protos: torch.Tensor, scale: torch.Tensor,
                 size: int | None) -> None:
        self.backbone, self.protos, self.scale, self.size = backbone, protos, scale, size
        self.feature_dim = backbone.feature_dim

    def features_and_probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x.to(self.protos.device), self.size).float()
        return feats, cosine_logits(feats, self.protos, self.scale).softmax(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_probabilities(x)[1]


# --------------------------------------------------------------------------- meta-training


def episode_loss(teacher: ProtoNetTeacher, episode: EpisodeTensors) -> torch.Tensor:
    """Cross-entropy of the queries against the support prototypes (one forward pass)."""
    n_way = int(episode.support_labels.max()) + 1
    n_support = len(episode.support)
    device = teacher.device
    feats = teacher.backbone(torch.cat([episode.support, episode.query]).to(device))
    protos = prototypes(feats[:n_support], episode.support_labels.to(device), n_way)
    logits = cosine_logits(feats[n_support:], protos, teacher.scale)
    return F.cross_entropy(logits, episode.query_labels.to(device))


def meta_train(teacher: ProtoNetTeacher, base_sampler: EpisodeSampler, epochs: int = 1,
               episodes_per_epoch: int = 20, lr: float = 3e-3, weight_decay: float = 1e-6,
               n_way: int = 5, k_shot: int = 5, n_query: int = 15, seed: int = 0,
               checkpoint_path: str | Path | None = None, progress: bool = True) -> list[float]:
    """Episodic meta-training on base classes (P>M>F stage 2); returns the episode losses.

    Defaults are small for a CPU; the paper's full setting is ``epochs=100,
    episodes_per_epoch=400``. Adam with a cosine schedule over all episodes. With
    ``checkpoint_path`` the state is saved after every epoch and a rerun resumes there;
    episodes are drawn from a generator seeded by (seed, episode), so a resumed run
    reproduces the uninterrupted one.
    """
    total = epochs * episodes_per_epoch
    optimizer = torch.optim.Adam(teacher.parameters(), lr=lr, weight_decay=weight_decay)
    start_epoch = 0
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        start_epoch = int(load_checkpoint(Path(checkpoint_path), teacher, optimizer)["step"])
    teacher.clear_cache()
    teacher.train()
    losses: list[float] = []
    bar = tqdm(total=total, initial=start_epoch * episodes_per_epoch, desc="meta-train",
               disable=not progress)
    for epoch in range(start_epoch, epochs):
        for i in range(episodes_per_epoch):
            index = epoch * episodes_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * index / total))
            episode = base_sampler(n_way, k_shot, n_query, step_generator(seed, "episode", index))
            loss = episode_loss(teacher, episode)
            if not torch.isfinite(loss):
                raise TintError(f"teacher meta-training: loss is {float(loss)} at episode "
                                f"{index}; lower the teacher lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if checkpoint_path is not None:
            save_checkpoint(Path(checkpoint_path), teacher, optimizer, epoch + 1, {})
    bar.close()
    teacher.eval()
    teacher.clear_cache()
    return losses



# ----------------------------------------------------------------------------- run recipe
# What the pipeline asks of every teacher module (tint.teachers.recipes): its artifact
# key, its training on the base classes, and loading the trained teacher.


def run_key(run) -> dict:
    """Everything the meta-trained teacher depends on (`run`: a recipes.TeacherInputs)."""
    cfg = run.config
    key = {"name": cfg.name, "dataset": run.dataset_spec, "resolution": run.resolution,
           "base_split": run.base_split, "settings": run.settings_key,
           "backbone": cfg.backbone, "meta_train": asdict(cfg.meta_train)}
    weights = local_backbone_fingerprint(cfg.backbone)
    return key if weights is None else {**key, "backbone_weights": weights}


def local_backbone_fingerprint(backbone: str) -> str | None:
    """Content identity of a `vit:<folder>` backbone (re-saved weights get a new teacher);
    None for the embedded and hub backbones, whose names identify them."""
    if not backbone.startswith("vit:"):
        return None
    folder = Path(backbone[len("vit:"):]).expanduser()
    return weights_fingerprint(folder) if folder.is_dir() else None


def train_for_run(run, folder: Path) -> dict:
    """Meta-train on base-class episodes (none when meta_train.epochs is 0)."""
    cfg = run.config
    teacher = create_pmf(backbone=cfg.backbone, seed=run.seed,
                         batch_size=cfg.batch_size, **run.settings).to(run.device)
    mt = cfg.meta_train
    losses: list[float] = []
    if mt.epochs > 0 and mt.episodes_per_epoch > 0:
        sampler = DatasetEpisodeSampler(run.dataset, run.dataset.classes(run.base_split))
        losses = meta_train(teacher, sampler, epochs=mt.epochs, episodes_per_epoch=mt.episodes_per_epoch,
                            lr=mt.lr, weight_decay=mt.weight_decay, n_way=mt.n_way, k_shot=mt.k_shot,
                            n_query=mt.n_query, seed=mt.seed,
                            checkpoint_path=folder / "checkpoint.safetensors")
    teacher.save(folder / "teacher.safetensors", {"meta_train_losses": losses})
    return {"weights": "teacher.safetensors", "final_loss": losses[-1] if losses else None}


def load_for_run(run, folder: Path) -> ProtoNetTeacher:
    cfg = run.config
    return create_pmf(backbone=cfg.backbone, weights=folder / "teacher.safetensors",
                      seed=run.seed, batch_size=cfg.batch_size, **run.settings).to(run.device)


def create_pmf(backbone: str = "efficientnet-lite0", weights: str | Path | None = None,
               input_size: int | None = None, allow_download: bool = False, seed: int = 0,
               **kwargs) -> ProtoNetTeacher:
    """P>M>F teacher; ``kwargs`` go to ProtoNetTeacher (scale, batch_size, finetune_steps...)."""
    extractor = load_feature_backbone(backbone, input_size=input_size,
                                      allow_download=allow_download, seed=seed)
    teacher = ProtoNetTeacher(extractor, seed=seed, **kwargs)
    if weights is not None:
        teacher.load(weights)
    teacher.eval()
    return teacher
