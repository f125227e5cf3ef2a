"""Distillation of a student from teacher pseudo-labels (paper section 3.2, appendix B.4).

Data flow of one training step:

1. ``compose_batch``: the batch (150) is split into equal parts over the enabled sources
   ("base", "synthetic", "support"; any may be switched off, the rest share the batch).
   Each source is walked through in a fresh random order per pass, a pure function of
   (seed, source, step), so no sampler state has to be saved for an exact resume.
2. ``augment``: random resized crop + horizontal flip, written with torch (no torchvision),
   drawn from a generator seeded by (seed, step).
3. ``distillation_loss``: cross-entropy for sources with hard labels (the support set),
   KL(teacher || student) with temperature for sources with soft labels (base, synthetic),
   averaged over all samples of the batch.
4. SGD (momentum 0.9, weight decay 5e-4, lr 0.02, x0.1 after ``lr_drop_at``).

Every ``checkpoint_every`` steps model + optimizer state go to one safetensors file (the
step in its metadata, written atomically), so a killed run resumes at the last
checkpoint and ends with bit-identical weights to an uninterrupted run. Query accuracy
(``eval_fn``) is logged every ``eval_every`` steps into the history and ``history.jsonl``
(the paper's Figure 6).

Two recipes (``DistillConfig.recipe``):

- ``paper``: the above, on pseudo-labels computed once per image by the pseudo-label stage.
- ``consistent`` ("a good teacher is patient and consistent", Beyer et al., CVPR 2022):
  the frozen teacher labels, at every step, exactly the augmented and *mixed* batch the
  student sees (``mix_batch``: mixup or cutmix across every transfer image: base,
  synthetic and support), KL at the temperature on those views plus CE on augmented
  support views, on a cosine schedule with warmup. The teacher is a function of a batch
  (``Teacher``), run under ``torch.inference_mode`` in the student's precision.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tint.devices import autocast, grad_scaler, resolve_precision
from tint.errors import TintError
from tint.io import DamagedFileError, load_tensors, save_tensors, write_json, write_text

log = logging.getLogger(__name__)

SOURCE_NAMES = ("base", "synthetic", "support")
RECIPES = ("paper", "consistent")
MIXES = ("cutmix", "mixup", "none")
# Settings that only the consistent recipe reads: left out of a paper student's key and
# checkpoint fingerprint, so that every paper result keeps its key.
CONSISTENT_ONLY = ("recipe", "mix", "mix_alpha", "teacher_size", "warmup", "feature_weight")
# [B,3,H,W] images in [0,1] -> [B,N] teacher probabilities (frozen; no gradient).
Teacher = Callable[[torch.Tensor], torch.Tensor]
CHECKPOINT_NAME = "checkpoint.safetensors"
FINAL_NAME = "student.safetensors"
HISTORY_NAME = "history.jsonl"


# --------------------------------------------------------------------------- settings


@dataclass
class DistillConfig:
    """Distillation settings. Defaults are the paper's full setting (B.4)."""

    iterations: int = 10_000
    batch_size: int = 150
    sources: tuple[str, ...] = SOURCE_NAMES  # enabled sources; absent/empty ones are skipped
    temperature: float = 1.0
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_drop_at: int | None = 5_000  # lr x lr_drop_factor from this step on; None: constant
    lr_drop_factor: float = 0.1
    augment: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    channels_last: bool = False
    bf16: bool = False  # bfloat16 autocast (CPU with AVX-512 bf16: ~2.7x faster for Conv4)
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 10  # loss entries in the history
    device: str = "cpu"  # e.g. "cuda"; exact resume is guaranteed on CPU only
    seed: int = 0
    # Students per episode with different seeds (initial weights, batches), accuracies
    # averaged per episode (the pipeline trains them; not part of one student's key).
    repeats: int = 1
    # The recipe (module docstring). The fields below it are read by `consistent` only.
    recipe: str = "paper"
    mix: str = "cutmix"  # mixing across the transfer batch: cutmix | mixup | none
    mix_alpha: float = 1.0  # mixing weight ~ Beta(mix_alpha, mix_alpha), one per batch
    teacher_size: int | None = None  # online teacher input side in px (None: its own)
    warmup: int = 0  # linear lr warmup steps before the cosine decay
    # + weight x (1 - cos) between the student's features (through a linear projection,
    # trained with it, not exported) and the teacher's on the same views: many more numbers
    # per image than N class probabilities (FitNets-style feature matching); 0: off
    feature_weight: float = 0.0
    # Steps of supervised training on the base classes' true labels (a classifier over the
    # base classes, same optimiser and augmentation) before distillation starts from its
    # features with a fresh head; 0: distil from random initial weights (either recipe).
    base_init_steps: int = 0

    def __post_init__(self) -> None:
        self.sources = tuple(self.sources)
        self.crop_scale = tuple(self.crop_scale)
        self.crop_ratio = tuple(self.crop_ratio)
        unknown = [s for s in self.sources if s not in SOURCE_NAMES]
        if unknown:
            raise TintError(f"distill.sources: unknown source(s) {unknown}; "
                            f"choose from {list(SOURCE_NAMES)}")
        for name in ("iterations", "batch_size", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise TintError(f"distill.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise TintError(f"distill.temperature must be > 0, got {self.temperature}")
        if self.recipe not in RECIPES:
            raise TintError(f"distill.recipe: {self.recipe!r} is not a recipe; choose from {list(RECIPES)}")
        if self.mix not in MIXES:
            raise TintError(f"distill.mix: {self.mix!r} is not a mixing; choose from {list(MIXES)}")
        if self.mix_alpha <= 0:
            raise TintError(f"distill.mix_alpha must be > 0, got {self.mix_alpha}")
        if self.teacher_size is not None and self.teacher_size < 8:
            raise TintError(f"distill.teacher_size must be >= 8 px (or null), got {self.teacher_size}")
        if self.warmup < 0:
            raise TintError(f"distill.warmup must be >= 0, got {self.warmup}")
        if self.feature_weight < 0:
            raise TintError(f"distill.feature_weight must be >= 0, got {self.feature_weight}")
        if self.base_init_steps < 0:
            raise TintError(f"distill.base_init_steps must be >= 0 (0: random initial weights), "
                            f"got {self.base_init_steps}")

    @property
    def consistent(self) -> bool:
        return self.recipe == "consistent"

    def lr_at(self, step: int) -> float:
        """Learning rate used for (0-based) `step`: the paper's step drop, or for
        `consistent` a linear warmup then a cosine decay to 0 at `iterations`."""
        if self.consistent:
            if step < self.warmup:
                return self.lr * (step + 1) / self.warmup
            span = max(self.iterations - self.warmup, 1)
            return self.lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / span))
        if self.lr_drop_at is not None and step >= self.lr_drop_at:
            return self.lr * self.lr_drop_factor
        return self.lr


