"""Deterministic DDIM (eta 0): one step, inversion and sampling with classifier-free guidance.

Indexing used everywhere in tint (null-text inversion and generation rely on it):

- ``schedule = ddim_schedule(scheduler, n)`` gives ``timesteps[0] > ... > timesteps[n-1]``,
  exactly the scheduler's ``set_timesteps(n)`` (its "leading"/"trailing"/"linspace" spacing),
  and ``alphas[i]`` = alpha_bar at ``timesteps[i]``, with ``alphas[n]`` = the clean level
  (``final_alpha_cumprod``: 1 with ``set_alpha_to_one``, else alpha_bar[0]).
- Sampling step ``i`` (i = 0..n-1) takes the latent at level ``i`` to level ``i + 1`` using
  the model evaluated at ``timesteps[i]``.
- The inversion trajectory ``traj = ddim_invert(...)`` is ``[z_0, ..., z_T]`` (n + 1
  latents, clean first); ``traj[j]`` sits at level ``n - j``. So sampling step ``i`` starts
  from ``traj[n - i]`` and should land on ``traj[n - i - 1]``.
- Per-step unconditional embeddings ``[n, B, L, D]`` (from null-text inversion) are indexed
  by the sampling step ``i``: entry 0 is used first, at ``timesteps[0]`` (the noisiest).

The model output is eps or v, as the scheduler's ``prediction_type`` says. CFG mixes model
outputs linearly (valid for both). An inversion step is the exact inverse of a sampling step
under the usual DDIM-inversion assumption that the model output at the unknown next latent
equals the one at the current latent; for v-models this keeps the step well defined at zero
terminal SNR (alpha_bar = 0 at t = 999), where the eps form would divide by zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tint.errors import TintError


@dataclass(frozen=True)
class DDIMSchedule:
    """The n sampling timesteps (descending) and alpha_bar at the n + 1 levels."""

    timesteps: torch.Tensor  # [n] long
    alphas: torch.Tensor  # [n + 1] float64

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())


def ddim_schedule(scheduler, num_steps: int) -> DDIMSchedule:
    """Timesteps from the scheduler's own spacing; alphas from its alphas_cumprod."""
    if num_steps < 1:
        raise TintError(f"number of DDIM steps must be >= 1, got {num_steps}")
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.detach().cpu().long().clone()
    cumprod = scheduler.alphas_cumprod.detach().cpu().double()
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64).reshape(1)
    return DDIMSchedule(timesteps, torch.cat([cumprod[timesteps], final]))


def _coefficients(alpha: torch.Tensor | float) -> tuple[float, float]:
    alpha = float(alpha)
    return alpha**0.5, max(1.0 - alpha, 0.0) ** 0.5


