"""Where tint computes (the device) and in which number format (the precision), per stage.

Two execution-only settings, never part of an artifact key (a run started on the CPU can be
finished on a GPU and reuses what is done):

- ``device``: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N".
- ``precision``: "auto", "fp32", "bf16" or "fp16". "auto" is float32 on the CPU (bf16
  autocast is ~5x slower than float32 on this project's CPUs for the diffusion models) and
  bf16 on CUDA (fp16 where the GPU has no bf16).

What each stage does with the resolved precision (docs/diffusion.md, "Precision"):

- sampling (generation, FID features, teacher features): weights and activations in
  `sampling_dtype` (fp16/bf16 on CUDA), the DDIM arithmetic in float32;
- training-like stages (textual inversion, distillation, teacher meta-training): float32
  weights and trainable parameters, forward passes under `autocast` (a no-op for fp32),
  with a `grad_scaler` for fp16;
- null-text inversion: float32 (TF32 matmuls allowed on CUDA, `allow_tf32`);
- export: always float32 on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from tint.errors import TintError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}


# --------------------------------------------------------------------------- device


def resolve_device(spec: str | torch.device | None = "auto", option: str = "device") -> torch.device:
    """The torch device for a `device` setting; a CUDA device must exist on this machine."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        return _cuda_device(text, option)
    raise TintError(f"{option} {spec!r}: choose {DEVICE_CHOICES}")


def _cuda_device(text: str, option: str) -> torch.device:
    index_text = text.partition(":")[2]
    if index_text and not index_text.isdigit():
        raise TintError(f"{option} {text!r}: the GPU index must be a number, e.g. cuda:0")
    if not torch.cuda.is_available():
        raise TintError(f"{option} {text!r}: CUDA is not available on this machine (torch "
                        f"{torch.__version__}); set {option} to cpu or auto")
    index = int(index_text) if index_text else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise TintError(f"{option} {text!r}: this machine has {count} GPU(s), cuda:0.."
                        f"cuda:{count - 1}; choose one of them or auto")
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """A human description for logs and benchmark reports."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings are meaningless without it); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device | str, option: str = "precision") -> str:
    """"fp32", "bf16" or "fp16" for a `precision` setting on `device`."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise TintError(f"{option} {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise TintError(f"{option} fp16 needs a CUDA device (the CPU has no fast float16); "
                        "use bf16 or fp32 on the CPU")
    return precision


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved precision ("fp32", "bf16", "fp16")."""
    if precision not in DTYPES:
        raise TintError(f"precision {precision!r}: resolve it first (fp32, bf16 or fp16)")
    return DTYPES[precision]


def sampling_dtype(precision: str) -> torch.dtype:
    """Weights' dtype for inference-only stages (generation, FID and teacher features)."""
    return precision_dtype(precision)


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass over float32 weights; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    device = torch.device(device)
    return torch.autocast(device.type, dtype=precision_dtype(precision))


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """Loss scaling, enabled only for fp16 on CUDA (bf16 and fp32 need none)."""
    device = torch.device(device)
    enabled = precision == "fp16" and device.type == "cuda"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def allow_tf32(device: torch.device | str) -> None:
    """TF32 tensor-core matmuls/convolutions for float32 work on CUDA (null-text inversion).

    10-bit mantissa products with float32 accumulation: what float32 training of diffusion
    models uses on Ampere and later; a no-op on the CPU.
    """
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------- CLI


def add_device_arguments(parser: argparse.ArgumentParser, precision: bool = True,
                         default_device: str = "auto") -> None:
    """`--device` (and `--precision`) as every command that computes spells them."""
    parser.add_argument("--device", default=default_device,
                        help=f"where to compute: {DEVICE_CHOICES} (auto: CUDA when available)")
    if precision:
        parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                            help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16 (CUDA); "
                                 "see docs/diffusion.md")


def device_and_precision(args: argparse.Namespace) -> tuple[torch.device, str]:
    """Resolve a command's --device/--precision (each error names its flag)."""
    device = resolve_device(getattr(args, "device", "auto"), option="--device")
    precision = resolve_precision(getattr(args, "precision", "auto"), device, option="--precision")
    return device, precision
