"""Null-text inversion (Mokady et al., 2023), conditioned on a textual-inversion embedding.

Plain DDIM inversion is exact only without guidance: sampling the inverted z_T with CFG 7.5
drifts away from the input. Null-text inversion keeps z_T and the conditional embedding and
instead optimises one unconditional embedding u_t per sampling step, so that the guided step
from the current latent lands on the (guidance-1) inversion trajectory:

1. traj = DDIM-invert(z_0) under cond, guidance 1  -> [z_0, ..., z_T]
2. z = z_T; for sampling step i = 0..n-1 (at timesteps[i]):
   minimise |ddim_step(z, CFG(u, cond)) - traj[n-i-1]|^2 over u (Adam, `inner_steps`),
   starting from the previous step's u; store u_i; advance z with the optimised u.

The result's ``uncond_embeddings[i]`` is u for sampling step i, the order
`tint.diffusion.ddim.ddim_sample` expects for per-step embeddings.

`null_text_inversion_batched` inverts the K supports of a class together: one UNet call per
inner step for all K still optimising, the loss a sum of per-sample means (so each u_k gets
exactly its own gradient, and Adam's per-element state keeps the samples apart), and a
sample that meets its early-stop threshold is masked out of later inner steps (its u is
restored after each optimizer step). It computes what K one-at-a-time calls compute, up to
floating-point rounding (tests/test_ddim_nti.py states the measured difference).

Precision: float32 weights and arithmetic (TF32 matmuls allowed on CUDA); docs/diffusion.md
records why (bf16 autocast measured against float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from tint.devices import allow_tf32
from tint.diffusion.ddim import (
    ddim_invert,
    ddim_schedule,
    ddim_step,
    frozen_parameters,
    unet_output,
)
from tint.errors import TintError


@dataclass
class NullTextConfig:
    """Defaults of the paper (Appendix B.2: 10 Adam iterations per step, Mokady's schedule).

    schedule "decay": lr * (1 - i/100) at sampling step i and early stop of the inner loop
    when loss < early_stop_eps + i * 2e-5 (Mokady et al.'s code). "constant": constant lr and
    all inner steps (the authors' later code). With random weights use lr 0.1 (DESIGN.md).
    """

    num_steps: int = 50
    guidance: float = 7.5
    inner_steps: int = 10
    lr: float = 1e-2
    schedule: str = "decay"  # "decay" | "constant"
    early_stop_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.schedule not in ("decay", "constant"):
            raise TintError(f"null-text schedule must be 'decay' or 'constant', got {self.schedule!r}")
        if self.inner_steps < 1 or self.num_steps < 1:
            raise TintError("null-text num_steps and inner_steps must be >= 1")

    def step_lr(self, step: int) -> float:
        return self.lr * (1.0 - step / 100.0) if self.schedule == "decay" else self.lr

    def stop_threshold(self, step: int) -> float | None:
        return self.early_stop_eps + step * 2e-5 if self.schedule == "decay" else None


@dataclass
class NullTextResult:
    z_T: torch.Tensor  # [1, C, h, w] float32: the DDIM-inverted latent
    uncond_embeddings: torch.Tensor  # [T, L, D] float32, index i = sampling step i
    trajectory_error: list[float] = field(default_factory=list)  # MSE to the inversion, per step
    inner_steps_used: list[int] = field(default_factory=list)


def null_text_inversion(
    backbone,
    z0: torch.Tensor,
    cond: torch.Tensor,
    uncond_init: torch.Tensor,
    config: NullTextConfig | None = None,
    progress: bool = False,
) -> NullTextResult:
    """Invert one latent z0 [1,C,h,w] under cond [1,L,D]; return z_T and u_1..T."""
    config = config or NullTextConfig()
    _check_inputs(backbone, z0, cond, uncond_init)
    device = backbone.device
    allow_tf32(device)
    cond = cond.to(device, torch.float32)
    trajectory = ddim_invert(backbone, z0.float(), cond, num_steps=config.num_steps)
    schedule = ddim_schedule(backbone.scheduler, config.num_steps)
    n = schedule.num_steps
    latent = trajectory[n]
    uncond = uncond_init.detach().to(device, torch.float32).clone()
    result = NullTextResult(z_T=trajectory[n].detach().cpu(), uncond_embeddings=torch.empty(0))
    embeddings = []
    with frozen_parameters(backbone.unet, backbone.text_encoder):
        for i in tqdm(range(n), desc="null-text inversion", disable=not progress, leave=False):
            t, target = schedule.timesteps[i], trajectory[n - i - 1]
            alphas = (schedule.alphas[i], schedule.alphas[i + 1])
            with torch.no_grad():
                out_cond = unet_output(backbone, latent, t, cond)
            uncond, used = _optimise_step(
                backbone, latent, t, alphas, out_cond, uncond, target, config, i
            )
            with torch.no_grad():
                guided = _guided(unet_output(backbone, latent, t, uncond), out_cond, config)
                latent = ddim_step(backbone, latent, guided, *alphas)
            error = float(torch.mean((latent - target) ** 2))
            if not math.isfinite(error):
                raise TintError(f"null-text inversion: non-finite latent at sampling step {i}")
            result.trajectory_error.append(error)
            result.inner_steps_used.append(used)
            embeddings.append(uncond[0].detach().cpu())
    result.uncond_embeddings = torch.stack(embeddings)
    return result


def _guided(out_uncond: torch.Tensor, out_cond: torch.Tensor, config: NullTextConfig) -> torch.Tensor:
    return out_uncond + config.guidance * (out_cond - out_uncond)


def _optimise_step(
    backbone, latent, t, alphas, out_cond, uncond, target, config: NullTextConfig, step: int
) -> tuple[torch.Tensor, int]:
    """Adam on u so that the CFG step from `latent` lands on `target`; start from `uncond`."""
    param = uncond.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([param], lr=config.step_lr(step))
    threshold = config.stop_threshold(step)
    used = 0
    for inner in range(config.inner_steps):
        guided = _guided(unet_output(backbone, latent, t, param), out_cond, config)
        loss = torch.mean((ddim_step(backbone, latent, guided, *alphas) - target) ** 2)
        if not torch.isfinite(loss):
            raise TintError(
                f"null-text inversion: loss is {loss.item()} at sampling step {step}, inner step "
                f"{inner}; the model or inputs produce NaN/inf (run in float32, check the images)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        used += 1
        if threshold is not None and loss.item() < threshold:
            break
    return param.detach(), used


def _check_inputs(backbone, z0, cond, uncond_init) -> None:
    _check_float32(backbone)
    if z0.ndim != 4 or z0.shape[0] != 1:
        raise TintError(f"null-text inversion takes one latent [1, C, h, w], got {tuple(z0.shape)}")
    for name, emb in (("cond", cond), ("uncond_init", uncond_init)):
        if emb.ndim != 3 or emb.shape[0] != 1:
            raise TintError(f"null-text inversion: {name} must be [1, L, D], got {tuple(emb.shape)}")


def _check_float32(backbone) -> None:
    if backbone.dtype != torch.float32:
        raise TintError(
            f"null-text inversion needs a float32 model (fp16 breaks it), got {backbone.dtype}; "
            "load the backbone with dtype=torch.float32"
        )


# --------------------------------------------------------------------------- batched


def null_text_inversion_batched(
    backbone,
    z0: torch.Tensor,
    cond: torch.Tensor,
    uncond_init: torch.Tensor,
    config: NullTextConfig | None = None,
    progress: bool = False,
) -> list[NullTextResult]:
    """Invert K latents z0 [K,C,h,w] together; the same results as K calls of
    `null_text_inversion` (up to rounding). cond / uncond_init are [1,L,D] or [K,L,D]."""
    config = config or NullTextConfig()
    count = _check_batched_inputs(backbone, z0, cond, uncond_init)
    device = backbone.device
    allow_tf32(device)
    cond = cond.to(device, torch.float32).expand(count, -1, -1)
    trajectory = ddim_invert(backbone, z0.float(), cond, num_steps=config.num_steps)
    schedule = ddim_schedule(backbone.scheduler, config.num_steps)
    n = schedule.num_steps
    latent = trajectory[n]
    uncond = uncond_init.detach().to(device, torch.float32).expand(count, -1, -1).clone()
    results = [NullTextResult(z_T=trajectory[n][k:k + 1].detach().cpu(),
                              uncond_embeddings=torch.empty(0)) for k in range(count)]
    embeddings = []
    with frozen_parameters(backbone.unet, backbone.text_encoder):
        for i in tqdm(range(n), desc="null-text inversion (batched)", disable=not progress,
                      leave=False):
            t, target = schedule.timesteps[i], trajectory[n - i - 1]
            alphas = (schedule.alphas[i], schedule.alphas[i + 1])
            with torch.no_grad():
                out_cond = unet_output(backbone, latent, t, cond)
            uncond, used = _optimise_step_batched(
                backbone, latent, t, alphas, out_cond, uncond, target, config, i
            )
            with torch.no_grad():
                guided = _guided(unet_output(backbone, latent, t, uncond), out_cond, config)
                latent = ddim_step(backbone, latent, guided, *alphas)
            errors = _per_sample_mse(latent, target).tolist()
            if not all(math.isfinite(e) for e in errors):
                raise TintError(f"null-text inversion: non-finite latent at sampling step {i}")
            for k, result in enumerate(results):
                result.trajectory_error.append(errors[k])
                result.inner_steps_used.append(used[k])
            embeddings.append(uncond.detach().cpu())
    stacked = torch.stack(embeddings, dim=1)  # [K, T, L, D]
    for k, result in enumerate(results):
        result.uncond_embeddings = stacked[k]
    return results


def _per_sample_mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((x - target) ** 2).flatten(1).mean(dim=1)


def _optimise_step_batched(
    backbone, latent, t, alphas, out_cond, uncond, target, config: NullTextConfig, step: int
) -> tuple[torch.Tensor, list[int]]:
    """`_optimise_step` for K samples at once; a sample stops when its own loss does."""
    count = latent.shape[0]
    param = uncond.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([param], lr=config.step_lr(step))
    threshold = config.stop_threshold(step)
    active = torch.ones(count, dtype=torch.bool)
    used = [0] * count
    for inner in range(config.inner_steps):
        rows = active.nonzero().squeeze(1)
        index = rows.to(latent.device)
        guided = _guided(unet_output(backbone, latent[index], t, param[index]), out_cond[index],
                         config)
        stepped = ddim_step(backbone, latent[index], guided, *alphas)
        losses = _per_sample_mse(stepped, target[index])
        values = losses.detach().cpu()
        if not torch.isfinite(values).all():
            bad = float(values[~torch.isfinite(values)][0])
            raise TintError(
                f"null-text inversion: loss is {bad} at sampling step {step}, inner step "
                f"{inner}; the model or inputs produce NaN/inf (run in float32, check the images)"
            )
        kept = param.detach()[~active.to(param.device)].clone()
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # a sum of per-sample means: u_k gets only its own gradient
        optimizer.step()
        with torch.no_grad():  # Adam's momentum would still move finished samples
            param[~active.to(param.device)] = kept
        for k in rows.tolist():
            used[k] += 1
        if threshold is not None:
            active[rows[values < threshold]] = False
            if not active.any():
                break
    return param.detach(), used


def _check_batched_inputs(backbone, z0, cond, uncond_init) -> int:
    _check_float32(backbone)
    if z0.ndim != 4 or z0.shape[0] < 1:
        raise TintError(f"null-text inversion takes latents [K, C, h, w], got {tuple(z0.shape)}")
    count = int(z0.shape[0])
    for name, emb in (("cond", cond), ("uncond_init", uncond_init)):
        if emb.ndim != 3 or emb.shape[0] not in (1, count):
            raise TintError(f"null-text inversion: {name} must be [1, L, D] or [{count}, L, D], "
                            f"got {tuple(emb.shape)}")
    return count
