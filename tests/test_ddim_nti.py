"""DDIM step/inversion/sampling with CFG and null-text inversion, eps- and v-prediction."""

from __future__ import annotations

import pytest
import torch

from tint.diffusion.ddim import (
    ddim_inverse_step,
    ddim_invert,
    ddim_sample,
    ddim_schedule,
    ddim_step,
    guided_prediction,
    unet_output,
)
from tint.diffusion.null_text import (
    NullTextConfig,
    null_text_inversion,
    null_text_inversion_batched,
)
from tint.errors import TintError
from tint.testing import build_tiny_backbone

STEPS = 10
KINDS = {
    # SD-like: latent 8x8 through a tiny VAE, eps, "leading" spacing
    "eps-latent": {"resolution": 32},
    # our small generator's recipe: pixels 16x16, v, zero terminal SNR, "trailing" spacing
    "v-pixel": {"pixel_space": True, "prediction_type": "v_prediction", "resolution": 16},
}
# NTI inner steps in the reconstruction test (paper: 10). The eps model's steps move z far at
# high noise, so 15 keep a margin there (measured ratios over seeds: eps 270x-340x with 15,
# 120x with 10; v 1200x-1800x with 10).
NTI_INNER = {"eps-latent": 15, "v-pixel": 10}


@pytest.fixture(scope="module", params=sorted(KINDS))
def case(request, tmp_path_factory):
    """A tiny backbone, one image's latents, the class prompt and the empty prompt."""
    torch.set_num_threads(1)
    backbone = build_tiny_backbone(tmp_path_factory.mktemp(request.param), **KINDS[request.param])
    side = backbone.resolution
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    image = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")
    z0 = backbone.encode_images(image)
    cond = backbone.encode_prompt(["a photo of an object"])
    uncond = backbone.encode_prompt([""])
    return backbone, z0, cond, uncond, request.param


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.mean((a - b) ** 2))


def test_schedule_follows_the_scheduler_spacing(case):
    backbone, *_ = case
    schedule = ddim_schedule(backbone.scheduler, STEPS)
    backbone.scheduler.set_timesteps(STEPS)
    assert torch.equal(schedule.timesteps, backbone.scheduler.timesteps.long())
    assert schedule.alphas.shape == (STEPS + 1,)
    assert float(schedule.alphas[-1]) == pytest.approx(float(backbone.scheduler.final_alpha_cumprod))
    assert bool(torch.all(schedule.alphas[1:] > schedule.alphas[:-1]))  # noisy -> clean


def test_ddim_step_matches_diffusers_and_inverse_step_undoes_it(case):
    backbone, z0, *_ = case
    schedule = ddim_schedule(backbone.scheduler, STEPS)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(z0.shape, generator=generator)
    pred = torch.randn(z0.shape, generator=generator)
    for i in (0, 4, STEPS - 1):
        backbone.scheduler.set_timesteps(STEPS)
        ref = backbone.scheduler.step(pred, schedule.timesteps[i], z, eta=0.0).prev_sample
        ours = ddim_step(backbone, z, pred, schedule.alphas[i], schedule.alphas[i + 1])
        assert torch.allclose(ours, ref, atol=1e-5)
        back = ddim_inverse_step(backbone, ours, pred, schedule.alphas[i + 1], schedule.alphas[i])
        assert torch.allclose(back, z, atol=1e-4)


def test_guided_prediction_is_one_unet_call_with_per_sample_embeddings(case):
    backbone, z0, cond, uncond, _ = case
    z = torch.cat([z0, -z0])
    conds = torch.cat([cond, uncond])  # per-sample conditional embeddings
    unconds = torch.cat([uncond, cond])
    calls = []
    hook = backbone.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            guided = guided_prediction(backbone, z, 500, conds, unconds, 7.5)
    finally:
        hook.remove()
    assert calls == [4]
    with torch.no_grad():
        c, u = unet_output(backbone, z, 500, conds), unet_output(backbone, z, 500, unconds)
    assert torch.allclose(guided, u + 7.5 * (c - u), atol=1e-5)


