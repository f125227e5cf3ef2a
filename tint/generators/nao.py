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

So with the default ``seedselect=True``, ``specialize`` raises a TintError listing exactly
what is missing. With ``seedselect=False`` (and a description, or ``description_template``
to build one from the class name) it runs the part of the method that needs only the
diffusion model, clearly labelled as *NAO seeds without SeedSelect* in artifacts and
manifests (``"seedselect": false``):

    specialize: supports --bridge--> DDIM-invert under the description (guidance 1) -> seeds
    generate, per image i (own RNG): k ~ U{1..K}, t ~ U(0, 1),
        seed = point t of the norm-aware path centroid -> seed_k,
        DDIM + CFG with the description against the empty prompt.

The geometry: the chi-distribution norm prior of Gaussian seeds, the norm-aware centroid and
norm-aware paths (``norm_aware_centroid``, ``norm_aware_path``); NAO proper *optimises*
centroid and paths under that prior, we use the closed forms described at each function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tint.errors import TintError
from tint.generators.base import (
    BridgeSettings,
    SamplingSettings,
    artifact_path,
    batches,
    check_count,
    class_text,
    image_rng,
    image_seed,
    load_artifact,
    manifest_paths,
    missing_indices,
    save_artifact,
    settings_dict,
    settings_from,
    validate_support,
    write_generated,
)

NAME = "nao"
REQUIRED_TENSORS = ("seeds",)
MAY_RETURN_FEWER = False


@dataclass
class SpecializeSettings(BridgeSettings):
    """The class descriptions NAO needs, SeedSelect's CLIP model, the bridge (`BridgeSettings`)."""

    descriptions: Mapping[str, str] = field(default_factory=dict)  # class -> text description
    description_template: str | None = None  # e.g. "a photo of a {class_name}": from names
    clip_model: str | None = None  # local CLIP folder (transformers format) for SeedSelect
    seedselect: bool = True  # False: NAO seeds only (clearly NOT the paper's NAO+SS)


@dataclass
class GenerateSettings(SamplingSettings):
    negative_prompt: str = ""


def class_description(class_name: str, s: SpecializeSettings) -> str | None:
    if class_name in s.descriptions:
        return s.descriptions[class_name]
    if s.description_template:
        return class_text(class_name, s.description_template)
    return None


def missing_requirements(class_name: str, s: SpecializeSettings) -> list[str]:
    """What NAO+SeedSelect still needs for this class."""
    missing = []
    if class_description(class_name, s) is None:
        missing.append(f"a text description of class {class_name!r} (settings.descriptions, "
                       "or settings.description_template to use class names)")
    if s.seedselect and (not s.clip_model or not Path(s.clip_model).is_dir()):
        missing.append("a local CLIP model folder for SeedSelect's loss (settings.clip_model)")
    if s.seedselect:
        missing.append("SeedSelect (seed optimisation through the full sampling chain), which "
                       "tint does not implement: use the authors' code and pass its images to "
                       "`tint fid` / the experiment runner as a folder of class sub-folders, or "
                       "set seedselect=False for NAO seeds without SeedSelect")
    return missing


def specialize(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
               settings: SpecializeSettings | dict | None = None) -> Path:
    """NAO seeds: DDIM-invert each support under the class description (guidance 1)."""
    s = settings_from(SpecializeSettings, settings)
    missing = missing_requirements(class_name, s)
    if missing:
        raise TintError("generator 'nao' (NAO+SeedSelect) cannot run here; it needs: "
                        + "; ".join(missing) + ". See docs/baselines.md")
    from tint.diffusion.bridge import ResolutionBridge, load_super_resolver
    from tint.diffusion.ddim import ddim_invert

    support = validate_support(support, class_name, s.dataset_resolution)
    bridge = ResolutionBridge(backbone.resolution, s.bridge_steps,
                              load_super_resolver(s.super_resolver, backbone.device))
    prompt = class_description(class_name, s)
    cond = backbone.encode_prompt([prompt])
    z0 = backbone.encode_images(bridge.to_model(support)).float()
    seeds = ddim_invert(backbone, z0, cond, num_steps=s.num_steps, progress=s.progress)[-1]
    meta = {"generator": NAME, "class": class_name, "prompt": prompt, "guidance": s.guidance,
            "num_steps": s.num_steps, "support_count": int(support.shape[0]),
            "dataset_resolution": int(support.shape[-1]), "seedselect": False,
            "latent_shape": list(backbone.latent_shape), "settings": settings_dict(s),
            "backbone": s.backbone}
    return save_artifact(artifact_path(out_dir, class_name), {"seeds": seeds.cpu()}, meta)


