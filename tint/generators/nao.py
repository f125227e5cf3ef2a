"""NAO + SeedSelect (Samuel et al., 2024a/b): the interface, and the norm-aware seed geometry.

The method, as the paper describes it (section 4): invert each support image to the noise
side of the diffusion model *with a text description of the class*, compute the centroid of
the inverted seeds with norm-aware optimisation (NAO), build paths between the centroid and
each inverted seed, pick seeds along the paths, and optimise each seed with SeedSelect, which
backpropagates a CLIP + VAE-latent similarity to the supports through the whole sampling
chain.

What this needs and why it cannot run here:
- **text descriptions of the novel classes** (``descriptions``): TINT's point is not to need
  them; our benchmarks' class names are folder names at best;
- **a CLIP model** (``clip_model``, a local transformers folder) for SeedSelect's loss; no
  CLIP weights exist on this machine;
- **SeedSelect itself**: gradient descent on the seed through all DDIM steps (the paper
  reports 34.2 s per image on an A40 against TINT's 1.01 s); not implemented in tint.

So ``specialize``/``generate`` raise a TintError saying exactly which of these is missing.
What *is* implemented (and tested) is the seed geometry NAO is built on, which needs only the
diffusion model: the chi-distribution norm prior of Gaussian seeds, the norm-aware centroid
and norm-aware interpolation paths (``norm_aware_centroid``, ``norm_aware_path``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tint.errors import TintError
from tint.generators.base import settings_from

NAME = "nao"
REQUIRED_TENSORS = ("seeds",)


@dataclass
class SpecializeSettings:
    descriptions: Mapping[str, str] = field(default_factory=dict)  # class -> text description
    clip_model: str | None = None  # local CLIP folder (transformers format) for SeedSelect
    num_steps: int = 50
    guidance: float = 7.5
    dataset_resolution: int | None = None


@dataclass
class GenerateSettings:
    seeds_per_path: int = 8  # seeds picked along each centroid -> support path
    seedselect_steps: int = 30
    batch_size: int = 1
    resolution: int | None = None


def missing_requirements(class_name: str, s: SpecializeSettings) -> list[str]:
    """What NAO+SeedSelect still needs for this class (empty: only SeedSelect is missing)."""
    missing = []
    if class_name not in s.descriptions:
        missing.append(f"a text description of class {class_name!r} (settings.descriptions)")
    if not s.clip_model or not Path(s.clip_model).is_dir():
        missing.append("a local CLIP model folder for SeedSelect's loss (settings.clip_model)")
    return missing


def _unavailable(class_name: str, s: SpecializeSettings) -> TintError:
    needs = missing_requirements(class_name, s)
    needs.append("SeedSelect (seed optimisation through the full sampling chain), which tint "
                 "does not implement: use the authors' code to generate images and pass them "
                 "to `tint fid` / the experiment runner as a folder of class sub-folders")
    return TintError("generator 'nao' (NAO+SeedSelect) cannot run here; it needs: "
                     + "; ".join(needs) + ". See docs/baselines.md")


def specialize(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
               settings: SpecializeSettings | dict | None = None) -> Path:
    raise _unavailable(class_name, settings_from(SpecializeSettings, settings))


def generate(backbone: Any, artifact_path: str | Path, n_images: int, out_dir: str | Path,
             seed: int = 0, settings: GenerateSettings | dict | None = None) -> list[Path]:
    settings_from(GenerateSettings, settings)
    raise TintError(f"{artifact_path}: generator 'nao' (NAO+SeedSelect) cannot generate in tint: "
                    "it needs class text descriptions, a CLIP model and SeedSelect; "
                    "see docs/baselines.md")


# ---------------------------------------------------------------------------------------------
# Norm-aware seed geometry (NAO's prior), usable without CLIP


def chi_log_pdf(norm: torch.Tensor, dim: int) -> torch.Tensor:
    """log density of |n| for n ~ N(0, I_dim) (the chi distribution with `dim` dof)."""
    r = norm.double()
    log_norm = (1 - dim / 2) * math.log(2) - math.lgamma(dim / 2)
    return log_norm + (dim - 1) * torch.log(r) - r**2 / 2


def typical_norm(dim: int) -> float:
    """The mode of the chi distribution: where Gaussian seeds' norms concentrate."""
    return math.sqrt(dim - 1)


def norm_aware_centroid(seeds: torch.Tensor) -> torch.Tensor:
    """Centroid of seeds [K, ...]: the mean's direction at the most likely norm.

    The plain mean of K independent seeds has norm ~ sqrt(dim / K): far inside the shell
    where the model saw its inputs. NAO moves the centroid back to high likelihood; among
    points along the mean's direction the chi likelihood peaks at `typical_norm`.
    """
    if seeds.ndim < 2 or seeds.shape[0] < 1:
        raise TintError(f"seeds must be [K, ...] with K >= 1, got {tuple(seeds.shape)}")
    mean = seeds.double().mean(dim=0)
    norm = mean.norm()
    if norm == 0:
        raise TintError("the seeds' mean is zero: no centroid direction")
    return (mean / norm * typical_norm(mean.numel())).to(seeds.dtype)


def norm_aware_path(start: torch.Tensor, end: torch.Tensor, n_points: int) -> torch.Tensor:
    """n_points seeds from `start` to `end` (both included): the straight line's direction
    with the norm interpolated linearly, so no point falls into the low-likelihood centre
    that straight interpolation of two near-orthogonal seeds passes through."""
    if n_points < 2:
        raise TintError(f"a path needs at least 2 points, got {n_points}")
    if start.shape != end.shape:
        raise TintError(f"path ends differ in shape: {tuple(start.shape)} vs {tuple(end.shape)}")
    t = torch.linspace(0, 1, n_points, dtype=torch.float64).view(-1, *([1] * start.ndim))
    a, b = start.double(), end.double()
    line = (1 - t) * a + t * b
    norms = (1 - t) * a.norm() + t * b.norm()
    flat = line.flatten(1).norm(dim=1).view_as(norms).clamp_min(1e-30)
    return (line / flat * norms).to(start.dtype)