def test_inversion_round_trip_needs_guidance_one(case):
    backbone, z0, cond, uncond, _ = case
    trajectory = ddim_invert(backbone, z0, cond, num_steps=STEPS)
    assert len(trajectory) == STEPS + 1 and torch.equal(trajectory[0], z0)
    plain = ddim_sample(backbone, trajectory[-1], cond, uncond, guidance=1.0, num_steps=STEPS)
    guided = ddim_sample(backbone, trajectory[-1], cond, uncond, guidance=7.5, num_steps=STEPS)
    scale = float(z0.var())
    assert mse(plain, z0) < 1e-2 * scale
    assert mse(guided, z0) > 10 * mse(plain, z0)
    assert mse(guided, z0) > 1e-2 * scale


def test_sampling_is_deterministic_and_can_start_part_way(case):
    backbone, z0, cond, uncond, _ = case
    trajectory = ddim_invert(backbone, z0, cond, num_steps=STEPS)
    full = ddim_sample(backbone, trajectory[-1], cond, uncond, guidance=1.0, num_steps=STEPS)
    again = ddim_sample(backbone, trajectory[-1], cond, uncond, guidance=1.0, num_steps=STEPS)
    assert torch.equal(full, again)
    start = 4  # trajectory[STEPS - start] sits at the level of sampling step `start`
    partial = ddim_sample(backbone, trajectory[STEPS - start], cond, uncond, guidance=1.0,
                          num_steps=STEPS, start_step=start)
    assert mse(partial, z0) < mse(full, z0) + 1e-6


def test_null_text_inversion_reconstructs_under_cfg(case):
    """After NTI, CFG 7.5 sampling with the optimised u_t reconstructs z_0 >= 100x better
    (MSE) than plain inversion. Random weights need lr 0.1 (DESIGN.md)."""
    backbone, z0, cond, uncond, kind = case
    config = NullTextConfig(num_steps=STEPS, guidance=7.5, inner_steps=NTI_INNER[kind], lr=0.1,
                            schedule="constant")
    result = null_text_inversion(backbone, z0, cond, uncond, config)
    assert result.z_T.shape == z0.shape
    assert result.uncond_embeddings.shape == (STEPS, *uncond.shape[1:])
    assert len(result.trajectory_error) == STEPS
    trajectory = ddim_invert(backbone, z0, cond, num_steps=STEPS)
    assert torch.allclose(result.z_T, trajectory[-1])
    plain = ddim_sample(backbone, trajectory[-1], cond, uncond, guidance=7.5, num_steps=STEPS)
    per_step = result.uncond_embeddings[:, None]  # [T, B=1, L, D], index = sampling step
    nti = ddim_sample(backbone, result.z_T, cond, per_step, guidance=7.5, num_steps=STEPS)
    assert mse(nti, z0) * 100 <= mse(plain, z0)


def test_null_text_decay_schedule_stops_early(case):
    backbone, z0, cond, uncond, _ = case
    config = NullTextConfig(num_steps=4, inner_steps=5, lr=0.1, early_stop_eps=1.0)
    assert config.step_lr(3) == pytest.approx(0.1 * 0.97)
    result = null_text_inversion(backbone, z0, cond, uncond, config)
    assert result.inner_steps_used == [1, 1, 1, 1]  # loss < 1 + i*2e-5 at once
    constant = NullTextConfig(num_steps=4, inner_steps=3, lr=0.1, schedule="constant",
                              early_stop_eps=1.0)
    assert constant.step_lr(3) == 0.1
    assert null_text_inversion(backbone, z0, cond, uncond, constant).inner_steps_used == [3] * 4


def test_null_text_inversion_errors(case):
    backbone, z0, cond, uncond, _ = case
    config = NullTextConfig(num_steps=3, inner_steps=2, lr=0.1)
    with pytest.raises(TintError, match="null-text inversion.*step 0"):
        null_text_inversion(backbone, torch.full_like(z0, float("nan")), cond, uncond, config)
    with pytest.raises(TintError, match=r"\[1, C, h, w\]"):
        null_text_inversion(backbone, torch.cat([z0, z0]), cond, uncond, config)
    with pytest.raises(TintError, match="schedule"):
        NullTextConfig(schedule="cosine")
    with pytest.raises(TintError, match=r"\[3, B, L, D\]"):
        ddim_sample(backbone, z0, cond, uncond[None].expand(2, -1, -1, -1), num_steps=3)


