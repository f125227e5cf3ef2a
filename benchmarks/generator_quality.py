"""How good is tint's own small generator? (issue 4, part 4)

(a) Prompt recognisability: samples for the caption of each base class (the pretraining
    categories that are benchmark classes) are classified by a ProtoNet on ImageNet-pretrained
    EfficientNet-Lite0 features whose prototypes are real images; compared with real
    held-out images of the same classes at the same resolution. Target: at least half of
    the real accuracy.
(b) TINT specialisation on a novel class: for a 5-way 5-shot episode of novel classes
    (never seen in pretraining), TI + NTI per class, then generation for alpha in
    {0, 0.25, 0.5, 0.75, 1}; nearest-prototype accuracy of the generated images against
    prototypes of the held-out real images (the queries) of the episode's classes. Chance 1/N.
(c) A grid (the paper's Figure 3): per class, the supports on top, generated images below,
    one row per alpha.

Outputs: results.json, results.md, prompts_grid.png, novel_grid.png in --out.
`--method tint-lora` measures (b)/(c) with tint-lora (UNet adapters on the supports, issue 14)
instead of TINT; `--skip-prompts` skips (a), which does not depend on the method.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generator_quality.py \\
        --generator tint/assets/generator --out docs/results/generator_quality
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tint.data.images import save_image
from tint.io import set_threads, write_json, write_text

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


# --------------------------------------------------------------------------------------
# features and nearest-prototype classification
@torch.no_grad()
def embed(features, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """L2-normalised EfficientNet-Lite0 features of [B,3,H,W] images in [0,1]."""
    out = [F.normalize(features(images[i : i + batch]), dim=-1) for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, features.feature_dim)


def prototypes(feats_by_class: list[torch.Tensor]) -> torch.Tensor:
    return F.normalize(torch.stack([f.mean(0) for f in feats_by_class]), dim=-1)


def accuracy(feats: torch.Tensor, labels: torch.Tensor, protos: torch.Tensor) -> float:
    """Cosine nearest-prototype accuracy."""
    if len(feats) == 0:
        return float("nan")
    return float(((feats @ protos.T).argmax(1) == labels).float().mean())


def per_class_accuracy(feats, labels, protos, n_classes: int) -> list[float]:
    pred = (feats @ protos.T).argmax(1)
    return [float((pred[labels == c] == c).float().mean()) for c in range(n_classes)]


# --------------------------------------------------------------------------------------
# (a) prompt recognisability on base classes
def split_real(items: list[str], rng: np.random.Generator, n_proto: int, n_eval: int):
    order = rng.permutation(len(items))
    n_proto = min(n_proto, len(items) // 2)
    proto = [items[i] for i in order[:n_proto]]
    held = [items[i] for i in order[n_proto : n_proto + n_eval]]
    return proto, held


def prompt_recognisability(backbone, dataset, features, args) -> dict:
    from tint.diffusion.pretrain import caption_for, sample_images

    classes = dataset.classes("base")
    rng = np.random.default_rng(args.seed)
    proto_feats, held_feats, held_labels = [], [], []
    for c, name in enumerate(classes):
        proto, held = split_real(dataset.items[name], rng, args.real_protos, args.real_eval)
        proto_feats.append(embed(features, dataset.load_tensor(proto)))
        held_feats.append(embed(features, dataset.load_tensor(held)))
        held_labels += [c] * len(held)
    protos = prototypes(proto_feats)
    real = torch.cat(held_feats)
    labels = torch.tensor(held_labels)
    result = {
        "classes": classes,
        "chance": 1 / len(classes),
        "real_heldout_accuracy": accuracy(real, labels, protos),
        "real_per_class": per_class_accuracy(real, labels, protos, len(classes)),
        "samples_per_class": args.samples_per_class,
        "by_guidance": {},
    }
    grid_rows = []
    for guidance in args.guidance:
        images, sample_labels = [], []
        for start in range(0, len(classes), 6):
            chunk = classes[start : start + 6]
            prompts = [caption_for(n) for n in chunk for _ in range(args.samples_per_class)]
            images.append(sample_images(backbone, prompts, args.seed + start, guidance, args.steps))
            sample_labels += [start + i for i in range(len(chunk)) for _ in range(args.samples_per_class)]
        images = torch.cat(images)
        labels_s = torch.tensor(sample_labels)
        feats = embed(features, images)
        acc = accuracy(feats, labels_s, protos)
        result["by_guidance"][str(guidance)] = {
            "accuracy": acc,
            "ratio_to_real": acc / result["real_heldout_accuracy"],
            "per_class": per_class_accuracy(feats, labels_s, protos, len(classes)),
        }
        if guidance == args.guidance[-1]:
            grid_rows = images.view(len(classes), args.samples_per_class, *images.shape[1:])
    save_grid(args.out / "prompts_grid.png", [row[: min(8, args.samples_per_class)] for row in grid_rows])
    return result


# --------------------------------------------------------------------------------------
# (b) + (c) TINT on novel classes
def novel_specialisation(backbone, dataset, features, args) -> dict:
    from tint.data.episodes import sample_episodes
    from tint.generators import create_generator
    from tint.generators.tint import GenerateSettings, draw_image, load_tint_artifact, sample_images

    method = create_generator(args.method)
    extra = {"lora_steps": args.lora_steps, "lora_lr": args.lora_lr} if args.method == "tint-lora" else {}

    episode = sample_episodes(dataset, "novel", n_way=args.n_way, k_shot=args.k_shot,
                              n_query=None, n_episodes=1, seed=args.seed)[0]
    n = len(episode.classes)
    query_feats = [embed(features, dataset.load_tensor(q)) for q in episode.query]
    protos = prototypes(query_feats)
    settings = method.SpecializeSettings(ti_steps=args.ti_steps, num_steps=args.steps,
                                         guidance=args.tint_guidance, progress=True,
                                         seed=args.seed, **extra)
    result = {"classes": episode.classes, "chance": 1 / n, "k_shot": args.k_shot,
              "method": args.method, "queries_per_class": [len(q) for q in episode.query],
              "settings": {"ti_steps": args.ti_steps, "ddim_steps": args.steps,
                           "guidance": args.tint_guidance, "images_per_alpha": args.per_alpha,
                           **extra},
              "specialise_seconds": [], "by_alpha": {}}
    supports = [dataset.load_tensor(s) for s in episode.support]
    support_feats = torch.cat([embed(features, s) for s in supports])
    support_labels = torch.arange(n).repeat_interleave(args.k_shot)
    result["support_images_accuracy"] = accuracy(support_feats, support_labels, protos)
    generated: dict[float, list[torch.Tensor]] = {a: [] for a in ALPHAS}
    with tempfile.TemporaryDirectory(prefix="tint_gq_") as tmp:
        for name, support in zip(episode.classes, supports, strict=True):
            start = time.time()
            path = method.specialize(backbone, name, support, tmp, settings)
            result["specialise_seconds"].append(round(time.time() - start, 1))
            artifact = load_tint_artifact(path, method.NAME)
            for alpha in ALPHAS:
                gs = GenerateSettings(alpha=alpha)
                draws = [draw_image(args.seed, name, i, artifact.num_supports,
                                    backbone.latent_shape, gs) for i in range(args.per_alpha)]
                generated[alpha].append(sample_images(backbone, artifact, draws))
    labels = torch.arange(n).repeat_interleave(args.per_alpha)
    for alpha in ALPHAS:
        feats = embed(features, torch.cat(generated[alpha]))
        result["by_alpha"][str(alpha)] = {
            "accuracy": accuracy(feats, labels, protos),
            "per_class": per_class_accuracy(feats, labels, protos, n),
        }
    rows = []
    for c in range(n):
        rows.append(supports[c])
        rows += [generated[a][c][: args.k_shot] for a in ALPHAS]
    save_grid(args.out / "novel_grid.png", rows)
    write_text(args.out / "novel_grid.txt", "\n".join(
        f"class {name}: row 1 = the {args.k_shot} supports, rows 2-{len(ALPHAS) + 1} = "
        f"generated with alpha {', '.join(map(str, ALPHAS))}" for name in episode.classes) + "\n")
    return result


def save_grid(path: Path, rows: list[torch.Tensor], pad: int = 2) -> None:
    """Rows of images [k,3,r,r] -> one PNG on a white background (rows may be shorter)."""
    if not rows:
        return
    r = rows[0].shape[-1]
    width = max(len(row) for row in rows)
    canvas = torch.ones(3, len(rows) * (r + pad) + pad, width * (r + pad) + pad)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = pad + i * (r + pad), pad + j * (r + pad)
            canvas[:, y : y + r, x : x + r] = F.interpolate(image[None], size=(r, r))[0]
    save_image(path, canvas)


# --------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    a, b = res.get("prompts"), res.get("novel")
    lines = [
        "# Generator quality (issue 4, part 4)",
        "",
        f"Generator: `{res['generator']}` ({res['generator_steps']} training steps). "
        f"Features: ImageNet EfficientNet-Lite0 at {res['feature_size']} px, cosine ProtoNet. "
        f"Threads: {res['threads']}; wall time {res['wall_s']:.0f} s; {res['hardware']}.",
        "",
    ]
    if a:
        lines += _prompts_markdown(a, res)
    if b:
        lines += _novel_markdown(b)
    return "\n".join(lines)


def _prompts_markdown(a: dict, res: dict) -> list[str]:
    lines = [
        "## (a) Prompt recognisability (base classes, pretrained on)",
        "",
        f"{len(a['classes'])} classes, chance {a['chance']:.3f}; prototypes from real images; "
        f"{a['samples_per_class']} samples per class, {res['steps']} DDIM steps.",
        "",
        "| images | accuracy | / real |",
        "| --- | --- | --- |",
        f"| real held-out (same resolution) | {a['real_heldout_accuracy']:.3f} | 1.00 |",
    ]
    for g, v in a["by_guidance"].items():
        lines.append(f"| samples, CFG {g} | {v['accuracy']:.3f} | {v['ratio_to_real']:.2f} |")
    return lines + ["", "Target: samples reach at least half the real accuracy (ratio >= 0.5).", ""]


def _novel_markdown(b: dict) -> list[str]:
    method = b.get("method", "tint")
    setting = b["settings"]
    adapters = (f" LoRA adapters: {setting['lora_steps']} steps at lr {setting['lora_lr']}."
                if method == "tint-lora" else "")
    header = [
        f"## (b) {method} on novel classes (never seen in pretraining)",
        "",
        f"{len(b['classes'])}-way {b['k_shot']}-shot episode: {', '.join(b['classes'])}. "
        f"Prototypes = held-out real images (queries); chance {b['chance']:.2f}. "
        f"TI {setting['ti_steps']} steps, NTI + generation with {setting['ddim_steps']} DDIM "
        f"steps, CFG {setting['guidance']}, {setting['images_per_alpha']} images per class "
        f"and alpha.{adapters}",
        "",
        "| images | nearest-prototype accuracy |",
        "| --- | --- |",
        f"| the support images themselves (reference) | {b['support_images_accuracy']:.3f} |",
    ]
    rows = [f"| generated, alpha {alpha} | {v['accuracy']:.3f} |" for alpha, v in b["by_alpha"].items()]
    footer = ["", "(c) `novel_grid.png`: per class the supports, then one row per alpha "
              "(0, 0.25, 0.5, 0.75, 1). `prompts_grid.png`: one row per base class.", ""]
    return header + rows + footer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", default="tint/assets/generator")
    p.add_argument("--out", type=Path, default=Path("docs/results/generator_quality"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (sampling, NTI)")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 7.5])
    p.add_argument("--samples-per-class", type=int, default=10)
    p.add_argument("--real-protos", type=int, default=10)
    p.add_argument("--real-eval", type=int, default=20)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--ti-steps", type=int, default=500)
    p.add_argument("--tint-guidance", type=float, default=7.5)
    p.add_argument("--per-alpha", type=int, default=20)
    p.add_argument("--skip-novel", action="store_true")
    p.add_argument("--skip-prompts", action="store_true", help="skip (a): it does not depend on --method")
    p.add_argument("--method", choices=["tint", "tint-lora"], default="tint",
                   help="the generator measured in (b)/(c)")
    p.add_argument("--lora-steps", type=int, default=100)
    p.add_argument("--lora-lr", type=float, default=1e-4)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from tint.data.datasets import load_dataset
    from tint.diffusion.backbone import load_backbone
    from tint.teachers.backbones import load_efficientnet_lite0

    args = parse_args(argv)
    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    start = time.time()
    backbone = load_backbone(args.generator)
    features = load_efficientnet_lite0(args.feature_size).eval()
    dataset = load_dataset("openclipart", resolution=backbone.resolution)
    marker = json.loads((Path(args.generator) / "tint_generator.json").read_text())
    res = {"generator": str(args.generator), "generator_steps": marker.get("steps"),
           "feature_size": args.feature_size, "threads": args.threads, "steps": args.steps,
           "hardware": f"{platform.machine()} CPU, torch {torch.__version__}",
           "argv": sys.argv[1:] if argv is None else argv}
    if not args.skip_prompts:
        res["prompts"] = prompt_recognisability(backbone, dataset, features, args)
        write_json(args.out / "results.json", res)
    if not args.skip_novel:
        res["novel"] = novel_specialisation(backbone, dataset, features, args)
    res["wall_s"] = time.time() - start
    write_json(args.out / "results.json", res)
    write_text(args.out / "results.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
