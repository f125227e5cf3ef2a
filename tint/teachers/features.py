"""The one shape every teacher backbone has: `FeatureBackbone`, [0, 1] images of any size
in, one feature vector per image out (the network's own resize and normalisation inside).

Kept apart from the loaders by name (tint.teachers.backbones), so that builders elsewhere
(tint.testing's random tiny ViT) make this shape without importing the module whose
registry names them: the imports run one way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tint.errors import TintError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureBackbone(nn.Module):
    """Wraps a network so that it maps [0,1] images of any size to ``[B, feature_dim]``."""

    def __init__(self, name: str, network: nn.Module, feature_dim: int, input_size: int,
                 features_fn, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.name = name
        self.network = network
        self.feature_dim = feature_dim
        self.input_size = input_size
        self._features_fn = features_fn
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x01: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Features of [0,1] images resized to `size` px (None: the pretraining size; a
        smaller one is cheaper, e.g. for an online teacher: benchmarks/teacher_input_size.py)."""
        if x01.dim() != 4 or x01.shape[1] != 3:
            raise TintError(f"teacher backbone {self.name}: expected images [B,3,H,W], "
                            f"got shape {tuple(x01.shape)}")
        size = size or self.input_size
        if x01.shape[-2:] != (size, size):
            # Pretrained networks see objects at the scale they were trained on; small
            # few-shot images (84 px) are upsampled rather than fed at their own size.
            x01 = F.interpolate(x01, size=(size, size), mode="bilinear",
                                align_corners=False, antialias=True)
        x = (x01 - self.mean) / self.std
        return self._features_fn(self.network, x)


def vit_cls_features(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # another input size than pretraining (an online teacher's): interpolated positions
    other_size = x.shape[-1] != network.config.image_size
    return network(pixel_values=x, interpolate_pos_encoding=other_size).last_hidden_state[:, 0]
