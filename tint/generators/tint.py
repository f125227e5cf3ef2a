"""TINT: textual inversion + null-text inversion + noise-blended generation (paper section 3.1).

specialize (Algorithm 1), per class:
    supports --bridge--> model resolution --TI--> class embedding v_n
    each support k --NTI conditioned on "a photo of an <v_n>"--> z_T,k and u_1..T,k
    -> ``<out>/<class>.safetensors`` (embedding, z_T, uncond, timesteps [, support] + JSON of
       every setting) and ``<out>/<class>.ti.safetensors`` (diffusers textual-inversion file).

generate (Algorithm 2), per image i (own RNG from (seed, class, i)):
    k ~ U{1..K}, n ~ N(0, I), z' = (1-a) z_T,k + a n                         (Eq. 3)
    z~ = z' / |z'| * ((1-a)|z_T,k| + a|n|)                                   (Eq. 4)
    DDIM + CFG from z~ with the class embedding and support k's per-step u_t,k
    -> PNG at dataset resolution + a manifest row. Many images share one UNet call (each with
    its own u_t,k; the CFG pair in the same batch); batching never changes an image.

tint-lora (`TINT_LORA`, beyond the paper; issue 14): the same two algorithms with one step
added after TI: low-rank adapters of the UNet's attention are fine-tuned on the supports
(tint.diffusion.lora), NTI runs on the adapted UNet, and generation attaches the adapters the
artifact stores (``lora.*`` tensors). It lives here, as a variant, because it is TINT plus one
step; `TINT_LORA` has the whole generator contract (tint.generators.base.Generator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from tint.diffusion.bridge import ResolutionBridge
from tint.diffusion.null_text import (
    NullTextConfig,
    NullTextResult,
    null_text_inversion,
    null_text_inversion_batched,
)
from tint.errors import TintError
from tint.generators.base import (
    SamplingSettings,
    TISettings,
    artifact_meta,
    artifact_path,
    batches,
    check_count,
    draw_support_and_noise,
    image_rng,
    image_seed,
    install_token_embedding,
    learn_class_word,
    load_artifact,
    manifest_paths,
    missing_indices,
    read_manifest,
    save_artifact,
    save_learned_word,
    settings_from,
    write_generated,
)
from tint.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, check_interval, join

NAME = "tint"
LORA_NAME = "tint-lora"
LORA_PREFIX = "lora."  # artifact tensors of the class's UNet adapters (tint-lora only)
REQUIRED_TENSORS = ("embedding", "z_T", "uncond", "timesteps")
MAY_RETURN_FEWER = False


@dataclass
class SpecializeSettings(TISettings):
    """Every knob of Algorithm 1 (TI's from `TISettings`, then NTI's); all of it is stored
    in the artifact's metadata. TI runs over the paper's limited range t >= 250."""

    ti_t_min: int = 250
    nti_inner_steps: int = 10
    nti_lr: float = 1e-2
    # "decay": 1e-2*(1-i/100) + early stop (original); "constant"
    nti_schedule: Literal["decay", "constant"] = "decay"
    # All K supports in one batched NTI (equal to one at a time up to rounding: execution only)
    nti_batch: bool = True

    RANGES = {**TISettings.RANGES, "nti_inner_steps": AT_LEAST_ONE, "nti_lr": POSITIVE}


@dataclass
class LoraSpecializeSettings(SpecializeSettings):
    """tint-lora: Algorithm 1's knobs plus the UNet adapters', trained after TI on the same
    supports (see tint.diffusion.lora.AdapterConfig for why these defaults)."""

    lora_rank: int = 4
    lora_alpha: float | None = None  # None: = lora_rank
    lora_steps: int = 100
    lora_lr: float = 1e-4
    lora_t_min: int = 0

    RANGES = {**SpecializeSettings.RANGES, "lora_rank": AT_LEAST_ONE, "lora_alpha": POSITIVE,
              "lora_steps": AT_LEAST_ONE, "lora_lr": POSITIVE, "lora_t_min": NON_NEGATIVE}

    def adapter_config(self):
        from tint.diffusion.lora import AdapterConfig

        return AdapterConfig(rank=self.lora_rank, alpha=self.lora_alpha, steps=self.lora_steps,
                             lr=self.lora_lr, t_min=self.lora_t_min, seed=self.seed)


@dataclass
class GenerateSettings(SamplingSettings):
    """Algorithm 2's knobs. `guidance` None: the artifact's (the u_t were optimised for it)."""

    alpha: float = 1.0
    alpha_range: Sequence[float] | None = None  # (lo, hi): alpha ~ U(lo, hi) per image

    RANGES = {**SamplingSettings.RANGES, "alpha": UNIT}

    def validate(self, path: str = "") -> None:
        super().validate(path)
        check_interval(join(path, "alpha_range"), self.alpha_range)


# ---------------------------------------------------------------------------------------------
# Eq. 3-4


def blend_latents(z_T: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """Eq. 3 then Eq. 4, per image, norms over all latent dims; computed in float64.

    alpha = 0 returns z_T exactly; alpha = 1 returns the noise exactly.
    """
    if z_T.shape != noise.shape:
        raise TintError(f"blend: z_T {tuple(z_T.shape)} and noise {tuple(noise.shape)} differ")
    alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
    if alpha.numel() == 1:
        alpha = alpha.expand(z_T.shape[0])
    if ((alpha < 0) | (alpha > 1)).any():
        raise TintError(f"alpha must be in [0, 1], got {alpha.tolist()}")
    a = alpha.to(z_T.device).view(-1, *([1] * (z_T.ndim - 1)))
    z64, n64 = z_T.double(), noise.double()
    blended = (1 - a) * z64 + a * n64
    target = (1 - a) * _norm(z64) + a * _norm(n64)
    rescaled = blended * (target / _norm(blended).clamp_min(1e-30))
    return rescaled.to(z_T.dtype)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


# ---------------------------------------------------------------------------------------------
# Artifact


@dataclass
class TintArtifact:
    """One class's specialisation, loaded and validated."""

    path: Path
    class_name: str
    token: str
    prompt: str
    embedding: torch.Tensor  # [D]
    z_T: torch.Tensor  # [K, C, h, w]
    uncond: torch.Tensor  # [K, T, L, D]
    timesteps: torch.Tensor  # [T]
    meta: dict
    lora: dict[str, torch.Tensor]  # tint-lora's UNet adapter weights; empty for tint

    @property
    def num_supports(self) -> int:
        return int(self.z_T.shape[0])