def test_null_text_inversion_requires_float32(tmp_path):
    backbone = build_tiny_backbone(tmp_path, resolution=16)
    backbone.unet.to(torch.bfloat16)
    cond = backbone.encode_prompt(["a photo of an object"])
    z0 = torch.zeros(1, *backbone.latent_shape)
    with pytest.raises(TintError, match="float32"):
        null_text_inversion(backbone, z0, cond, cond, NullTextConfig(num_steps=2))


# Batched NTI against one at a time (3 supports, 6 DDIM steps, 5 inner steps, lr 0.1, the decay
# schedule; the v model's early stop masks samples at different inner steps, e.g. [5,5,2,1,1,1]
# next to [5,4,1,1,1,1]). Measured over two seeds per model (CPU, 1 thread): z_T max abs diff
# <= 3.6e-7; u_t max abs diff <= 6.4e-3 (Adam turns rounding-level gradient differences into
# sign-like steps on elements whose gradient is ~0; a 1e-6 relative perturbation of z_0 moves
# one-at-a-time NTI's u_t by the same ~5e-3); latents reconstructed under CFG 7.5 max abs diff
# <= 1.2e-5 (|z_0| up to 3.5); reconstruction MSEs equal to a relative 4e-5. Bounds below
# leave ~10x margin.
BATCH_EARLY_STOP = {"eps-latent": 1e-4, "v-pixel": 1e-5}


def test_batched_null_text_inversion_equals_one_at_a_time(case):
    backbone, _, cond, uncond, kind = case
    side = backbone.resolution
    coarse = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    z0 = backbone.encode_images(torch.nn.functional.interpolate(coarse, size=(side, side),
                                                                mode="bilinear"))
    config = NullTextConfig(num_steps=6, inner_steps=5, lr=0.1, schedule="decay",
                            early_stop_eps=BATCH_EARLY_STOP[kind])
    single = [null_text_inversion(backbone, z0[k:k + 1], cond, uncond, config) for k in range(3)]
    batched = null_text_inversion_batched(backbone, z0, cond, uncond, config)
    assert len(batched) == 3
    for one, many in zip(single, batched, strict=True):
        assert many.z_T.shape == one.z_T.shape and many.uncond_embeddings.shape == one.uncond_embeddings.shape
        assert float((one.z_T - many.z_T).abs().max()) < 1e-5
        assert float((one.uncond_embeddings - many.uncond_embeddings).abs().max()) < 0.05
        steps_apart = sum(abs(a - b) for a, b in zip(one.inner_steps_used, many.inner_steps_used,
                                                        strict=True))
        assert steps_apart <= 1  # the same early stops (a rounding-level tie may differ by one)

    def reconstruct(results):
        return torch.cat([ddim_sample(backbone, r.z_T, cond, r.uncond_embeddings[:, None], 7.5, 6)
                          for r in results])

    rec_single, rec_batched = reconstruct(single), reconstruct(batched)
    assert float((rec_single - rec_batched).abs().max()) < 2e-4
    assert mse(rec_batched, z0) == pytest.approx(mse(rec_single, z0), rel=1e-3)
    assert mse(rec_batched, z0) * 3 < mse(ddim_sample(backbone, torch.cat([r.z_T for r in batched]),
                                                   cond, uncond, 7.5, 6), z0)


def test_batched_null_text_inversion_checks_its_inputs(case):
    backbone, z0, cond, uncond, _ = case
    config = NullTextConfig(num_steps=2, inner_steps=1)
    with pytest.raises(TintError, match=r"cond must be \[1, L, D\] or \[2, L, D\]"):
        null_text_inversion_batched(backbone, torch.cat([z0, z0]), torch.cat([cond] * 3), uncond,
                                    config)
    with pytest.raises(TintError, match="null-text inversion.*step 0"):
        null_text_inversion_batched(backbone, torch.cat([z0, torch.full_like(z0, float("nan"))]),
                                    cond, uncond, config)
