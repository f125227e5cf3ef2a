"""Resolution bridge: dataset-resolution images to the diffusion model's resolution and back.

Few-shot datasets are tiny (84x84) while Stable Diffusion works at 512x512. The paper found
that a plain bilinear upsampling makes textual inversion copy the upsampling artifacts, so it
goes 84 -> 96 (bilinear) -> x4 super-resolution -> 384 -> 512 (bilinear) (appendix B.2).
This module holds that chain with a pluggable super-resolution step; bilinear-only (no
super-resolver) is the paper's ablation. When the model is not larger than the dataset
images (e.g. our own 32px generator on 84px images) the chain is a single resize.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from tint.errors import TintError

PAPER_STEPS: tuple[int | str, ...] = (96, "sr", 384)


@runtime_checkable
class SuperResolver(Protocol):
    """Upscales images: ``[B,3,h,w]`` in [0,1] -> ``[B,3,scale*h,scale*w]`` in [0,1]."""

    scale: int

    def __call__(self, x01: torch.Tensor) -> torch.Tensor: ...


def resize(x01: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize square images; antialiased when shrinking so small outputs do not alias."""
    if x01.shape[-1] == size and x01.shape[-2] == size:
        return x01
    shrinking = size < min(x01.shape[-2:])
    out = F.interpolate(x01, size=(size, size), mode=mode, align_corners=False, antialias=shrinking)
    return out.clamp(0.0, 1.0)


class InterpolationSuperResolver:
    """The built-in stand-in for a learned super-resolver ("bilinear" or "bicubic")."""

    def __init__(self, mode: str = "bilinear", scale: int = 4) -> None:
        if mode not in ("bilinear", "bicubic"):
            raise TintError(f"super-resolver {mode!r}: built-ins are 'bilinear' and 'bicubic'")
        self.mode, self.scale = mode, scale

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        return resize(x01, x01.shape[-1] * self.scale, self.mode)

    def __repr__(self) -> str:
        return f"InterpolationSuperResolver({self.mode!r}, scale={self.scale})"


class TorchScriptSuperResolver:
    """A user-supplied TorchScript module mapping [B,3,h,w] in [0,1] to x`scale` images."""

    def __init__(self, path: Path, scale: int = 4, device: str | torch.device = "cpu") -> None:
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated but still the portable format
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as err:
            raise TintError(f"{path}: not a TorchScript super-resolution model ({err})") from err
        self.path, self.scale, self.device = path, scale, torch.device(device)

    @torch.no_grad()
    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        out = self.module(x01.to(self.device)).to(x01.device, torch.float32)
        return _checked_upscale(x01, out, self.scale, str(self.path))

    def __repr__(self) -> str:
        return f"TorchScriptSuperResolver({str(self.path)!r})"


class DiffusersSuperResolver:
    """A local diffusers upscaling pipeline (e.g. ``StableDiffusionUpscalePipeline``, x4)."""

    def __init__(self, folder: Path, scale: int = 4, num_inference_steps: int = 25,
                 device: str | torch.device = "cpu") -> None:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise TintError(f"{folder}: cannot load a diffusers super-resolution pipeline ({err})") from err
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.folder, self.scale, self.steps = folder, scale, num_inference_steps

    @torch.no_grad()
    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        params = _call_parameters(self.pipe)
        # LDM super-resolution takes tensors in [-1, 1]; SD's upscaler preprocesses [0, 1]
        ldm = type(self.pipe).__name__.startswith("LDM")
        kwargs: dict = {"image": x01 * 2 - 1 if ldm else x01,
                        "num_inference_steps": self.steps, "output_type": "pt"}
        if "prompt" in params:  # text-guided upscalers want a prompt
            kwargs["prompt"] = [""] * x01.shape[0]
        if "generator" in params:  # deterministic: the same supports give the same artifact
            kwargs["generator"] = torch.Generator(self.pipe.device).manual_seed(0)
        out = _as_nchw(self.pipe(**kwargs).images).to(x01.device, torch.float32)
        return _checked_upscale(x01, out, self.scale, str(self.folder))

    def __repr__(self) -> str:
        return f"DiffusersSuperResolver({str(self.folder)!r})"


def _call_parameters(pipe: object) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


def _as_nchw(images: object) -> torch.Tensor:
    """Pipeline outputs come as NCHW tensors, NHWC arrays or PIL lists: make them NCHW."""
    import numpy as np

    if isinstance(images, list):
        images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    out = torch.as_tensor(images)
    if out.ndim == 4 and out.shape[1] != 3 and out.shape[-1] == 3:
        out = out.permute(0, 3, 1, 2)
    return out