@dataclass
class DistillSource:
    """Images of one source with their targets.

    ``targets``: int64 ``[M]`` hard labels (trained with cross-entropy), float ``[M, N]``
    teacher probabilities (trained with KL divergence), or None: unlabelled images, which
    only the `consistent` recipe reads (its teacher labels them online). Images either in
    memory (``images`` ``[M,3,H,W]`` in [0,1]) or loaded on demand by ``load(indices)`` for
    sets too large for memory (e.g. ``lambda idx: dataset.load_tensor([items[i] for i in
    idx])``; an unlabelled loaded source gives its size as ``count``).
    """

    targets: torch.Tensor | None
    images: torch.Tensor | None = None
    load: Callable[[list[int]], torch.Tensor] | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.load is None):
            raise TintError("DistillSource needs exactly one of `images` or `load`")
        if self.targets is None:
            if self.images is None and self.count is None:
                raise TintError("DistillSource: unlabelled images loaded on demand need `count`")
            return
        if self.images is not None and len(self.images) != len(self.targets):
            raise TintError(f"DistillSource: {len(self.images)} images but "
                            f"{len(self.targets)} targets")
        if self.targets.dim() not in (1, 2):
            raise TintError("DistillSource.targets must be [M] labels or [M, N] probabilities")

    def __len__(self) -> int:
        if self.targets is not None:
            return len(self.targets)
        return len(self.images) if self.images is not None else int(self.count or 0)

    @property
    def is_soft(self) -> bool:
        return self.targets is not None and self.targets.dim() == 2

    @property
    def is_labelled(self) -> bool:
        return self.targets is not None

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = self.images[indices] if self.images is not None else self.load(indices.tolist())
        return images, None if self.targets is None else self.targets[indices]