def nao_seed(seeds: torch.Tensor, centroid: torch.Tensor, rng: torch.Generator) -> tuple[int, float, torch.Tensor]:
    """One seed on a norm-aware path centroid -> seed k, k and the position t both random."""
    k = int(torch.randint(seeds.shape[0], (1,), generator=rng))
    t = float(torch.rand(1, generator=rng))
    return k, t, norm_aware_point(centroid, seeds[k], t)


def generate(backbone: Any, artifact_path: str | Path, n_images: int, out_dir: str | Path,
             seed: int = 0, settings: GenerateSettings | dict | None = None) -> list[Path]:
    """Images from seeds on the norm-aware paths between the seeds' centroid and each seed,
    DDIM + CFG with the class description (no SeedSelect: see the module docstring)."""
    from tint.diffusion.bridge import ResolutionBridge
    from tint.diffusion.ddim import ddim_sample

    s = settings_from(GenerateSettings, settings)
    check_count(n_images)
    tensors, meta = load_artifact(artifact_path, REQUIRED_TENSORS, generator=NAME)
    seeds = tensors["seeds"]
    if tuple(seeds.shape[1:]) != tuple(backbone.latent_shape):
        raise TintError(f"{artifact_path}: seeds {tuple(seeds.shape[1:])} do not fit the "
                        f"backbone's latents {tuple(backbone.latent_shape)}")
    class_name, out_dir = meta["class"], Path(out_dir)
    resolution = s.resolution or int(meta["dataset_resolution"])
    guidance = float(meta["guidance"] if s.guidance is None else s.guidance)
    todo = missing_indices(out_dir, class_name, n_images)
    if not todo:
        return manifest_paths(out_dir, class_name, n_images)
    centroid = norm_aware_centroid(seeds)
    cond = backbone.encode_prompt([meta["prompt"]])
    uncond = backbone.encode_prompt([s.negative_prompt])
    for batch in batches(todo, s.batch_size, f"nao {class_name}", s.progress):
        draws = [nao_seed(seeds, centroid, image_rng(seed, class_name, i)) for i in batch]
        z = torch.stack([d[2] for d in draws]).to(backbone.device)
        latents = ddim_sample(backbone, z, cond, uncond, guidance, int(meta["num_steps"]))
        images = ResolutionBridge.to_dataset(backbone.decode_latents(latents), resolution)
        rows = [{"k": k, "path_t": t, "seed": seed, "image_seed": image_seed(seed, class_name, i),
                 "generator": NAME, "seedselect": False} for i, (k, t, _) in zip(batch, draws, strict=True)]
        write_generated(out_dir, class_name, batch, images, rows)
    return manifest_paths(out_dir, class_name, n_images)


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
    return torch.stack([norm_aware_point(start, end, float(t))
                        for t in torch.linspace(0, 1, n_points, dtype=torch.float64)])


def norm_aware_point(start: torch.Tensor, end: torch.Tensor, t: float) -> torch.Tensor:
    """The point at fraction t of the norm-aware path (t = 0: start, t = 1: end)."""
    a, b = start.double(), end.double()
    line = (1 - t) * a + t * b
    norm = (1 - t) * a.norm() + t * b.norm()
    return (line / line.norm().clamp_min(1e-30) * norm).to(start.dtype)
