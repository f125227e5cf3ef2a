"""One prepared GPU check of tint (issue 11): every stage on CUDA, SD-1.5-sized speed and memory.

Sections (JSON + Markdown under --out, default docs/results/gpu/):

(a) pipeline: configs/tiny.yaml (its settings; the data is a small synthetic image-folder
    dataset written here, since Fashion-MNIST's Debian files are not on the GPU machine) run
    with device=cpu/fp32, device=cuda/fp32 and device=cuda/auto (bf16), each in its own run
    dir: every stage must complete; per-model mean accuracies are compared with the CPU run
    (tolerance ACCURACY_TOLERANCE: tiny random models, 15 queries, a few training steps).
(b) sd15-random (SD 1.5 shapes, random weights): seconds per generated image (50 DDIM steps,
    CFG 7.5, per-step null-text embeddings as tint's generator uses, VAE decode included)
    for batch 1/8/16/32 in fp16 and bf16, batch 32 with VAE slicing, optionally with
    torch.compile; seconds per textual-inversion step (float32 weights; fp32 and bf16
    autocast); null-text inversion per support, batched and one at a time (5 supports,
    --nti-steps DDIM steps x 10 inner steps, extrapolated to the paper's 50 steps), and its
    reconstruction error under bf16 autocast against float32; peak GPU memory for each.
(c) utilisation: achieved TFLOP/s against the FLOP counts of benchmarks/sd15_timing.py
    (82.8 TFLOP per generated image, 1.70 per TI step, 19.1 per NTI step with 10 inner
    steps) and against a bf16 matmul measured in the same run.

On the GPU machine (device tool; diffusers is not installed there, so carry its wheel).
Here, once, from the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1

then one `run` call with carry [".whl"], timeout_s 600, and the command:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \\
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

(diffusers 0.42.1 needs nothing else the machine lacks; tint itself runs from the checkout).
Copy the returned gpu_check.json / gpu_check.md into docs/results/gpu/ and commit them.
Budget: about 6 minutes on an H100/H200 (--budget-s stops optional parts early).

Here (CPU, a minute): ``.venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke``
runs every section at tiny sizes (tiny model, cpu fp32 vs cpu bf16) to check the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from tint.config import config_from_dict
from tint.devices import autocast, device_name, resolve_device, synchronize
from tint.diffusion.backbone import attention_processors, compile_unet, load_backbone
from tint.diffusion.ddim import ddim_sample
from tint.diffusion.null_text import (
    NullTextConfig,
    null_text_inversion,
    null_text_inversion_batched,
)
from tint.diffusion.textual_inversion import TextualInversionConfig, textual_inversion
from tint.io import write_json, write_text

REPO = Path(__file__).resolve().parent.parent
ACCURACY_TOLERANCE = {"fp32": 0.15, "bf16": 0.25, "fp16": 0.25}  # |mean acc - CPU's|, per model
TFLOP = {"generate_image": 82.8, "ti_step": 1.70, "nti_step_10_inner": 19.1}  # sd15_timing.py
PAPER_NTI_STEPS = 50


@dataclass
class Plan:
    """What one invocation measures; `SMOKE` is the same code at tiny sizes on the CPU."""

    device: str = "cuda"
    backbone: str = "sd15-random"
    batches: tuple[int, ...] = (1, 8, 16, 32)
    sample_steps: int = 50
    dtypes: tuple[str, ...] = ("fp16", "bf16")
    vae_slice_batch: int = 32
    ti_warmup: int = 3
    ti_steps: int = 20
    nti_steps: int = 10
    nti_inner: int = 10
    supports: int = 5
    compile_batch: int | None = 16
    pipeline_runs: tuple[tuple[str, str], ...] = (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "auto"))
    pipeline_overrides: dict = field(default_factory=dict)
    matmul_side: int = 8192
    flops: bool = True  # the FLOP counts above are for SD 1.5 shapes only


SMOKE = Plan(device="cpu", backbone="tiny", batches=(1, 2), sample_steps=3, dtypes=("bf16",),
             vae_slice_batch=2, ti_warmup=1, ti_steps=2, nti_steps=2, nti_inner=2, supports=2,
             compile_batch=None, pipeline_runs=(("cpu", "fp32"), ("cpu", "bf16")),
             pipeline_overrides={"data.n_episodes": 1, "distill.iterations": 2,
                                 "generator.images_per_class": 2, "report.enabled": False},
             matmul_side=512, flops=False)


# --------------------------------------------------------------------------- helpers


class Clock:
    """The run's time budget: optional parts are skipped once it is spent."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def timed(fn, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def matmul_tflops(device: torch.device, side: int) -> float:
    """Dense bf16 (fp32 on the CPU) matmul rate: the practical peak to compare against."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(10)], device)
    return 2 * side**3 * 10 / seconds / 1e12


def smooth_images(count: int, side: int, seed: int = 0) -> torch.Tensor:
    coarse = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")


def guarded(name: str, report: dict, fn) -> None:
    """Run one section; a failure is recorded (with its traceback) and the others still run."""
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        report[name] = fn()
    except Exception as err:  # noqa: BLE001 - the report must say what failed, and go on
        report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        print(report[name]["traceback"], file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- (a) pipeline


def write_dataset(root: Path, side: int = 32) -> Path:
    """10 classes x 20 images: a class colour and a class-specific bar, with noise."""
    rng = np.random.default_rng(0)
    names = [f"class{c}" for c in range(10)]
    for c, name in enumerate(names):
        colour = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 151 + 30) % 256], float)
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(20):
            image = np.full((side, side, 3), 50.0) + 0.8 * colour
            image[3 + 2 * c:5 + 2 * c, 4:side - 4] = 255 - colour
            image += rng.normal(0, 12, image.shape)
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / name / f"{i:02d}.png")
    (root / "splits.json").write_text(json.dumps({"base": names[:6], "novel": names[6:]}))
    return root


def tiny_yaml_config(data_root: Path, run_dir: Path, device: str, precision: str,
                     overrides: dict) -> dict:
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config.update(run_dir=str(run_dir), device=device, precision=precision)
    config["data"].update(dataset=f"folder:{data_root}", min_base_classes=3)
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def pipeline_section(plan: Plan, workdir: Path) -> dict:
    from tint.pipeline import run_pipeline

    data_root = write_dataset(workdir / "data")
    threads = torch.get_num_threads()  # the config's `threads: 1` must not outlive the runs
    runs = {}
    for device, precision in plan.pipeline_runs:
        label = f"{device}-{precision}"
        config = tiny_yaml_config(data_root, workdir / label, device, precision,
                                  plan.pipeline_overrides)
        try:
            seconds, results = timed(lambda c=config: run_pipeline(config_from_dict(c)),
                                     torch.device("cpu"))
        except Exception as err:  # noqa: BLE001 - a failing device is the finding
            runs[label] = {"completed": False, "error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc()}
            print(runs[label]["traceback"], file=sys.stderr, flush=True)
            continue
        models = results["models"]
        runs[label] = {
            "completed": True, "seconds": seconds, "timings": results["timings"],
            "accuracy": {m: [row["accuracy"][m] for row in results["episodes"]] for m in models},
        }
    torch.set_num_threads(threads)
    return compare_runs(runs, plan)


def compare_runs(runs: dict, plan: Plan) -> dict:
    reference = f"{plan.pipeline_runs[0][0]}-{plan.pipeline_runs[0][1]}"
    base = runs.get(reference, {})
    for label, run in runs.items():
        if label == reference or not run.get("completed") or not base.get("completed"):
            continue
        precision = label.split("-", 1)[1]
        tolerance = ACCURACY_TOLERANCE.get(precision, ACCURACY_TOLERANCE["bf16"])
        diffs = {m: abs(statistics.mean(run["accuracy"][m]) - statistics.mean(base["accuracy"][m]))
                 for m in run["accuracy"]}
        run["max_mean_accuracy_diff_vs_" + reference] = max(diffs.values())
        run["tolerance"] = tolerance
        run["within_tolerance"] = max(diffs.values()) <= tolerance
    return {"reference": reference, "runs": runs,
            "all_completed": all(r.get("completed") for r in runs.values())}


# --------------------------------------------------------------------------- (b) SD-1.5-sized


def generation_rows(backbone, plan: Plan, device: torch.device, clock: Clock) -> list[dict]:
    """Seconds per image for each dtype and batch: sampling (CFG, per-step u_t) + VAE decode."""
    rows = []
    for name in plan.dtypes:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
        backbone.to(device, dtype)
        cond = backbone.encode_prompt(["a photo of an object"])
        uncond = backbone.encode_prompt([""])
        for batch in plan.batches:
            rows.append(generation_row(backbone, name, batch, cond, uncond, plan, device))
        if plan.vae_slice_batch:
            backbone.vae_slice_size = max(1, plan.vae_slice_batch // 4)
            row = generation_row(backbone, name, plan.vae_slice_batch, cond, uncond, plan, device)
            rows.append({**row, "vae_slice_size": backbone.vae_slice_size})
            backbone.vae_slice_size = None
        if plan.compile_batch and name == plan.dtypes[0] and clock.left() > 150:
            rows.append(compiled_row(backbone, name, cond, uncond, plan, device))
    backbone.to(device, torch.float32)
    return rows


def generation_row(backbone, name, batch, cond, uncond, plan: Plan, device) -> dict:
    def run(steps: int):
        z = torch.randn(batch, *backbone.latent_shape, device=device)
        per_step = uncond.expand(batch, -1, -1)[None].expand(steps, -1, -1, -1)
        latents = ddim_sample(backbone, z, cond.expand(batch, -1, -1), per_step, 7.5, steps)
        return backbone.decode_latents(latents)

    run(2)  # warm-up: kernels, allocator, cudnn heuristics at this batch size
    reset_peak(device)
    seconds, images = timed(lambda: run(plan.sample_steps), device)
    return {"dtype": name, "batch": batch, "steps": plan.sample_steps, "seconds": seconds,
            "s_per_image": seconds / batch, "peak_gib": peak_gib(device),
            "finite": bool(torch.isfinite(images).all()), "vae_dtype": str(backbone.vae_dtype)}


def compiled_row(backbone, name, cond, uncond, plan: Plan, device) -> dict:
    original = backbone.unet
    compile_unet(backbone)
    try:
        batch = plan.compile_batch
        first, _ = timed(lambda: generation_row(backbone, name, batch, cond, uncond,
                                                 Plan(**{**asdict(plan), "sample_steps": 2}), device),
                         device)
        row = generation_row(backbone, name, batch, cond, uncond, plan, device)
        return {**row, "torch_compile": True, "compile_and_warmup_s": first}
    finally:
        backbone.unet = original


def ti_rows(backbone, plan: Plan, device: torch.device, images: torch.Tensor) -> list[dict]:
    rows = []
    for precision in ("fp32", "bf16"):
        backbone.precision = precision
        warm = TextualInversionConfig(steps=plan.ti_warmup, log_every=0)
        textual_inversion(backbone, images, warm, progress=False)
        reset_peak(device)
        config = TextualInversionConfig(steps=plan.ti_steps, log_every=0)
        seconds, result = timed(lambda c=config: textual_inversion(backbone, images, c,
                                                                   progress=False), device)
        rows.append({"precision": f"{precision} (weights fp32)", "steps": plan.ti_steps,
                     "s_per_step": seconds / plan.ti_steps, "peak_gib": peak_gib(device),
                     "final_loss": result.losses[-1]})
    backbone.precision = "fp32"
    return rows


def nti_rows(backbone, plan: Plan, device: torch.device, images: torch.Tensor) -> dict:
    z0 = backbone.encode_images(images)
    cond = backbone.encode_prompt(["a photo of an object"])
    empty = backbone.encode_prompt([""])
    config = NullTextConfig(num_steps=plan.nti_steps, inner_steps=plan.nti_inner, lr=0.1,
                            schedule="constant")  # random weights: lr 0.1, no early stop
    null_text_inversion_batched(backbone, z0[:1], cond, empty,
                                NullTextConfig(num_steps=1, inner_steps=1))  # warm-up
    k = z0.shape[0]
    rows, results = [], {}
    modes = {
        "one at a time": lambda: [null_text_inversion(backbone, z0[i:i + 1], cond, empty, config)
                                  for i in range(k)],
        "batched": lambda: null_text_inversion_batched(backbone, z0, cond, empty, config),
    }
    for mode, fn in modes.items():
        reset_peak(device)
        seconds, results[mode] = timed(fn, device)
        rows.append(nti_row(mode, "fp32 (TF32 matmuls)", seconds, k, plan, device))

    def batched_bf16():
        with autocast(device, "bf16"):
            return null_text_inversion_batched(backbone, z0, cond, empty, config)

    reset_peak(device)
    seconds, results["bf16"] = timed(batched_bf16, device)
    rows.append(nti_row("batched", "bf16 autocast", seconds, k, plan, device))
    return {"rows": rows, "reconstruction": reconstruction(backbone, results, z0, cond, empty, config)}


def nti_row(mode: str, precision: str, seconds: float, k: int, plan: Plan, device) -> dict:
    per_support = seconds / k
    return {"mode": mode, "precision": precision, "supports": k, "ddim_steps": plan.nti_steps,
            "inner_steps": plan.nti_inner, "s_per_support": per_support,
            "s_per_support_at_50_steps": per_support * PAPER_NTI_STEPS / plan.nti_steps,
            "s_per_class_at_50_steps": seconds * PAPER_NTI_STEPS / plan.nti_steps,
            "peak_gib": peak_gib(device)}


def reconstruction(backbone, results: dict, z0, cond, empty, config: NullTextConfig) -> dict:
    """MSE to z_0 after CFG sampling from each result (fp32 sampling), and bf16/fp32."""
    def mse(rs) -> list[float]:
        z_T = torch.cat([r.z_T for r in rs]).to(z0.device)
        uncond = torch.stack([r.uncond_embeddings for r in rs], dim=1).to(z0.device)
        z = ddim_sample(backbone, z_T, cond, uncond, config.guidance, config.num_steps)
        return ((z - z0) ** 2).flatten(1).mean(1).tolist()

    fp32, bf16 = mse(results["batched"]), mse(results["bf16"])
    plain_z = ddim_sample(backbone, torch.cat([r.z_T for r in results["batched"]]).to(z0.device),
                          cond, empty, config.guidance, config.num_steps)
    single = results["one at a time"]
    return {
        "plain_inversion_mse": ((plain_z - z0) ** 2).flatten(1).mean(1).tolist(),
        "fp32_mse": fp32, "bf16_autocast_mse": bf16,
        "bf16_over_fp32": [b / a for a, b in zip(fp32, bf16, strict=True)],
        "batched_vs_one_at_a_time_max_abs_z_T": max(
            float((a.z_T - b.z_T).abs().max()) for a, b in zip(single, results["batched"], strict=True)),
    }


def sd15_section(plan: Plan, device: torch.device, clock: Clock) -> dict:
    seconds, backbone = timed(lambda: load_backbone(plan.backbone, device=device), device)
    images = smooth_images(plan.supports, backbone.resolution)
    out = {"backbone": plan.backbone, "load_s": seconds,
           "unet_parameters": sum(p.numel() for p in backbone.unet.parameters()),
           "attention_processors": attention_processors(backbone)}
    guarded("textual_inversion", out, lambda: ti_rows(backbone, plan, device, images))
    guarded("null_text_inversion", out, lambda: nti_rows(backbone, plan, device, images))
    guarded("generation", out, lambda: generation_rows(backbone, plan, device, clock))
    return out


# --------------------------------------------------------------------------- (c) utilisation


def utilisation(report: dict, plan: Plan) -> dict:
    peak = report["matmul_tflops"]
    sd = report.get("sd15", {})
    rows = []
    if not plan.flops:
        return {"matmul_tflops": peak, "rows": rows, "note": "smoke run: no SD 1.5 FLOP counts"}
    for row in sd.get("generation", []) if isinstance(sd.get("generation"), list) else []:
        rows.append(("generate", f"{row['dtype']} batch {row['batch']}"
                     + (" vae-sliced" if row.get("vae_slice_size") else "")
                     + (" compiled" if row.get("torch_compile") else ""),
                     TFLOP["generate_image"] / row["s_per_image"]))
    for row in sd.get("textual_inversion", []) if isinstance(sd.get("textual_inversion"), list) else []:
        rows.append(("ti step", row["precision"], TFLOP["ti_step"] / row["s_per_step"]))
    nti = sd.get("null_text_inversion", {})
    for row in nti.get("rows", []) if isinstance(nti, dict) else []:
        per_step = row["s_per_support"] / row["ddim_steps"]
        rows.append(("nti", f"{row['mode']}, {row['precision']}", TFLOP["nti_step_10_inner"] / per_step))
    return {"matmul_tflops": peak,
            "rows": [{"stage": s, "setting": w, "tflops": t, "of_matmul_peak": t / peak}
                     for s, w, t in rows]}


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = [f"# tint GPU check ({report['mode']})", "",
             f"Device: {report['device']}; torch {report['torch']}; diffusers {report['diffusers']}; "
             f"total {report['seconds']:.0f} s.", "", f"Command: `{report['command']}`", ""]
    lines += pipeline_md(report.get("pipeline", {}))
    if "sd15" in report:
        lines += sd15_md(report["sd15"])
    util = report.get("utilisation", {})
    lines += ["## (c) Utilisation", "",
              f"Dense matmul (bf16 on CUDA, fp32 on the CPU) measured in this run: "
              f"{util.get('matmul_tflops', float('nan')):.1f} TFLOP/s.", ""]
    if util.get("rows"):
        lines += ["| stage | setting | TFLOP/s | of matmul peak |", "|---|---|---:|---:|"]
        lines += [f"| {r['stage']} | {r['setting']} | {r['tflops']:.0f} | {r['of_matmul_peak']:.0%} |"
                  for r in util["rows"]]
    return "\n".join(lines) + "\n"


def pipeline_md(section: dict) -> list[str]:
    lines = ["## (a) configs/tiny.yaml on each device", ""]
    if "error" in section:
        return lines + [f"Failed: {section['error']}", ""]
    lines += ["| run | completed | seconds | mean accuracy per model | diff vs CPU | tolerance |",
              "|---|---|---:|---|---:|---:|"]
    for label, run in section.get("runs", {}).items():
        if not run.get("completed"):
            lines.append(f"| {label} | no: {run.get('error')} | | | | |")
            continue
        accs = ", ".join(f"{m} {statistics.mean(v):.3f}" for m, v in run["accuracy"].items())
        diff = next((v for k, v in run.items() if k.startswith("max_mean_accuracy_diff")), None)
        lines.append(f"| {label} | yes | {run['seconds']:.0f} | {accs} | "
                     f"{'' if diff is None else f'{diff:.3f}'} | {run.get('tolerance', '')} |")
    return lines + [""]


def sd15_md(section: dict) -> list[str]:
    lines = ["## (b) " + str(section.get("backbone", "sd15-random")), ""]
    if "error" in section:
        return lines + [f"Failed: {section['error']}", ""]
    lines += [f"UNet parameters {section.get('unet_parameters', 0) / 1e6:.0f}M; attention "
              f"processors {section.get('attention_processors')}; load {section.get('load_s', 0):.0f} s.", ""]
    gen = section.get("generation")
    if isinstance(gen, list):
        lines += ["Generation (DDIM + CFG 7.5, per-step u_t, VAE decode):", "",
                  "| dtype | batch | steps | s/image | peak GiB | finite | note |",
                  "|---|---:|---:|---:|---:|---|---|"]
        for r in gen:
            note = ("vae slice " + str(r["vae_slice_size"]) if r.get("vae_slice_size") else "") + (
                f"torch.compile (first call {r['compile_and_warmup_s']:.0f} s)" if r.get("torch_compile") else "")
            lines.append(f"| {r['dtype']} | {r['batch']} | {r['steps']} | {r['s_per_image']:.3f} | "
                         f"{fmt(r['peak_gib'])} | {r['finite']} | {note} |")
        lines.append("")
    ti = section.get("textual_inversion")
    if isinstance(ti, list):
        lines += ["Textual inversion:", "", "| precision | s/step | peak GiB |", "|---|---:|---:|"]
        lines += [f"| {r['precision']} | {r['s_per_step']:.3f} | {fmt(r['peak_gib'])} |" for r in ti]
        lines.append("")
    nti = section.get("null_text_inversion")
    if isinstance(nti, dict) and "rows" in nti:
        inner = nti["rows"][0]["inner_steps"] if nti["rows"] else "?"
        lines += [f"Null-text inversion ({inner} inner steps, constant lr 0.1, no early stop):", "",
                  "| mode | precision | s/support | s/support at 50 steps | s/class (5) at 50 | peak GiB |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['mode']} | {r['precision']} | {r['s_per_support']:.2f} | "
                  f"{r['s_per_support_at_50_steps']:.1f} | {r['s_per_class_at_50_steps']:.0f} | "
                  f"{fmt(r['peak_gib'])} |" for r in nti["rows"]]
        rec = nti["reconstruction"]
        lines += ["", f"Reconstruction MSE under CFG: plain inversion {fmt_list(rec['plain_inversion_mse'])}, "
                  f"NTI fp32 {fmt_list(rec['fp32_mse'])}, NTI bf16 autocast {fmt_list(rec['bf16_autocast_mse'])}; "
                  f"bf16/fp32 {fmt_list(rec['bf16_over_fp32'])} (policy: bf16 only if <= 2x).", ""]
    for name in ("textual_inversion", "null_text_inversion", "generation"):
        if isinstance(section.get(name), dict) and "error" in section[name]:
            lines += [f"{name} failed: {section[name]['error']}", ""]
    return lines


def fmt(value) -> str:
    return "" if value is None else f"{value:.1f}"


def fmt_list(values) -> str:
    return "[" + ", ".join(f"{v:.2e}" if v < 0.01 else f"{v:.2f}" for v in values) + "]"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (a minute)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="optional parts (torch.compile) are skipped past this")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--pipeline-only", action="store_true",
                        help="section (a) alone: re-check a fix without the SD-1.5 timings")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = copy.deepcopy(SMOKE if args.smoke else Plan())
    device = resolve_device(plan.device)
    clock = Clock(args.budget_s)
    import diffusers

    report: dict = {"mode": "smoke (CPU, tiny sizes)" if args.smoke else "full",
                    "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "device": device_name(device), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "python": platform.python_version(),
                    "plan": asdict(plan)}
    report["matmul_tflops"] = matmul_tflops(device, plan.matmul_side)
    with tempfile.TemporaryDirectory(prefix="tint_gpu_check_") as scratch:
        if not args.skip_pipeline:
            guarded("pipeline", report, lambda: pipeline_section(plan, Path(scratch)))
        if not args.pipeline_only:
            guarded("sd15", report, lambda: sd15_section(plan, device, clock))
    report["utilisation"] = utilisation(report, plan)
    report["seconds"] = clock.elapsed()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "gpu_check.json", report)
    write_text(args.out / "gpu_check.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
