"""The LabelHalluc teacher (Jian & Torresani, 2022): the alternative to P>M>F.

1. ``pretrain_on_base``: a network of the student's architecture is trained with
   cross-entropy on all base classes (the paper used IER pre-training; plain CE here).
   It reuses the distillation loop with a single hard-labelled "base" source, so it is
   checkpointed and resumable the same way.
2. ``LabelHallucTeacher.fit``: logistic regression (scikit-learn, multinomial, L2) on the
   L2-normalised features of the support set, as in RFS.
3. ``predict_proba``: the regression's class probabilities ``[B, N]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tint.errors import TintError
from tint.students.distill import (
    FINAL_NAME,
    DistillConfig,
    DistillSource,
    distill,
    load_student,
    random_resized_crop_flip,
    step_generator,
)


def pretrain_config(iterations: int = 2000, **overrides) -> DistillConfig:
    """CE pre-training settings (RFS-like: SGD lr 0.05, batch 64, lr x0.1 at 75%)."""
    settings = dict(iterations=iterations, batch_size=64, sources=("base",), lr=0.05,
                    lr_drop_at=int(iterations * 0.75), eval_every=max(iterations // 10, 1),
                    checkpoint_every=max(iterations // 10, 1))
    settings.update(overrides)
    return DistillConfig(**settings)


def pretrain_on_base(arch: str, base: DistillSource, run_dir: str | Path,
                     config: DistillConfig | None = None, image_size: int = 84,
                     progress: bool = True) -> nn.Module:
    """Train a `arch` network on the base classes with CE; reuse the result if complete.

    ``base.targets`` are the base-class labels 0..C-1. Checkpoints and the final weights
    (``run_dir/student.safetensors``) go to `run_dir`; a rerun resumes or reuses them.
    """
    from tint.students import create_student

    if base.is_soft:
        raise TintError("pretrain_on_base: base targets must be class labels, not probabilities")
    final = Path(run_dir) / FINAL_NAME
    if final.is_file():
        model, _ = load_student(final)
        return model
    num_classes = int(base.targets.max()) + 1
    if num_classes < 2:
        raise TintError(f"LabelHalluc pre-training needs at least 2 base classes, got {num_classes}")
    model = create_student(arch, num_classes, image_size=image_size)
    distill(model, {"base": base}, config or pretrain_config(), run_dir, progress=progress)
    model.eval()
    return model


class LabelHallucTeacher:
    """Logistic regression on L2-normalised features of a base-pretrained network."""

    def __init__(self, network: nn.Module, C: float = 1.0, max_iter: int = 1000,
                 batch_size: int = 128, augment_copies: int = 0, seed: int = 0) -> None:
        self.network = network.eval()
        self.C = C
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.augment_copies = augment_copies  # extra augmented views of each support image
        self.seed = seed
        self._cache: dict[str, torch.Tensor] = {}
        self._classifier = None

    def is_cached(self, ids: Sequence[str]) -> bool:
        return all(i in self._cache for i in ids)

    def to(self, device: str | torch.device) -> LabelHallucTeacher:
        """Compute features on `device` (they are returned on the CPU); returns self."""
        self.network.to(device)
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor | None = None,
                 ids: Sequence[str] | None = None) -> torch.Tensor:
        """L2-normalised features ``[B, D]`` (on the CPU), computed in batches on the
        network's device, cached by item id when given."""
        if ids is not None and self.is_cached(ids):
            return torch.stack([self._cache[i] for i in ids])
        if x is None:
            raise TintError("teacher: images are needed for items whose features are not cached")
        embed = getattr(self.network, "embed", self.network)
        device = next(iter(self.network.parameters()), torch.empty(0)).device
        feats = torch.cat([embed(x[i:i + self.batch_size].to(device)).float().cpu()
                           for i in range(0, len(x), self.batch_size)])
        feats = F.normalize(feats, dim=1)
        if ids is not None:
            self._cache.update(zip(ids, feats, strict=True))
        return feats

    @property
    def num_classes(self) -> int:
        if self._classifier is None:
            raise TintError("teacher: call fit(support, labels) before predicting")
        return len(self._classifier.classes_)

    def fit(self, support: torch.Tensor, labels: torch.Tensor,
            ids: Sequence[str] | None = None) -> None:
        from sklearn.linear_model import LogisticRegression

        labels = labels.long()
        feats = [self.features(support, ids)]
        targets = [labels]
        for copy in range(self.augment_copies):
            view = random_resized_crop_flip(support, step_generator(self.seed, "lr-aug", copy))
            feats.append(self.features(view))
            targets.append(labels)
        x = torch.cat(feats).numpy()
        y = torch.cat(targets).numpy()
        if len(np.unique(y)) != int(labels.max()) + 1:
            raise TintError("support set: every label 0..N-1 needs at least one image")
        self._classifier = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=0)
        self._classifier.fit(x, y)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor | None = None,
                      ids: Sequence[str] | None = None) -> torch.Tensor:
        if self._classifier is None:
            raise TintError("teacher: call fit(support, labels) before predict_proba")
        probs = self._classifier.predict_proba(self.features(x, ids).numpy())
        return torch.from_numpy(probs).float()

    def online(self, support: torch.Tensor, labels: torch.Tensor,
               size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The fitted teacher as a function of a batch (consistent distillation). Its network
        is the student's architecture at the data's resolution, so `size` is not used."""
        if self._classifier is None:
            raise TintError("teacher: call fit(support, labels) before online()")
        return lambda x: self.predict_proba(x).to(x.device)

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict_proba(x).argmax(1) == labels).float().mean())


def load_labelhalluc_teacher(weights: str | Path, **kwargs) -> LabelHallucTeacher:
    """Teacher from the weights `pretrain_on_base` wrote (``student.safetensors``)."""
    network, _ = load_student(weights)
    return LabelHallucTeacher(network, **kwargs)


def create_labelhalluc(weights: str | Path | None = None, network: nn.Module | None = None,
                       **kwargs) -> LabelHallucTeacher:
    """LabelHalluc teacher from pretrained weights or an in-memory network."""
    if (weights is None) == (network is None):
        raise TintError("teacher labelhalluc: give either weights (a file written by "
                        "pretrain_on_base) or network")
    if network is not None:
        return LabelHallucTeacher(network, **kwargs)
    return load_labelhalluc_teacher(weights, **kwargs)


# ----------------------------------------------------------------------------- run recipe
# What the pipeline asks of every teacher module (tint.teachers.recipes).


def _arch(run) -> str:
    return run.config.arch or run.first_student_arch


def run_key(run) -> dict:
    """Everything the base-pretrained network depends on (`run`: a recipes.TeacherInputs)."""
    cfg = run.config
    return {"name": cfg.name, "dataset": run.dataset_spec, "resolution": run.resolution,
            "base_split": run.base_split, "settings": run.settings_key, "arch": _arch(run),
            "pretrain_iterations": cfg.pretrain_iterations, "base": run.base_items, "seed": run.seed}


def train_for_run(run, folder: Path) -> dict:
    """Cross-entropy pre-training of the student architecture on the base classes."""
    classes = run.dataset.classes(run.base_split)
    items = run.base_items
    labels = torch.tensor([classes.index(run.dataset.class_of(i)) for i in items])
    source = DistillSource(labels, load=lambda idx: run.dataset.load_tensor([items[i] for i in idx]))
    config = pretrain_config(run.config.pretrain_iterations, seed=run.seed)
    config.device = str(run.device)
    pretrain_on_base(_arch(run), source, folder, config, image_size=run.resolution)
    return {"weights": "student.safetensors"}


def load_for_run(run, folder: Path) -> LabelHallucTeacher:
    return load_labelhalluc_teacher(folder / "student.safetensors",
                                    **run.settings).to(run.device)
