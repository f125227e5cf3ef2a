"""Stable Diffusion 1.5 cost of TINT per image: measured time next to the FLOP floor.

Builds the SD 1.5 architecture (UNet2DConditionModel, AutoencoderKL, CLIP ViT-L/14 text
model; configs inline, random weights, nothing downloaded), then:

- counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` (on meta tensors: exact shapes,
  no compute) for a UNet call with the CFG pair, a UNet forward+backward to the text embedding
  (TI step / NTI inner step), a batch-1 UNet forward, VAE decode and the text encoder;
- measures the dense matmul rate of the device (fp32, and fp16 on GPUs);
- times the same calls (``--quick``: one call each, then extrapolates to a TI step, a full NTI
  of 50 steps x 10 inner steps and generation of one image with 50 CFG steps) or, without
  ``--quick``, runs tint's own textual inversion, null-text inversion and generation code;
- prints seconds next to the floor FLOPs / matmul rate, and the per-generated-image totals of
  the paper's Table 6 setting (5000 TI steps and 5 NTIs per class, 4000 images per class).

    .venv/bin/python benchmarks/sd15_timing.py --quick --threads 1          # CPU, ~2-3 min
    python benchmarks/sd15_timing.py --device cuda --fp16                    # GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
    norm_eps=1e-5, center_input_sample=False,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    act_fn="silu", norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768,
)
# --smoke: the same shapes with narrow layers, to check this script end to end in seconds
SMOKE_UNET = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                  cross_attention_dim=32,
                  down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",))
SMOKE_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)
SMOKE_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, projection_dim=32)
TEXT_LEN, LATENT, STEPS, INNER = 77, 64, 50, 10
PAPER = {"ti_steps": 5000, "supports": 5, "images_per_class": 4000}


def build_models(device: str | torch.device, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    for module in (unet, vae, text):
        module.to(dtype=dtype).eval().requires_grad_(False)
    return unet, vae, text


def workloads(unet, vae, text, device, dtype) -> dict[str, Callable[[], object]]:
    """The calls TINT is made of, each a closure (runs on real or meta tensors alike)."""
    def z(batch: int) -> torch.Tensor:
        return torch.randn(batch, 4, LATENT, LATENT, device=device, dtype=dtype)

    width = int(SD15_TEXT["hidden_size"])

    def emb(batch: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(batch, TEXT_LEN, width, device=device, dtype=dtype, requires_grad=grad)

    t = torch.tensor([500], device=device)
    ids = torch.randint(0, 49408, (1, TEXT_LEN), device=device)

    def unet_cfg() -> object:  # one generation / NTI-sampling step: the CFG pair in one call
        with torch.no_grad():
            return unet(z(2), t.expand(2), encoder_hidden_states=emb(2)).sample

    def unet_fwd() -> object:  # inversion step / conditional pass, batch 1
        with torch.no_grad():
            return unet(z(1), t, encoder_hidden_states=emb(1)).sample

    def unet_fwd_bwd() -> object:  # TI step / NTI inner step: gradient to the text embedding
        e = emb(1, grad=True)
        unet(z(1), t, encoder_hidden_states=e).sample.float().pow(2).mean().backward()
        return e.grad

    def vae_decode() -> object:
        with torch.no_grad():
            return vae.decode(z(1)).sample

    def text_fwd_bwd() -> object:  # TI: gradient flows through the text encoder too
        table = text.get_input_embeddings()
        table.weight.requires_grad_(True)
        text(ids)[0].float().pow(2).mean().backward()
        table.weight.requires_grad_(False)
        table.weight.grad = None
        return None

    return {"unet_cfg": unet_cfg, "unet_fwd": unet_fwd, "unet_fwd_bwd": unet_fwd_bwd,
            "vae_decode": vae_decode, "text_fwd_bwd": text_fwd_bwd}


def count_flops() -> dict[str, float]:
    unet, vae, text = build_models("meta")
    counts = {}
    for name, fn in workloads(unet, vae, text, "meta", torch.float32).items():
        with FlopCounterMode(display=False) as counter:
            fn()
        counts[name] = float(counter.get_total_flops())
    return counts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats=3, warmup=1)
    return 2 * n**3 / seconds


def compose(unit: dict[str, float], steps: int = STEPS) -> dict[str, float]:
    """Costs of the method's steps from unit costs (seconds or FLOPs alike)."""
    ti_step = unit["unet_fwd_bwd"] + unit["text_fwd_bwd"]
    # DDIM inversion (50 fwd) + per step: conditional fwd, 10 inner fwd+bwd, final guided fwd
    nti = steps * unit["unet_fwd"] + steps * (2 * unit["unet_fwd"] + INNER * unit["unet_fwd_bwd"])
    gen = steps * unit["unet_cfg"] + unit["vae_decode"]
    per_image = {
        "ti": PAPER["ti_steps"] * ti_step / PAPER["images_per_class"],
        "nti": PAPER["supports"] * nti / PAPER["images_per_class"],
        "generate": gen,
    }
    return {"ti_step": ti_step, "nti_full": nti, "generate_image": gen,
            **{f"per_image_{k}": v for k, v in per_image.items()},
            "per_image_total": sum(per_image.values())}


