"""Generation speed on the tiny random model: batched vs one image at a time, and vs diffusers.

1. TINT generation (`tint.generators.tint.generate`, end to end: blend, DDIM + CFG with
   per-image u_t,k, decode, PNG + manifest) with batch size B against batch size 1.
2. Plain-TI generation (pure noise, class embedding, ordinary empty-prompt uncond), our
   batched DDIM loop against diffusers' ``StableDiffusionPipeline`` called once per image on
   the same components (a 64px tiny SD, so the pipeline accepts the size). The pipeline is
   also given our initial latents to check that both produce the same images.
3. Time per textual-inversion step and per full null-text inversion on the same model.

Same model, machine and run for every ratio; each timing is the median of --repeats.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generation.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tint.diffusion.ddim import ddim_invert, ddim_sample
from tint.generators.base import install_token_embedding
from tint.generators.tint import generate, save_tint_artifact
from tint.testing import build_tiny_backbone


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_artifact(backbone, folder: Path, steps: int, supports: int = 5) -> Path:
    token = "<tint-bench>"
    table = backbone.text_encoder.get_input_embeddings().weight
    object_id = backbone.tokenizer.convert_tokens_to_ids("object</w>")
    embedding = table[object_id].detach().clone()
    install_token_embedding(backbone, token, embedding)
    prompt = f"a photo of an {token}"
    cond = backbone.encode_prompt([prompt])
    images = torch.nn.functional.interpolate(torch.rand(supports, 3, 4, 4), size=backbone.resolution,
                                             mode="bilinear")
    z0 = backbone.encode_images(images)
    z_T = torch.cat([ddim_invert(backbone, z0[k:k + 1], cond, steps)[-1] for k in range(supports)])
    empty = backbone.encode_prompt([""])
    uncond = empty.expand(supports, steps, -1, -1) + 0.05 * torch.randn(supports, steps,
                                                                          *empty.shape[1:])
    return save_tint_artifact(folder / "bench.safetensors", backbone, class_name="bench",
                              token=token, prompt=prompt, embedding=embedding, z_T=z_T,
                              uncond=uncond, guidance=7.5, dataset_resolution=32)


def bench_tint(backbone, folder: Path, n: int, batch: int, steps: int, repeats: int) -> dict:
    artifact = make_artifact(backbone, folder, steps)
    counter = iter(range(10**6))

    def run(batch_size: int) -> None:
        out = folder / f"gen{next(counter)}"
        generate(backbone, artifact, n, out, seed=0,
                 settings={"batch_size": batch_size, "progress": False})

    run(batch)  # warm-up
    batched = median_time(lambda: run(batch), repeats)
    single = median_time(lambda: run(1), repeats)
    return {"images": n, "batch_size": batch, "steps": steps,
            "batched_images_per_s": n / batched, "single_images_per_s": n / single,
            "ratio": single / batched}


def bench_plain_ti(backbone, n: int, batch: int, steps: int, repeats: int) -> dict:
    from diffusers import StableDiffusionPipeline

    prompt = "a photo of an <tint-bench>"  # token installed by make_artifact
    cond = backbone.encode_prompt([prompt])
    empty = backbone.encode_prompt([""])
    latents = torch.randn(n, *backbone.latent_shape, generator=torch.Generator().manual_seed(0))

    def ours(batch_size: int) -> torch.Tensor:
        out = []
        for start in range(0, n, batch_size):
            z = latents[start:start + batch_size]
            z0 = ddim_sample(backbone, z, cond.expand(len(z), -1, -1),
                             empty.expand(len(z), -1, -1), 7.5, steps)
            out.append(backbone.decode_latents(z0))
        return torch.cat(out)

    pipe = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
        unet=backbone.unet, scheduler=backbone.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    side = backbone.resolution

    def diffusers_per_image() -> torch.Tensor:
        images = [pipe(prompt, height=side, width=side, num_inference_steps=steps,
                       guidance_scale=7.5, latents=latents[i:i + 1], output_type="pt").images
                  for i in range(n)]
        return torch.cat(images)

    ours(batch)
    agreement = float((ours(batch) - diffusers_per_image()).abs().max())
    t_batched = median_time(lambda: ours(batch), repeats)
    t_single = median_time(lambda: ours(1), repeats)
    t_pipe = median_time(diffusers_per_image, repeats)
    return {"images": n, "batch_size": batch, "steps": steps,
            "ours_batched_images_per_s": n / t_batched, "ours_single_images_per_s": n / t_single,
            "diffusers_per_image_images_per_s": n / t_pipe,
            "ratio_batched_vs_diffusers": t_pipe / t_batched,
            "ratio_single_vs_diffusers": t_pipe / t_single,
            "max_abs_diff_vs_diffusers": agreement}


def bench_inversions(backbone, steps: int, ti_steps: int, repeats: int) -> dict:
    """Median TI step over `repeats` runs; one full NTI (it is long and steady)."""
    from tint.diffusion.null_text import NullTextConfig, null_text_inversion
    from tint.diffusion.textual_inversion import TextualInversionConfig, textual_inversion

    images = torch.nn.functional.interpolate(torch.rand(5, 3, 4, 4), size=backbone.resolution,
                                             mode="bilinear")
    names = iter(range(10**6))  # a fresh placeholder token per run

    def run_ti() -> None:
        config = TextualInversionConfig(placeholder=f"<ti-bench-{next(names)}>", steps=ti_steps)
        textual_inversion(backbone, images, config, progress=False)

    t_ti = median_time(run_ti, repeats)
    cond = backbone.encode_prompt(["a photo of an object"])
    empty = backbone.encode_prompt([""])
    z0 = backbone.encode_images(images[:1])
    nti = NullTextConfig(num_steps=steps, inner_steps=10, schedule="constant")
    t_nti = median_time(lambda: null_text_inversion(backbone, z0, cond, empty, nti), 1)
    return {"ti_step_s": t_ti / ti_steps, "nti_s": t_nti,
            "nti_setting": f"{steps} steps x 10 inner (constant lr, no early stop)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ti-steps", type=int, default=20, help="TI steps per timed run")
    parser.add_argument("--nti-steps", type=int, default=50, help="DDIM steps of the timed NTI")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = build_tiny_backbone(tmp, seed=0, resolution=args.resolution)
        results = {
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
            "threads": torch.get_num_threads(),
            "unet_params": sum(p.numel() for p in backbone.unet.parameters()),
            "resolution": args.resolution,
        }
        sections = {
            "tint_generate": lambda: bench_tint(backbone, Path(tmp), args.images,
                                                args.batch_size, args.steps, args.repeats),
            "plain_ti": lambda: bench_plain_ti(backbone, args.images, args.batch_size,
                                               args.steps, args.repeats),
            "inversions": lambda: bench_inversions(backbone, args.nti_steps, args.ti_steps,
                                                   args.repeats),
        }
        for name, run in sections.items():  # report each part as soon as it is measured
            results[name] = run()
            print(json.dumps({name: results[name]}, indent=2), flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