@dataclass
class DistillResult:
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"[, "accuracy"]}
    final_path: Path | None = None
    resumed_from: int = 0


# --------------------------------------------------------------------------- randomness


def step_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from (seed, parts...): independent streams per step and source."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, *parts))


# --------------------------------------------------------------------------- batches


def source_shares(batch_size: int, sources: Sequence[str]) -> dict[str, int]:
    """Equal parts of the batch per source; the remainder goes to the first sources."""
    if not sources:
        raise TintError("distill: no data source is enabled and non-empty")
    base, extra = divmod(batch_size, len(sources))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(sources)}


def source_indices(seed: int, name: str, size: int, share: int, step: int) -> torch.Tensor:
    """Indices of `name`'s part of batch `step`: a walk through per-pass permutations.

    Draw number d (d = step*share + j) is element d % size of the permutation for pass
    d // size, so every image is seen once per pass and the result depends on the step
    only (nothing to checkpoint).
    """
    draws = torch.arange(step * share, (step + 1) * share)
    passes = draws // size
    out = torch.empty(share, dtype=torch.long)
    for p in passes.unique().tolist():
        perm = _pass_permutation(seed, name, size, p)
        mask = passes == p
        out[mask] = perm[draws[mask] % size]
    return out


@functools.lru_cache(maxsize=16)
def _pass_permutation(seed: int, name: str, size: int, pass_index: int) -> torch.Tensor:
    return torch.randperm(size, generator=step_generator(seed, "perm", name, pass_index))


def enabled_sources(sources: dict[str, DistillSource], config: DistillConfig) -> list[str]:
    names = [n for n in config.sources if n in sources and len(sources[n]) > 0]
    skipped = [n for n in config.sources if n not in names]
    if skipped:
        log.info("distill: sources %s enabled but absent or empty: skipped", skipped)
    if not names:
        raise TintError(f"distill: none of the enabled sources {list(config.sources)} has "
                        f"data (given: {sorted(sources)})")
    return names


def compose_batch(sources: dict[str, DistillSource], names: Sequence[str], batch_size: int,
                  seed: int, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{source: (images, targets)} for one step, equal parts of the batch per source."""
    shares = source_shares(batch_size, names)
    return {n: sources[n].fetch(source_indices(seed, n, len(sources[n]), shares[n], step))
            for n in names}


# --------------------------------------------------------------------------- augmentation


def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator,
                             scale: tuple[float, float] = (0.5, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             flip: bool = True) -> torch.Tensor:
    """Per-image random resized crop + horizontal flip, output at the input size.

    One affine grid per image (crop box -> full output, bilinear), so the whole batch is
    augmented in one ``grid_sample`` call.
    """
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                        generator=generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # as fractions of the image side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - width)  # box centre in [-1, 1]
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - height)
    sign = torch.ones(b)
    if flip:
        sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = width * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mix_batch(x: torch.Tensor, seed: int, step: int, mode: str = "cutmix",
              alpha: float = 1.0) -> torch.Tensor:
    """Mix every image with another of the batch (a seeded permutation): mixup blends the
    pixels, cutmix pastes a box of the partner. One weight per batch, ~ Beta(alpha, alpha),
    drawn from (seed, step) so a resumed run mixes exactly as an uninterrupted one. No
    labels are mixed: the consistent recipe's teacher labels the mixed pixels themselves."""
    if mode == "none" or len(x) < 2:
        return x
    rng = np.random.default_rng(step_seed(seed, "mix", step))
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=step_generator(seed, "mix-perm", step)).to(x.device)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm]
    h, w = x.shape[-2:]
    cut_h, cut_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    top = int(rng.integers(0, h - cut_h + 1))
    left = int(rng.integers(0, w - cut_w + 1))
    mixed = x.clone()
    mixed[..., top:top + cut_h, left:left + cut_w] = x[perm][..., top:top + cut_h, left:left + cut_w]
    return mixed


# --------------------------------------------------------------------------- loss