def full_timings(device: torch.device, gen_dtype: torch.dtype, ti_steps: int,
                 batch: int, nti_steps: int = STEPS) -> dict[str, float]:
    """Run tint's own TI / NTI / generation code on the SD 1.5 architecture."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    from tint.diffusion.model import SD15_SCHEDULER_CONFIG, DiffusionBackbone
    from tint.diffusion.null_text import NullTextConfig, null_text_inversion
    from tint.diffusion.textual_inversion import TextualInversionConfig, textual_inversion
    from tint.generators.tint import (
        GenerateSettings,
        draw_image,
        load_tint_artifact,
        sample_latents,
        save_tint_artifact,
    )
    from tint.testing import write_tiny_clip_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="sd15_timing_"))
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(tmp / "tok")))
    unet, vae, text = build_models(device)
    backbone = DiffusionBackbone(unet, DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG), vae,
                                 text, tokenizer, resolution=512)
    images = torch.rand(1, 3, 512, 512)
    out: dict[str, float] = {}
    config = TextualInversionConfig(placeholder="<tint-timing>", steps=ti_steps)
    start = time.perf_counter()
    ti = textual_inversion(backbone, images, config)
    sync(device)
    out["ti_step"] = (time.perf_counter() - start) / ti_steps
    cond = backbone.encode_prompt(["a photo of an object"])
    empty = backbone.encode_prompt([""])
    z0 = backbone.encode_images(images)
    start = time.perf_counter()
    result = null_text_inversion(backbone, z0, cond, empty,
                                 NullTextConfig(num_steps=nti_steps, inner_steps=INNER,
                                                schedule="constant"))
    sync(device)
    out["nti_full"] = time.perf_counter() - start
    path = save_tint_artifact(tmp / "a.safetensors", backbone, class_name="a", token=ti.token,
                              prompt="a photo of an object", embedding=ti.embedding,
                              z_T=result.z_T, uncond=result.uncond_embeddings[None],
                              guidance=7.5, dataset_resolution=84)
    unet.to(dtype=gen_dtype)
    vae.to(dtype=gen_dtype)
    artifact = load_tint_artifact(path)
    draws = [draw_image(0, "a", i, 1, backbone.latent_shape, GenerateSettings())
             for i in range(batch)]
    for _ in range(2):  # first call warms up
        start = time.perf_counter()
        backbone.decode_latents(sample_latents(backbone, artifact, draws, cond, 7.5))
        sync(device)
    out["generate_image"] = (time.perf_counter() - start) / batch
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="time one call of each kind and extrapolate (use on CPUs)")
    parser.add_argument("--fp16", action="store_true", help="generation in float16 (GPU)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats per call")
    parser.add_argument("--ti-steps", type=int, default=20, help="TI steps timed (full mode)")
    parser.add_argument("--batch", type=int, default=8, help="generation batch (full mode)")
    parser.add_argument("--nti-steps", type=int, default=STEPS,
                        help="DDIM steps of the NTI and generation run (full mode; 50 = paper)")
    parser.add_argument("--smoke", action="store_true",
                        help="narrow layers, same shapes: checks the script, times nothing useful")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        SD15_UNET.update(SMOKE_UNET)
        SD15_VAE.update(SMOKE_VAE)
        SD15_TEXT.update(SMOKE_TEXT)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen_dtype = torch.float16 if args.fp16 else torch.float32
    if device.type == "cpu" and args.fp16:
        parser.error("--fp16 needs a GPU")

    flops = count_flops()
    rate32 = matmul_rate(device, torch.float32)
    rate_gen = matmul_rate(device, gen_dtype) if gen_dtype != torch.float32 else rate32
    print(f"matmul: {rate32 / 1e12:.3f} TFLOP/s fp32, {rate_gen / 1e12:.3f} for generation",
          flush=True)
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "matmul_tflops_fp32": rate32 / 1e12, "matmul_tflops_generation": rate_gen / 1e12,
        "unit_tflop": {k: v / 1e12 for k, v in flops.items()},
    }
    start = time.perf_counter()
    if args.quick:
        unet, vae, text = build_models(device)
        report["build_s"] = time.perf_counter() - start
        repeats = args.repeats or (1 if device.type == "cpu" else 5)
        warmup = 0 if device.type == "cpu" else 2
        calls = workloads(unet, vae, text, device, torch.float32)
        unit_s = {}
        for name, fn in calls.items():  # printed as measured: slow CPUs show progress
            unit_s[name] = timed(fn, device, repeats, warmup)
            print(f"{name}: {unit_s[name]:.3f} s ({flops[name] / 1e12:.3f} TFLOP)", flush=True)
        if gen_dtype != torch.float32:  # generation calls again in half precision
            unet.to(dtype=gen_dtype)
            vae.to(dtype=gen_dtype)
            half = workloads(unet, vae, text, device, gen_dtype)
            for name in ("unet_cfg", "vae_decode"):
                unit_s[name] = timed(half[name], device, repeats, warmup)
        report["unit_s"] = unit_s
        seconds = compose(unit_s)
    else:
        seconds = full_timings(device, gen_dtype, args.ti_steps, args.batch, args.nti_steps)
        report["full_run_s"] = time.perf_counter() - start
        seconds.update({
            "per_image_ti": PAPER["ti_steps"] * seconds["ti_step"] / PAPER["images_per_class"],
            "per_image_nti": PAPER["supports"] * seconds["nti_full"] / PAPER["images_per_class"],
            "per_image_generate": seconds["generate_image"],
        })
        seconds["per_image_total"] = sum(seconds[f"per_image_{k}"]
                                         for k in ("ti", "nti", "generate"))
    floor_flops = compose(flops, STEPS if args.quick else args.nti_steps)
    rates = {k: (rate_gen if "generate" in k else rate32) for k in floor_flops}
    report["seconds"] = seconds
    report["floor_s"] = {k: floor_flops[k] / rates[k] for k in floor_flops}
    print(json.dumps(report, indent=2))
    print(f"\n{'step':<22}{'measured s':>14}{'FLOP floor s':>14}{'TFLOP':>10}")
    for key in ("ti_step", "nti_full", "generate_image", "per_image_ti", "per_image_nti",
                "per_image_generate", "per_image_total"):
        print(f"{key:<22}{seconds[key]:>14.3f}{report['floor_s'][key]:>14.3f}"
              f"{floor_flops[key] / 1e12:>10.2f}")
    print(f"(paper, A40: TI 0.30 s, NTI 0.05 s, generation 0.66 s, total 1.01 s per image; "
          f"per-image TI/NTI assume {PAPER})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
