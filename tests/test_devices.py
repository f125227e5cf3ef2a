"""Device and precision plumbing, checked on the CPU: a dtype or device mismatch anywhere in
a stage fails here, not on a user's GPU. (Speed is measured in benchmarks/, never here.)"""

from __future__ import annotations

import argparse

import pytest
import torch
from test_pipeline import tiny_config, write_tiny_dataset

from tint.config import config_from_dict
from tint.devices import (
    add_device_arguments,
    autocast,
    device_and_precision,
    grad_scaler,
    precision_dtype,
    resolve_device,
    resolve_precision,
    sampling_dtype,
)
from tint.diffusion.backbone import attention_processors, load_backbone
from tint.diffusion.ddim import ddim_sample
from tint.diffusion.null_text import NullTextConfig, null_text_inversion_batched
from tint.diffusion.textual_inversion import TextualInversionConfig, textual_inversion
from tint.errors import TintError

# --------------------------------------------------------------------------- resolving


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(TintError, match=rf"device '{spec}': CUDA is not available.*cpu or auto"):
            resolve_device(spec)
    with pytest.raises(TintError, match="--device 'gpu': choose auto, cpu, cuda or cuda:N"):
        resolve_device("gpu", option="--device")
    with pytest.raises(TintError, match="index must be a number"):
        resolve_device("cuda:x")


