"""Student networks: Conv4 and ResNet12, created by name (timm-style registry).

A student is a feature extractor (``.backbone``) followed by a linear classifier
(``.head``). The backbone takes images as tint passes them everywhere, float32
``[B, 3, H, W]`` in ``[0, 1]``, and normalises them itself with fixed ImageNet mean/std
buffers, so a teacher or an exporter can reuse ``student.backbone`` without knowing
any preprocessing. Architecture choices are documented in docs/evaluation.md
("Students").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tint.errors import TintError
from tint.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

StudentBuilder = Callable[..., "Student"]
# name -> builder(num_classes, **kwargs), as every tint registry (tint.registry).
STUDENTS = Registry("student", {
    "conv4": "tint.students.models:conv4",
    "resnet12": "tint.students.models:resnet12",
})


def register_student(name: str) -> Callable[[StudentBuilder], StudentBuilder]:
    """Decorator: make a module-level builder available to `create_student(name, ...)`."""

    def decorate(builder: StudentBuilder) -> StudentBuilder:
        STUDENTS.register(name, f"{builder.__module__}:{builder.__qualname__}")
        return builder

    return decorate


def list_students() -> list[str]:
    return sorted(STUDENTS)


available_students = list_students


def create_student(name: str, num_classes: int, **kwargs) -> Student:
    """Build the student called `name` with a `num_classes`-way linear head."""
    key = name.lower()
    if key not in STUDENTS:
        raise TintError(f"unknown student {name!r}; choose one of: {', '.join(list_students())}")
    if num_classes < 1:
        raise TintError(f"student {name!r}: num_classes must be >= 1, got {num_classes}")
    return STUDENTS.load(key)(num_classes=num_classes, **kwargs)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BN running stats are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class Normalize(nn.Module):
    """Map [0, 1] images to ImageNet-standardised ones with fixed (non-trained) buffers."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Student(nn.Module):
    """Backbone (images in [0, 1] -> flat features) + linear head (features -> logits)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, name: str):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flat features [B, feature_dim] of images [B, 3, H, W] in [0, 1]."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def reset_head(self, num_classes: int) -> nn.Linear:
        """Replace the head by a fresh `num_classes`-way one (same device and dtype)."""
        old = self.head.weight
        self.head = nn.Linear(self.feature_dim, num_classes, device=old.device, dtype=old.dtype)
        return self.head


# ----------------------------------------------------------------------------- Conv4


def _conv4_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # Conv bias kept (as in the original ProtoNet Conv4) so the count matches its 113k.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Conv4Features(nn.Module):
    """Four conv3x3-BN-ReLU-maxpool blocks, then flatten (or global average pool).

    Flattening (the ProtoNet/paper choice) makes the feature size depend on the input
    side: 64*5*5 = 1600 at 84x84, 64*2*2 = 256 at 32x32. The backbone is therefore built
    for one `image_size` and refuses other sizes with a clear error instead of silently
    mis-shaping the head.
    """

    def __init__(self, image_size: int = 84, channels: int = 64, pool: str = "flatten"):
        super().__init__()
        if pool not in ("flatten", "avg"):
            raise TintError(f"conv4: pool must be 'flatten' or 'avg', got {pool!r}")
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise TintError(f"conv4: image_size {image_size} is too small (needs at least 16)")
        self.image_size = image_size
        self.pool = pool
        self.grid = side
        self.normalize = Normalize()
        self.blocks = nn.Sequential(
            _conv4_block(3, channels),
            _conv4_block(channels, channels),
            _conv4_block(channels, channels),
            _conv4_block(channels, channels),
        )
        self.feature_dim = channels * side * side if pool == "flatten" else channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.blocks(self.normalize(x))
        if self.pool == "avg":
            return fmap.mean(dim=(2, 3))
        if fmap.shape[-2:] != (self.grid, self.grid):
            raise TintError(
                f"conv4 was built for {self.image_size}x{self.image_size} inputs but got "
                f"{x.shape[-2]}x{x.shape[-1]}; create it with image_size={x.shape[-1]}"
            )
        return torch.flatten(fmap, 1)


def conv4(num_classes: int, image_size: int = 84, pool: str = "flatten") -> Student:
    backbone = Conv4Features(image_size=image_size, pool=pool)
    _init_weights(backbone)
    return Student(backbone, backbone.feature_dim, num_classes, name="conv4")


# ----------------------------------------------------------------------------- ResNet12


def _activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    raise TintError(f"resnet12: activation must be 'relu' or 'leaky_relu', got {kind!r}")


class ResidualModule(nn.Module):
    """Three conv3x3-BN(-act) blocks; a 1x1 conv+BN shortcut joins before the last
    activation (as the paper describes); then 2x2 max pooling halves the scale."""

    def __init__(self, in_channels: int, out_channels: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act = _activation(activation)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))
        return self.pool(out)


class ResNet12Features(nn.Module):
    """Four residual modules (64-128-256-512 by default), then global average pooling,
    so the feature size (512) is the same at every input resolution."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), activation: str = "relu"):
        super().__init__()
        self.normalize = Normalize()
        modules = []
        in_channels = 3
        for width in widths:
            modules.append(ResidualModule(in_channels, width, activation))
            in_channels = width
        self.layers = nn.Sequential(*modules)
        self.feature_dim = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.normalize(x)).mean(dim=(2, 3))


def resnet12(
    num_classes: int,
    widths: tuple[int, ...] = (64, 128, 256, 512),
    activation: str = "relu",
    image_size: int | None = None,
) -> Student:
    """`image_size` is accepted (and ignored) so callers can pass it to any student."""
    del image_size
    backbone = ResNet12Features(widths=tuple(widths), activation=activation)
    _init_weights(backbone)
    return Student(backbone, backbone.feature_dim, num_classes, name="resnet12")


def _init_weights(module: nn.Module) -> None:
    """He initialisation for convs; BN starts as identity (weight 1, bias 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