def distillation_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean over all samples of CE (hard-label sources) or T^2 * KL(teacher || student)
    (soft-label sources, teacher and student both softened by T)."""
    total = torch.zeros((), device=next(iter(logits.values())).device)
    count = 0
    for name, z in logits.items():
        t = targets[name]
        z = z.float()
        if t.dim() == 1:
            total = total + F.cross_entropy(z, t, reduction="sum")
        else:
            log_student = F.log_softmax(z / temperature, dim=1)
            log_teacher = F.log_softmax(torch.log(t.float().clamp_min(1e-12)) / temperature, dim=1)
            kl = (log_teacher.exp() * (log_teacher - log_student)).sum()
            total = total + kl * temperature**2
        count += z.shape[0]
    return total / max(count, 1)


# --------------------------------------------------------------------------- checkpoints


def flatten_state(model: nn.Module, optimizer: torch.optim.Optimizer
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """Model + optimizer state as flat tensors and JSON-able extras (for safetensors)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    extras: dict = {"param_groups": opt["param_groups"], "scalars": {}}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                extras["scalars"][f"{idx}.{key}"] = value
    return tensors, extras


def restore_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                  tensors: dict[str, torch.Tensor], extras: dict) -> None:
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                           if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            idx, name = key[len("optim."):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    for key, value in extras.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": extras["param_groups"]})


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, meta: dict) -> None:
    tensors, extras = flatten_state(model, optimizer)
    save_tensors(path, tensors, {"step": step, "optimizer": extras, **meta})


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model + optimizer from `path`; returns its metadata (with "step")."""
    tensors, meta = load_tensors(path)
    if not meta or "step" not in meta:
        raise TintError(f"{path}: not a tint checkpoint (no step); delete it to start over")
    try:
        restore_state(model, optimizer, tensors, meta["optimizer"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise TintError(f"{path}: checkpoint does not match this model/optimizer ({err}); "
                        "delete it to start over") from err
    return meta


def trajectory_settings(config: DistillConfig) -> dict:
    """The settings a student depends on. A paper student's omit the consistent recipe's
    fields, so that its key is the one it had before the recipes existed."""
    fields = asdict(config)
    if not config.consistent:
        for key in CONSISTENT_ONLY:
            fields.pop(key)
    if not config.base_init_steps:  # random initial weights: the key it had before the option
        fields.pop("base_init_steps")
    return fields


def config_fingerprint(config: DistillConfig) -> str:
    """Settings that change the trajectory step by step (a paper run may be extended; a
    consistent one may not: its cosine schedule spans `iterations`)."""
    fields = trajectory_settings(config)
    dropped = ("eval_every", "checkpoint_every", "log_every", "device")
    for key in dropped if config.consistent else ("iterations", *dropped):
        fields.pop(key)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- history


def read_history(path: Path, up_to_step: int) -> list[dict]:
    """Entries of a JSONL history up to `up_to_step` (drops a torn last line)."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("step", 0) <= up_to_step:
            entries.append(entry)
    return entries