def test_resolve_device_with_two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(TintError, match=r"device 'cuda:2': this machine has 2 GPU\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_precision_policy(monkeypatch):
    assert resolve_precision("auto", "cpu") == "fp32"  # CPU stays float32 under auto
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(TintError, match="precision fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(TintError, match="precision 'fp8': choose one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp16"  # e.g. a V100 / T4
    assert sampling_dtype("fp16") == torch.float16 and precision_dtype("bf16") == torch.bfloat16
    with pytest.raises(TintError, match="resolve it first"):
        precision_dtype("auto")


def test_autocast_is_a_no_op_for_fp32_and_bf16_on_cpu():
    a = torch.randn(8, 8)
    with autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    assert not grad_scaler("cpu", "bf16").is_enabled()  # only fp16 on CUDA scales losses


@pytest.mark.parametrize("command", ["specialize", "generate", "fid", "pretrain-generator"])
def test_commands_take_device_and_precision_flags(command):
    from tint.cli import _command_parser

    parser, _ = _command_parser(command)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    assert "--device" in flags
    assert ("--precision" in flags) == (command != "fid")  # FID features stay float32


def test_device_flags_resolve_with_the_flag_named_in_errors():
    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    assert device_and_precision(parser.parse_args([])) == (torch.device("cpu"), "fp32")
    assert device_and_precision(parser.parse_args(["--precision", "bf16"]))[1] == "bf16"
    if not torch.cuda.is_available():
        with pytest.raises(TintError, match="--device 'cuda:0'"):
            device_and_precision(parser.parse_args(["--device", "cuda:0"]))


# --------------------------------------------------------------------------- diffusion in bf16


@pytest.fixture(scope="module")
def prompts():
    torch.set_num_threads(1)
    return ["a photo of an object"], [""]


def test_sampling_with_bf16_weights_returns_float32(prompts):
    fp32 = load_backbone("tiny")
    bf16 = load_backbone("tiny", dtype=torch.bfloat16)
    assert bf16.dtype == bf16.vae_dtype == bf16.text_encoder.dtype == torch.bfloat16
    zT = torch.randn(2, *fp32.latent_shape, generator=torch.Generator().manual_seed(0))
    images = {}
    for name, backbone in (("fp32", fp32), ("bf16", bf16)):
        cond, uncond = (backbone.encode_prompt(p) for p in prompts)
        z0 = ddim_sample(backbone, zT, cond, uncond, guidance=7.5, num_steps=3)
        assert z0.dtype == torch.float32 and torch.isfinite(z0).all()
        images[name] = backbone.decode_latents(z0)
        assert images[name].dtype == torch.float32
    # bf16 keeps 8 mantissa bits: the same images up to a small difference
    assert float((images["fp32"] - images["bf16"]).abs().mean()) < 0.05


def test_vae_slicing_decodes_the_same_images():
    backbone = load_backbone("tiny")
    z = torch.randn(5, *backbone.latent_shape, generator=torch.Generator().manual_seed(1))
    whole = backbone.decode_latents(z)
    backbone.vae_slice_size = 2
    assert torch.allclose(backbone.decode_latents(z), whole, atol=1e-5)


def test_attention_goes_through_pytorch_sdpa():
    """diffusers' default processor on torch 2 is AttnProcessor2_0 (F.scaled_dot_product_attention)."""
    counts = attention_processors(load_backbone("tiny"))
    assert set(counts) == {"AttnProcessor2_0"} and counts["AttnProcessor2_0"] > 0


def _dtype_spy(module: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_textual_inversion_under_bf16_autocast_trains_a_float32_row(tmp_path):
    backbone = load_backbone("tiny", precision="bf16")  # float32 weights, bf16 compute
    seen = _dtype_spy(backbone.unet.conv_in)
    images = torch.rand(2, 3, backbone.resolution, backbone.resolution,
                        generator=torch.Generator().manual_seed(2))
    config = TextualInversionConfig(steps=3, lr=1e-2, log_every=0)
    result = textual_inversion(backbone, images, config, progress=False)
    assert set(seen) == {torch.bfloat16}  # the UNet ran under autocast
    assert result.embedding.dtype == torch.float32 and torch.isfinite(result.embedding).all()
    assert backbone.dtype == torch.float32  # weights untouched
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_null_text_inversion_under_bf16_autocast_stays_finite(prompts):
    backbone = load_backbone("tiny")
    cond, uncond = (backbone.encode_prompt(p) for p in prompts)
    z0 = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(3))
    seen = _dtype_spy(backbone.unet.conv_in)
    with autocast("cpu", "bf16"):
        results = null_text_inversion_batched(backbone, z0, cond, uncond,
                                              NullTextConfig(num_steps=3, inner_steps=2, lr=0.1))
    assert torch.bfloat16 in seen
    for result in results:
        assert result.uncond_embeddings.dtype == result.z_T.dtype == torch.float32
        assert torch.isfinite(result.uncond_embeddings).all() and torch.isfinite(result.z_T).all()


def test_distillation_under_bf16_autocast_keeps_float32_weights(tmp_path):
    from tint.students import create_student
    from tint.students.distill import DistillConfig, DistillSource, distill

    student = create_student("conv4", 3, image_size=32)
    seen = _dtype_spy(next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d)))
    images = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    sources = {"support": DistillSource(torch.arange(9) % 3, images=images)}
    config = DistillConfig(iterations=2, batch_size=6, eval_every=1, checkpoint_every=1,
                           sources=("support",))
    result = distill(student, sources, config, tmp_path, progress=False, precision="bf16")
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in result.history)
    with pytest.raises(TintError, match="fp16 needs a CUDA device"):
        distill(student, sources, config, tmp_path / "fp16", progress=False, precision="fp16")


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory):
    """configs/tiny.yaml-like, one episode, `device: cpu` and `precision: bf16`, with spies on
    every place a stage chooses a device or a dtype."""
    import tint.diffusion.backbone as backbone_module
    import tint.students.distill as distill_module
    import tint.teachers.protonet as protonet
    from tint.pipeline import run_pipeline

    data_root = write_tiny_dataset(tmp_path_factory.mktemp("devices_data"))
    run_dir = tmp_path_factory.mktemp("devices_run") / "run"
    config = config_from_dict(tiny_config(data_root, run_dir, device="cpu", precision="bf16", **{
        "data.n_episodes": 1, "generator.images_per_class": 2, "distill.iterations": 2,
        "distill.eval_every": 2, "distill.checkpoint_every": 2,
        "teacher.meta_train.episodes_per_epoch": 1, "export": {"onnx": False},
        "report.enabled": False}))
    seen: dict[str, list] = {"backbones": [], "teachers": [], "students": [], "to": []}
    patch = pytest.MonkeyPatch()

    def spy(module, name, record):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            seen[record].append((args, kwargs, out))
            return out

        patch.setattr(module, name, wrapper)

    spy(backbone_module, "load_backbone", "backbones")
    spy(protonet, "load_for_run", "teachers")
    spy(protonet, "train_for_run", "teachers")
    spy(distill_module, "distill", "students")
    original_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            seen["to"].append((type(self).__name__, torch.device(device)))
        return original_to(self, *args, **kwargs)

    patch.setattr(torch.nn.Module, "to", to)
    try:
        results = run_pipeline(config)
    finally:
        patch.undo()
    return results, seen


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end_in_bf16_on_cpu(spied_run):
    results, seen = spied_run
    assert len(results["episodes"]) == 1  # every stage completed and was reported
    accuracy = results["episodes"][0]["accuracy"]
    assert set(accuracy) == {"teacher", "without-synthetic", "with-tint"}
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    assert all(seconds >= 0 for seconds in results["timings"].values())
    # specialisation on float32 weights with bf16 autocast; generation on bf16 weights
    loads = [(kw.get("dtype"), kw.get("precision")) for _, kw, _ in seen["backbones"]]
    assert (torch.float32, "bf16") in loads and (torch.bfloat16, "bf16") in loads
    assert all(kw.get("precision") == "bf16" for _, kw, _ in seen["students"])
    for _, _, result in seen["students"]:
        assert all(torch.isfinite(torch.tensor(e["loss"])) for e in result.history)


@pytest.mark.slow
def test_every_stage_uses_the_configured_device(spied_run):
    _, seen = spied_run
    cpu = torch.device("cpu")
    assert seen["backbones"] and seen["teachers"] and seen["students"]
    for _, kwargs, backbone in seen["backbones"]:  # specialise + generate
        assert torch.device(kwargs["device"]) == cpu
        for module in (backbone.unet, backbone.vae, backbone.text_encoder):
            assert {p.device for p in module.parameters()} <= {cpu}
    for args, _, _ in seen["teachers"]:  # meta-training and loading got the run's device
        assert args[0].device == cpu
    for args, _, _ in seen["students"]:  # distillation: the config's device, the student on it
        student, _, config = args[:3]
        assert torch.device(config.device) == cpu
        assert {p.device for p in student.parameters()} == {cpu}
    moved = {name for name, device in seen["to"]}
    assert {"ProtoNetTeacher", "UNet2DConditionModel"} <= moved  # moved explicitly, not by luck
    assert {device for _, device in seen["to"]} == {cpu}