def _checked_upscale(x01: torch.Tensor, out: torch.Tensor, scale: int, name: str) -> torch.Tensor:
    want = (x01.shape[0], 3, x01.shape[-2] * scale, x01.shape[-1] * scale)
    if tuple(out.shape) != want:
        raise TintError(f"super-resolver {name}: returned shape {tuple(out.shape)}, expected {want}")
    return out.clamp(0.0, 1.0)


def load_super_resolver(spec: str | None, device: str | torch.device = "cpu") -> SuperResolver | None:
    """Resolve a super-resolver spec.

    ``None``/"none": no super-resolution (the bilinear-only ablation); "bilinear"/"bicubic":
    interpolation x4; a file: a TorchScript module (loaded with ``torch.jit.load``, never
    unpickled); a folder: a local diffusers pipeline (``local_files_only``).
    """
    if spec is None or spec == "none":
        return None
    if spec in ("bilinear", "bicubic"):
        return InterpolationSuperResolver(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return TorchScriptSuperResolver(path, device=device)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise TintError(f"{path}: not a diffusers pipeline folder (no model_index.json); "
                            "pass a TorchScript file, a diffusers folder, 'bilinear' or 'bicubic'")
        return DiffusersSuperResolver(path, device=device)
    raise TintError(f"super-resolver {spec!r}: no such file or folder; pass a TorchScript file, "
                    "a local diffusers upscaler folder, 'bilinear', 'bicubic' or 'none'")


class ResolutionBridge:
    """Dataset images <-> model resolution.

    ``steps`` is the paper's chain for a 512px model: integers are bilinear resizes, "sr" is
    the super-resolver. It adapts to other sizes: the size fed to the super-resolver is the
    chain's value clamped to [dataset size, model size / scale], and a resize that would not
    move monotonically towards the model size is skipped; a final resize lands on the model
    size. Without a super-resolver, or when the model is not larger than the input, it is one
    bilinear resize.
    """

    def __init__(self, model_resolution: int, steps: Sequence[int | str] = PAPER_STEPS,
                 super_resolver: SuperResolver | None = None) -> None:
        if model_resolution < 1:
            raise TintError(f"model resolution {model_resolution}: must be positive")
        for step in steps:
            if step != "sr" and not (isinstance(step, int) and step > 0):
                raise TintError(f"bridge step {step!r}: use positive integers and 'sr'")
        self.model_resolution = model_resolution
        self.steps = tuple(steps)
        self.super_resolver = super_resolver

    def plan(self, size: int) -> list[int | str]:
        """The operations `to_model` applies to a `size`-pixel image (for docs and tests)."""
        target = self.model_resolution
        if target <= size or self.super_resolver is None or "sr" not in self.steps:
            return [target] if target != size else []
        scale = self.super_resolver.scale
        ops: list[int | str] = []
        current = size
        sr_at = self.steps.index("sr")
        before = [s for s in self.steps[:sr_at] if isinstance(s, int)]
        sr_input = before[-1] if before else size
        sr_input = max(size, min(sr_input, math.ceil(target / scale)))
        if sr_input != current:
            ops.append(sr_input)
        ops.append("sr")
        current = sr_input * scale
        for step in self.steps[sr_at + 1:]:
            if step == "sr" or step == current:
                continue
            if min(current, target) <= step <= max(current, target):
                ops.append(step)
                current = step
        if current != target:
            ops.append(target)
        return ops

    def to_model(self, x01: torch.Tensor) -> torch.Tensor:
        """[B,3,r,r] in [0,1] -> [B,3,M,M] in [0,1]."""
        _check_images(x01)
        for op in self.plan(x01.shape[-1]):
            x01 = self.super_resolver(x01) if op == "sr" else resize(x01, int(op))
        return x01

    @staticmethod
    def to_dataset(x01: torch.Tensor, resolution: int) -> torch.Tensor:
        """[B,3,M,M] -> [B,3,r,r]: antialiased bilinear, as the dataset loader would resize."""
        _check_images(x01)
        return resize(x01.float(), resolution)

    def __repr__(self) -> str:
        return (f"ResolutionBridge({self.model_resolution}, steps={self.steps}, "
                f"super_resolver={self.super_resolver!r})")


def _check_images(x01: torch.Tensor) -> None:
    if not isinstance(x01, torch.Tensor) or x01.ndim != 4 or x01.shape[1] != 3:
        shape = tuple(x01.shape) if isinstance(x01, torch.Tensor) else type(x01).__name__
        raise TintError(f"images: expected a float tensor [B,3,H,W] in [0,1] (RGB), got {shape}")
    if x01.shape[-1] != x01.shape[-2]:
        raise TintError(f"images: expected square images, got {x01.shape[-2]}x{x01.shape[-1]}")