def load_tint_artifact(path: str | Path, generator: str = NAME) -> TintArtifact:
    tensors, meta = load_artifact(path, REQUIRED_TENSORS, generator=generator)
    z_T, uncond = tensors["z_T"], tensors["uncond"]
    if uncond.ndim != 4 or z_T.shape[0] != uncond.shape[0] or z_T.shape[0] == 0:
        raise TintError(f"{path}: z_T {tuple(z_T.shape)} and uncond {tuple(uncond.shape)} "
                        "do not describe the same supports; re-run `tint specialize`")
    if uncond.shape[1] != tensors["timesteps"].numel():
        raise TintError(f"{path}: {uncond.shape[1]} unconditional embeddings for "
                        f"{tensors['timesteps'].numel()} timesteps; re-run `tint specialize`")
    lora = {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    if generator == LORA_NAME and (not lora or "lora" not in meta):
        raise TintError(f"{path}: a tint-lora artifact without its LoRA weights; delete it and "
                        "re-run `tint specialize`")
    return TintArtifact(Path(path), meta["class"], meta["token"], meta["prompt"],
                        tensors["embedding"], z_T, uncond, tensors["timesteps"], meta, lora)


def adapter_of(backbone: Any, artifact: TintArtifact) -> AbstractContextManager:
    """The backbone with the artifact's UNet adapters attached (tint-lora), else unchanged."""
    return with_adapters(backbone, artifact.lora, artifact.meta.get("lora"))


def with_adapters(backbone: Any, lora: dict[str, torch.Tensor],
                  settings: dict | None) -> AbstractContextManager:
    """`lora` (adapter weights) attached to the backbone's UNet while inside; nothing without
    weights. `settings` is the artifact's ``lora`` metadata: rank, alpha, targets."""
    if not lora:
        return nullcontext()
    from tint.diffusion.lora import AdapterConfig, class_adapter

    return class_adapter(backbone.unet, lora, AdapterConfig(**settings))


def check_backbone_matches(backbone: Any, artifact: TintArtifact) -> None:
    """The artifact's tensors only mean something on the backbone they were made with."""
    where = str(artifact.path)
    if tuple(artifact.z_T.shape[1:]) != tuple(backbone.latent_shape):
        raise TintError(f"{where}: latents {tuple(artifact.z_T.shape[1:])} but the backbone's are "
                        f"{tuple(backbone.latent_shape)}: use the backbone it was made with "
                        f"({artifact.meta.get('backbone')})")
    length, dim = artifact.uncond.shape[2:]
    hidden = backbone.text_encoder.get_input_embeddings().weight.shape[1]
    if dim != hidden or artifact.embedding.numel() != hidden or length != backbone.text_length:
        raise TintError(f"{where}: text embeddings [{length},{dim}] do not fit the backbone's "
                        f"[{backbone.text_length},{hidden}]; use the backbone it was made with")
    backbone.scheduler.set_timesteps(artifact.timesteps.numel())
    if not torch.equal(backbone.scheduler.timesteps.cpu().long(), artifact.timesteps.long()):
        raise TintError(f"{where}: the backbone's DDIM timesteps differ from the artifact's; "
                        "use the backbone and scheduler it was made with")


# ---------------------------------------------------------------------------------------------
# Algorithm 1


def specialize(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
               settings: SpecializeSettings | dict | None = None) -> Path:
    """TI on all supports, NTI per support; write the class artifact (atomically, last)."""
    return _specialize(backbone, class_name, support, out_dir,
                       settings_from(SpecializeSettings, settings), NAME)


def specialize_lora(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
                    settings: LoraSpecializeSettings | dict | None = None) -> Path:
    """tint-lora: TI, then UNet adapters on the supports, then NTI on the adapted UNet."""
    return _specialize(backbone, class_name, support, out_dir,
                       settings_from(LoraSpecializeSettings, settings), LORA_NAME)


def _specialize(backbone: Any, class_name: str, support: torch.Tensor, out_dir: str | Path,
                s: SpecializeSettings, generator: str) -> Path:
    word = learn_class_word(backbone, class_name, support, s, generator)
    images = word.images
    install_token_embedding(backbone, word.token, word.embedding)
    prompt = s.template.format(word.token)
    lora, extra = _train_adapters(backbone, images, prompt, s)
    cond = backbone.encode_prompt([prompt])

    nti_config = NullTextConfig(num_steps=s.num_steps, guidance=s.guidance,
                                inner_steps=s.nti_inner_steps, lr=s.nti_lr, schedule=s.nti_schedule)
    empty = backbone.encode_prompt([""])
    z_T, uncond = [], []
    with with_adapters(backbone, lora, extra.get("lora")):
        for result in _invert_supports(backbone, images, cond, empty, nti_config, s, class_name):
            z_T.append(result.z_T.reshape(backbone.latent_shape).float().cpu())
            uncond.append(result.uncond_embeddings.float().cpu())

    target = artifact_path(out_dir, class_name)
    save_learned_word(target, word)
    return save_tint_artifact(  # written last: it marks the class done
        target, backbone, class_name=class_name, token=word.token, prompt=prompt,
        embedding=word.embedding, z_T=torch.stack(z_T), uncond=torch.stack(uncond),
        guidance=s.guidance, dataset_resolution=word.dataset_resolution,
        support=images if s.store_support else None, extra={**word.provenance(s), **extra},
        lora=lora, generator=generator,
    )


def _train_adapters(backbone: Any, images: torch.Tensor, prompt: str,
                    s: SpecializeSettings) -> tuple[dict[str, torch.Tensor], dict]:
    """tint-lora's extra step: (adapter weights, their metadata); nothing for tint."""
    if not isinstance(s, LoraSpecializeSettings):
        return {}, {}
    from tint.diffusion.lora import train_class_adapter

    config = s.adapter_config()
    tensors, losses = train_class_adapter(backbone, images, prompt, config, progress=s.progress)
    meta = {"rank": config.rank, "alpha": config.alpha, "targets": list(config.targets)}
    return tensors, {"lora": meta, "lora_first_loss": losses[0], "lora_final_loss": losses[-1]}


def _invert_supports(backbone: Any, images: torch.Tensor, cond: torch.Tensor, empty: torch.Tensor,
                     config: NullTextConfig, s: SpecializeSettings,
                     class_name: str) -> list[NullTextResult]:
    """NTI of every support: one batched optimisation (`nti_batch`) or one at a time."""
    if s.nti_batch:
        z0 = backbone.encode_images(images)
        return null_text_inversion_batched(backbone, z0, cond, empty, config, progress=s.progress)
    return [null_text_inversion(backbone, backbone.encode_images(images[k:k + 1]), cond, empty,
                                config)
            for k in tqdm(range(images.shape[0]), desc=f"NTI {class_name}", leave=False,
                          disable=not s.progress)]


def save_tint_artifact(path: str | Path, backbone: Any, *, class_name: str, token: str,
                       prompt: str, embedding: torch.Tensor, z_T: torch.Tensor,
                       uncond: torch.Tensor, guidance: float, dataset_resolution: int,
                       support: torch.Tensor | None = None, extra: dict | None = None,
                       lora: dict[str, torch.Tensor] | None = None, generator: str = NAME) -> Path:
    """Write a TINT artifact: embedding [D], z_T [K,C,h,w], uncond [K,T,L,D], timesteps [T]
    (+ tint-lora's adapter weights as ``lora.<name>``)."""
    num_steps = int(uncond.shape[1])
    backbone.scheduler.set_timesteps(num_steps)
    tensors = {
        "embedding": embedding.detach().float().reshape(-1).cpu(),
        "z_T": z_T.detach().float().cpu(),
        "uncond": uncond.detach().float().cpu(),
        "timesteps": backbone.scheduler.timesteps.detach().cpu().long(),
    }
    if support is not None:
        tensors["support"] = support.detach().float().cpu()
    tensors.update({LORA_PREFIX + key: value for key, value in (lora or {}).items()})
    meta = artifact_meta(backbone, generator, class_name, token=token, prompt=prompt,
                         num_steps=num_steps, guidance=guidance, support_count=int(z_T.shape[0]),
                         dataset_resolution=int(dataset_resolution), **(extra or {}))
    return save_artifact(path, tensors, meta)


# ---------------------------------------------------------------------------------------------
# Algorithm 2


@dataclass
class ImageDraw:
    """The random choices behind one image: all from the image's own RNG."""

    index: int
    seed: int
    k: int
    alpha: float
    noise: torch.Tensor  # latent-shaped, float32, CPU


def draw_image(run_seed: int, class_name: str, index: int, num_supports: int,
               latent_shape: Sequence[int], settings: GenerateSettings) -> ImageDraw:
    """k, alpha, n for image `index`; always drawn in this order so fixed/random alpha share n."""
    k, alpha, noise = draw_support_and_noise(image_rng(run_seed, class_name, index), num_supports,
                                             settings.alpha, settings.alpha_range, latent_shape)
    return ImageDraw(index, image_seed(run_seed, class_name, index), k, alpha, noise)


def prepare_backbone(backbone: Any, artifact: TintArtifact) -> torch.Tensor:
    """Check the artifact fits, install its token, return the conditional embedding [1,L,D]."""
    check_backbone_matches(backbone, artifact)
    install_token_embedding(backbone, artifact.token, artifact.embedding)
    return backbone.encode_prompt([artifact.prompt])


def sample_latents(backbone: Any, artifact: TintArtifact, draws: Sequence[ImageDraw],
                   cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """One batched DDIM run: image b starts from blend(z_T[k_b], n_b) with u_t[k_b]."""
    from tint.diffusion.ddim import ddim_sample

    device = backbone.device
    ks = torch.tensor([d.k for d in draws])
    z_T = artifact.z_T[ks].to(device)
    noise = torch.stack([d.noise for d in draws]).to(device)
    alpha = torch.tensor([d.alpha for d in draws], dtype=torch.float64)
    z_start = blend_latents(z_T, noise, alpha).to(backbone.dtype)
    uncond = artifact.uncond[ks].transpose(0, 1).contiguous().to(device, backbone.dtype)  # [T,B,L,D]
    cond = cond.to(device, backbone.dtype).expand(len(draws), -1, -1)
    return ddim_sample(backbone, z_start, cond, uncond, guidance, artifact.timesteps.numel())


def sample_images(backbone: Any, artifact: TintArtifact, draws: Sequence[ImageDraw],
                  guidance: float | None = None) -> torch.Tensor:
    """Images at model resolution [B,3,M,M] in [0,1] for the given draws (no files)."""
    cond = prepare_backbone(backbone, artifact)
    guidance = artifact.meta["guidance"] if guidance is None else guidance
    with adapter_of(backbone, artifact):
        latents = sample_latents(backbone, artifact, draws, cond, guidance)
    return backbone.decode_latents(latents)


def generate(backbone: Any, artifact_path: str | Path, n_images: int, out_dir: str | Path,
             seed: int = 0, settings: GenerateSettings | dict | None = None) -> list[Path]:
    """Make images 0..n_images-1 of the artifact's class that are not already done."""
    return _generate(backbone, artifact_path, n_images, out_dir, seed, settings, NAME)


def generate_lora(backbone: Any, artifact_path: str | Path, n_images: int, out_dir: str | Path,
                  seed: int = 0, settings: GenerateSettings | dict | None = None) -> list[Path]:
    """tint-lora: Algorithm 2 with the class's UNet adapters attached."""
    return _generate(backbone, artifact_path, n_images, out_dir, seed, settings, LORA_NAME)


def _generate(backbone: Any, artifact_path: str | Path, n_images: int, out_dir: str | Path,
              seed: int, settings: GenerateSettings | dict | None, generator: str) -> list[Path]:
    s = settings_from(GenerateSettings, settings)
    check_count(n_images)
    artifact = load_tint_artifact(artifact_path, generator)
    out_dir = Path(out_dir)
    class_name = artifact.class_name
    resolution = s.resolution or int(artifact.meta["dataset_resolution"])
    guidance = artifact.meta["guidance"] if s.guidance is None else s.guidance
    _check_same_run(out_dir, class_name, seed, s, generator)
    todo = missing_indices(out_dir, class_name, n_images)
    if todo:
        cond = prepare_backbone(backbone, artifact)
        with adapter_of(backbone, artifact):
            for batch in batches(todo, s.batch_size, f"generate {class_name}", s.progress):
                draws = [draw_image(seed, class_name, i, artifact.num_supports,
                                    backbone.latent_shape, s) for i in batch]
                latents = sample_latents(backbone, artifact, draws, cond, guidance)
                images = ResolutionBridge.to_dataset(backbone.decode_latents(latents), resolution)
                rows = [{"k": d.k, "alpha": d.alpha, "seed": seed, "image_seed": d.seed,
                         "generator": generator} for d in draws]
                write_generated(out_dir, class_name, batch, images, rows)
    return manifest_paths(out_dir, class_name, n_images)


def _check_same_run(out_dir: Path, class_name: str, seed: int, s: GenerateSettings,
                    generator: str = NAME) -> None:
    """Resuming must not mix images of another seed or alpha setting into one folder."""
    for row in read_manifest(out_dir):
        if row.get("class") != class_name:
            continue
        lo, hi = s.alpha_range if s.alpha_range is not None else (s.alpha, s.alpha)
        if (row.get("seed") != seed or row.get("generator") != generator
                or not lo <= row["alpha"] <= hi):
            raise TintError(f"{out_dir}: holds {class_name!r} images made with generator "
                            f"{row.get('generator')!r}, seed {row.get('seed')}, alpha "
                            f"{row.get('alpha')}; this run asks for {generator!r}, seed {seed}, "
                            f"alpha {[lo, hi]}: choose another output folder")


# ---------------------------------------------------------------------------------------------
# tint-lora: the generator contract of the variant (registered as "tint-lora")


@dataclass(frozen=True)
class GeneratorVariant:
    """A second generator name served by this module (tint.generators.base.Generator)."""

    NAME: str
    SpecializeSettings: type
    GenerateSettings: type
    REQUIRED_TENSORS: tuple[str, ...]
    MAY_RETURN_FEWER: bool
    specialize: Callable[..., Path]
    generate: Callable[..., list[Path]]


TINT_LORA = GeneratorVariant(LORA_NAME, LoraSpecializeSettings, GenerateSettings,
                             REQUIRED_TENSORS, MAY_RETURN_FEWER, specialize_lora, generate_lora)