def predict_eps_and_x0(
    backbone, z: torch.Tensor, t: torch.Tensor | int, pred: torch.Tensor,
    alpha: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a model output (eps or v, per the backbone) at latent z, timestep t into
    (eps, x0) estimates. `alpha` overrides alpha_bar(t) (used by the inversion step)."""
    if alpha is None:
        alpha = float(backbone.scheduler.alphas_cumprod[int(t)])
    a, s = _coefficients(alpha)
    kind = backbone.prediction_type
    if kind == "epsilon":
        return pred, (z - s * pred) / max(a, 1e-8)
    if kind == "v_prediction":
        return a * pred + s * z, a * z - s * pred
    raise TintError(f"prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")


def ddim_step(
    backbone, z: torch.Tensor, pred: torch.Tensor, alpha_t: float, alpha_prev: float
) -> torch.Tensor:
    """One deterministic sampling step from alpha_bar `alpha_t` to `alpha_prev` (less noisy)."""
    eps, x0 = predict_eps_and_x0(backbone, z, 0, pred, alpha=alpha_t)
    a_prev, s_prev = _coefficients(alpha_prev)
    return a_prev * x0 + s_prev * eps


def ddim_inverse_step(
    backbone, z: torch.Tensor, pred: torch.Tensor, alpha_cur: float, alpha_next: float
) -> torch.Tensor:
    """Solve ``ddim_step(z_next, pred, alpha_next, alpha_cur) = z`` for z_next (more noisy)."""
    a_cur, s_cur = _coefficients(alpha_cur)
    a_next, s_next = _coefficients(alpha_next)
    kind = backbone.prediction_type
    if kind == "epsilon":
        return a_next * (z - s_cur * pred) / a_cur + s_next * pred
    if kind == "v_prediction":
        # ddim_step for v: z = A z_next + B v with A = cos(angle between levels) > 0.
        scale = a_cur * a_next + s_cur * s_next
        shift = s_cur * a_next - a_cur * s_next
        return (z - shift * pred) / scale
    raise TintError(f"prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")


def unet_output(backbone, z: torch.Tensor, t: torch.Tensor | int, text: torch.Tensor) -> torch.Tensor:
    """The raw model output (eps or v) for latents [B,...] and text states [B,L,D], float32."""
    timesteps = torch.as_tensor(t, device=backbone.device).long().reshape(-1)
    if timesteps.numel() == 1:
        timesteps = timesteps.expand(z.shape[0])
    out = backbone.unet(
        z.to(backbone.device, backbone.dtype),
        timesteps,
        encoder_hidden_states=text.to(backbone.device, backbone.dtype),
    ).sample
    return out.float()


@contextmanager
def frozen_parameters(*modules: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients inside (we differentiate w.r.t. embeddings only); the
    modules' requires_grad flags are restored afterwards."""
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    try:
        for module in modules:
            module.requires_grad_(False)
        yield
    finally:
        for module, module_flags in zip(modules, flags, strict=True):
            for param, flag in zip(module.parameters(), module_flags, strict=True):
                param.requires_grad_(flag)


def _match_batch(emb: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if emb.ndim != 3:
        raise TintError(f"{name} embeddings must be [B, L, D], got shape {tuple(emb.shape)}")
    if emb.shape[0] == batch:
        return emb
    if emb.shape[0] == 1:
        return emb.expand(batch, -1, -1)
    raise TintError(f"{name} embeddings have batch {emb.shape[0]}, latents have {batch}")


def guided_prediction(
    backbone,
    z: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """CFG model output u + g (c - u) (Eq. 2), the pair in ONE UNet call (batch concat).

    cond / uncond are per-sample [B, L, D] (batch 1 broadcasts). With guidance 1 (or no
    uncond) only the conditional half is run.
    """
    batch = z.shape[0]
    cond = _match_batch(cond, batch, "conditional")
    if uncond is None or guidance == 1.0:
        return unet_output(backbone, z, t, cond)
    uncond = _match_batch(uncond, batch, "unconditional")
    both = unet_output(backbone, torch.cat([z, z]), t, torch.cat([uncond, cond]))
    out_uncond, out_cond = both.chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


@torch.no_grad()
def ddim_invert(
    backbone,
    z0: torch.Tensor,
    cond: torch.Tensor,
    num_steps: int = 50,
    guidance: float = 1.0,
    uncond: torch.Tensor | None = None,
    progress: bool = False,
) -> list[torch.Tensor]:
    """DDIM inversion z_0 -> z_T; returns the trajectory [z_0, ..., z_T] (float32).

    Inversion step j (level n-j -> n-j-1, i.e. reverse of sampling step n-1-j) evaluates the
    model at the current latent with the target level's timestep (Mokady et al.).
    """
    schedule = ddim_schedule(backbone.scheduler, num_steps)
    n = schedule.num_steps
    z = z0.float().to(backbone.device)
    trajectory = [z]
    for j in tqdm(range(n), desc="DDIM inversion", disable=not progress, leave=False):
        step = n - 1 - j  # the sampling step this inversion step undoes
        t = schedule.timesteps[step]
        pred = guided_prediction(backbone, z, t, cond, uncond, guidance)
        z = ddim_inverse_step(
            backbone, z, pred, schedule.alphas[step + 1], schedule.alphas[step]
        )
        trajectory.append(z)
    return trajectory


def _uncond_for_step(uncond: torch.Tensor | None, step: int, num_steps: int) -> torch.Tensor | None:
    """uncond is [B,L,D] (same at every step) or [n,B,L,D] indexed by sampling step."""
    if uncond is None or uncond.ndim == 3:
        return uncond
    if uncond.ndim != 4 or uncond.shape[0] != num_steps:
        raise TintError(
            f"per-step unconditional embeddings must be [{num_steps}, B, L, D] for {num_steps} "
            f"DDIM steps, got shape {tuple(uncond.shape)}"
        )
    return uncond[step]


@torch.no_grad()
def ddim_sample(
    backbone,
    zT: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float = 7.5,
    num_steps: int = 50,
    start_step: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM sampling with CFG from zT (at level `start_step`) down to z_0 (float32).

    `uncond` is [B,L,D] (used at every step) or per-step [num_steps,B,L,D] indexed by the
    absolute sampling step (entry i at timesteps[i]); `start_step` > 0 starts part-way, e.g.
    from ``traj[num_steps - start_step]`` of an inversion, still indexing uncond absolutely.
    """
    schedule = ddim_schedule(backbone.scheduler, num_steps)
    if not 0 <= start_step <= num_steps:
        raise TintError(f"start_step must be in [0, {num_steps}], got {start_step}")
    z = zT.float().to(backbone.device)
    steps = range(start_step, schedule.num_steps)
    for i in tqdm(steps, desc="DDIM sampling", disable=not progress, leave=False):
        u = _uncond_for_step(uncond, i, schedule.num_steps)
        pred = guided_prediction(backbone, z, schedule.timesteps[i], cond, u, guidance)
        z = ddim_step(backbone, z, pred, schedule.alphas[i], schedule.alphas[i + 1])
    return z