def append_history(path: Path, entry: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


# --------------------------------------------------------------------------- the loop


def _autocast(config: DistillConfig, precision: str):
    if config.bf16:  # the CPU switch of the config: bf16 autocast whatever `precision` says
        return torch.autocast(torch.device(config.device).type, dtype=torch.bfloat16)
    return autocast(config.device, precision)


def train_step(student: nn.Module, optimizer: torch.optim.Optimizer,
               sources: dict[str, DistillSource], names: Sequence[str],
               config: DistillConfig, step: int, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None, teacher: Teacher | None = None,
               projector: nn.Module | None = None) -> float:
    """One SGD step of (0-based) `step`; returns the loss. `precision` is the forward pass's
    autocast ("fp32": none); `scaler` does fp16 loss scaling; `teacher` labels the batch
    online (the consistent recipe); `projector` maps student to teacher features."""
    for group in optimizer.param_groups:
        group["lr"] = config.lr_at(step)
    if config.consistent:
        loss = consistent_loss(student, sources, names, config, step, precision, teacher, projector)
    else:
        loss = paper_loss(student, sources, names, config, step, precision)
    optimizer.zero_grad(set_to_none=True)
    if torch.isfinite(loss):
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            scaler.update()
    return float(loss.detach())


def augmented_batch(sources: dict[str, DistillSource], names: Sequence[str], config: DistillConfig,
                    step: int) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """Batch `step`'s images (on the device, augmented) and its parts per source."""
    batch = compose_batch(sources, names, config.batch_size, config.seed, step)
    images = torch.cat([batch[n][0] for n in names]).to(config.device)
    if config.augment:
        images = random_resized_crop_flip(images, step_generator(config.seed, "augment", step),
                                          config.crop_scale, config.crop_ratio)
    return images, batch


def _student_logits(student: nn.Module, images: torch.Tensor, config: DistillConfig,
                    precision: str) -> torch.Tensor:
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(config, precision):
        return student(images).float()


def paper_loss(student: nn.Module, sources: dict[str, DistillSource], names: Sequence[str],
               config: DistillConfig, step: int, precision: str) -> torch.Tensor:
    """CE on hard labels, KL to the stored pseudo-labels, on one augmented batch."""
    images, batch = augmented_batch(sources, names, config, step)
    sizes = [len(batch[n][0]) for n in names]
    logits = dict(zip(names, torch.split(_student_logits(student, images, config, precision), sizes),
                      strict=True))
    targets = {n: batch[n][1].to(config.device) for n in names}
    return distillation_loss(logits, targets, config.temperature)


def consistent_views(sources: dict[str, DistillSource], names: Sequence[str], config: DistillConfig,
                     step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed views of every transfer image, augmented support views, their labels): what the
    student sees at `step`. The teacher labels exactly the first tensor."""
    images, batch = augmented_batch(sources, names, config, step)
    labelled = [n for n in names if batch[n][1] is not None and batch[n][1].dim() == 1]  # hard labels
    hard = torch.cat([torch.full((len(batch[n][0]),), n in labelled) for n in names]).to(images.device)
    labels = torch.cat([batch[n][1] for n in labelled] or [torch.zeros(0, dtype=torch.long)]).to(images.device)
    mixed = mix_batch(images, config.seed, step, config.mix, config.mix_alpha)
    return mixed, images[hard], labels


def teacher_probabilities(teacher: Teacher, images: torch.Tensor, config: DistillConfig,
                          precision: str) -> torch.Tensor:
    """The frozen teacher on a batch: no autograd, the student's autocast, float32 out."""
    with torch.inference_mode(), _autocast(config, precision):
        probs = teacher(images).float()
    return probs.clone()  # a normal tensor: inference tensors cannot enter the loss graph


def teacher_features_and_probabilities(teacher, images: torch.Tensor, config: DistillConfig,
                                       precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """As `teacher_probabilities`, with the teacher's features of the same views."""
    with torch.inference_mode(), _autocast(config, precision):
        feats, probs = teacher.features_and_probabilities(images)
    return feats.float().clone(), probs.float().clone()


def feature_matching_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor,
                          projector: nn.Module) -> torch.Tensor:
    """Mean (1 - cosine) between projected student features and the teacher's."""
    projected = projector(student_feats.float())
    return (1 - F.cosine_similarity(projected, teacher_feats, dim=1)).mean()


def consistent_loss(student: nn.Module, sources: dict[str, DistillSource], names: Sequence[str],
                    config: DistillConfig, step: int, precision: str,
                    teacher: Teacher | None, projector: nn.Module | None = None) -> torch.Tensor:
    """KL to the teacher on the same mixed views (one student pass for views + supports),
    plus feature matching on those views when a `projector` is given."""
    if teacher is None:
        raise TintError("distill.recipe=consistent needs the teacher online; none was given")
    mixed, support, labels = consistent_views(sources, names, config, step)
    images = torch.cat([mixed, support])
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if projector is None:
        probs = teacher_probabilities(teacher, mixed, config, precision)
        with _autocast(config, precision):
            logits = student(images).float()
    else:
        teacher_feats, probs = teacher_features_and_probabilities(teacher, mixed, config, precision)
        with _autocast(config, precision):
            feats = student.embed(images)
            logits = student.head(feats).float()
    parts = {"transfer": logits[: len(mixed)]}
    targets = {"transfer": probs}
    if len(support):
        parts["support"], targets["support"] = logits[len(mixed):], labels
    loss = distillation_loss(parts, targets, config.temperature)
    if projector is not None:
        loss = loss + config.feature_weight * feature_matching_loss(feats[: len(mixed)], teacher_feats, projector)
    return loss


def query_accuracy(images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 256) -> Callable[[nn.Module], float]:
    """An ``eval_fn`` for `distill`: accuracy of the student on labelled query images."""

    def evaluate(student: nn.Module) -> float:
        device = next(student.parameters()).device
        correct = 0
        for i in range(0, len(images), batch_size):
            logits = student(images[i:i + batch_size].to(device))
            correct += int((logits.argmax(1).cpu() == labels[i:i + batch_size]).sum())
        return correct / max(len(images), 1)

    return evaluate


def _evaluate(student: nn.Module, eval_fn: Callable[[nn.Module], float]) -> float:
    student.eval()
    try:
        with torch.no_grad():
            return float(eval_fn(student))
    finally:
        student.train()


def distill(student: nn.Module, sources: dict[str, DistillSource], config: DistillConfig,
            run_dir: str | Path, eval_fn: Callable[[nn.Module], float] | None = None,
            progress: bool = True, on_step: Callable[[int, float], None] | None = None,
            student_meta: dict | None = None, precision: str = "fp32",
            teacher: Teacher | None = None) -> DistillResult:
    """Train `student` in place on `sources`; resumable from ``run_dir/checkpoint.safetensors``.

    ``eval_fn(student) -> accuracy`` (called in eval mode under no_grad) is logged every
    ``config.eval_every`` steps and at the end. ``on_step(step, loss)`` is called after
    each step (1-based, after any checkpoint). ``student_meta`` (e.g. ``{"arch": "conv4",
    "num_classes": 5, "image_size": 84}``) is stored with the final weights
    ``run_dir/student.safetensors`` beside what ``describe_student`` finds, so that
    ``load_student`` / ``tint export`` can rebuild the model. ``precision`` ("fp32", "bf16",
    "fp16"; tint.devices) is the forward pass's autocast: execution only, like
    ``config.device``, so it is in neither the checkpoint fingerprint nor a key (weights,
    optimizer state and loss stay float32; fp16 adds loss scaling on CUDA). ``teacher``
    (images -> probabilities) is required by ``config.recipe == "consistent"``.
    Raises TintError on a non-finite loss, keeping the last checkpoint.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = enabled_sources(sources, config)
    check_recipe_inputs(sources, names, config, teacher)
    for n in names:
        if n == "support" and sources[n].is_soft:
            log.info("distill: support source has soft targets: trained with KL")
    student.to(config.device)
    if config.channels_last:
        student.to(memory_format=torch.channels_last)
    projector = feature_projector(student, teacher, config)
    trainable = student if projector is None else nn.ModuleDict({"student": student, "projector": projector})
    optimizer = torch.optim.SGD(trainable.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    fingerprint = config_fingerprint(config)
    ckpt_path = run_dir / CHECKPOINT_NAME
    history_path = run_dir / HISTORY_NAME
    start = _resume(ckpt_path, trainable, optimizer, fingerprint)
    if start > config.iterations:
        raise TintError(f"{ckpt_path}: checkpoint is at step {start}, beyond "
                        f"distill.iterations={config.iterations}; raise iterations or delete it")
    history = read_history(history_path, start)
    write_text(history_path, "".join(json.dumps(e) + "\n" for e in history))
    write_json(run_dir / "distill_config.json", {**asdict(config), "enabled_sources": names})

    student.train()
    precision = resolve_precision(precision, config.device, option="distill precision")
    scaler = grad_scaler(config.device, precision)
    bar = tqdm(range(start, config.iterations), desc="distill", disable=not progress,
               initial=start, total=config.iterations)
    for step in bar:
        loss = train_step(student, optimizer, sources, names, config, step, precision,
                          scaler if scaler.is_enabled() else None, teacher, projector)
        done = step + 1
        if not math.isfinite(loss):
            kept = f"last checkpoint kept: {ckpt_path} (step {_saved_step(ckpt_path)})"
            raise TintError(f"distill: loss is {loss} at step {done}; lower distill.lr or "
                            f"check the pseudo-labels; {kept}")
        entry = {"step": done, "loss": loss, "lr": config.lr_at(step)}
        if eval_fn is not None and (done % config.eval_every == 0 or done == config.iterations):
            entry["accuracy"] = _evaluate(student, eval_fn)
        if done % config.log_every == 0 or done == config.iterations or "accuracy" in entry:
            history.append(entry)
            append_history(history_path, entry)
        if done % config.checkpoint_every == 0 or done == config.iterations:
            save_checkpoint(ckpt_path, trainable, optimizer, done, {"fingerprint": fingerprint})
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(done, loss)
    bar.close()

    final_path = run_dir / FINAL_NAME
    save_student(final_path, student, {"step": config.iterations, **(student_meta or {})})
    return DistillResult(history=history, final_path=final_path, resumed_from=start)


def feature_projector(student: nn.Module, teacher, config: DistillConfig) -> nn.Module | None:
    """The linear map student features -> teacher features of feature matching (or None)."""
    if not (config.consistent and config.feature_weight > 0):
        return None
    if not hasattr(teacher, "features_and_probabilities") or not hasattr(student, "embed"):
        raise TintError("distill.feature_weight > 0 needs a teacher with features (pmf) and a tint "
                        "student; set it to 0")
    return nn.Linear(student.feature_dim, teacher.feature_dim).to(config.device)


def check_recipe_inputs(sources: dict[str, DistillSource], names: Sequence[str],
                        config: DistillConfig, teacher: Teacher | None) -> None:
    """Before step 0: the paper recipe needs a target for every image, consistent a teacher."""
    if config.consistent:
        if teacher is None:
            raise TintError("distill.recipe=consistent labels every batch with the teacher online, "
                            "but no teacher was given")
        return
    unlabelled = [n for n in names if not sources[n].is_labelled]
    if unlabelled:
        raise TintError(f"distill: sources {unlabelled} have no labels; the paper recipe needs "
                        "pseudo-labels (or use distill.recipe=consistent)")


def _resume(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer,
            fingerprint: str) -> int:
    if not path.is_file():
        return 0
    try:
        _, meta = load_tensors(path)
    except DamagedFileError as err:  # never resume from a damaged checkpoint
        log.warning("distill: checkpoint %s cannot be resumed from (%s): deleted it, and this "
                    "student is distilled again from step 0; nothing to do", path, err.problem)
        path.unlink(missing_ok=True)
        return 0
    if meta and meta.get("fingerprint") != fingerprint:
        raise TintError(f"{path}: checkpoint was made with different distillation settings; "
                        "delete it (or the run directory) to start over")
    step = int(load_checkpoint(path, student, optimizer)["step"])
    log.info("distill: resuming from step %d (%s)", step, path)
    return step


def _saved_step(path: Path) -> int:
    if not path.is_file():
        return 0
    try:
        _, meta = load_tensors(path)
    except DamagedFileError:
        return 0
    return int((meta or {}).get("step", 0))


# --------------------------------------------------------------------------- student files


def describe_student(student: nn.Module) -> dict:
    """What `create_student` needs to rebuild `student` (stored with its weights)."""
    meta: dict = {}
    if hasattr(student, "name"):
        meta["arch"] = student.name
    if hasattr(student, "head"):
        meta["num_classes"] = student.head.out_features
    backbone = getattr(student, "backbone", None)
    for key in ("image_size", "pool"):
        if getattr(backbone, key, None) is not None:
            meta[key] = getattr(backbone, key)
    return meta


def save_student(path: str | Path, student: nn.Module, meta: dict | None = None) -> None:
    """Student weights as safetensors with the metadata `load_student` rebuilds it from."""
    state = {k: v.contiguous() for k, v in student.state_dict().items()}
    save_tensors(path, state, {**describe_student(student), **(meta or {})})


def load_student(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a student saved by `save_student`/`distill` (never unpickles)."""
    from tint.students import create_student

    tensors, meta = load_tensors(path)
    meta = meta or {}
    if "arch" not in meta or "num_classes" not in meta:
        raise TintError(f"{path}: no student architecture in its metadata; it was not written "
                        "by tint: give a student.safetensors written by `tint run` or `tint fit`")
    kwargs = {k: meta[k] for k in ("image_size", "pool") if k in meta}
    student = create_student(meta["arch"], int(meta["num_classes"]), **kwargs)
    try:
        student.load_state_dict(tensors)
    except RuntimeError as err:
        raise TintError(f"{path}: weights do not fit a {meta['arch']} student ({err})") from err
    student.eval()
    return student, meta
