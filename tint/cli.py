"""The `tint` command.

Each sub-command lives in the module that owns its stage and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. They are imported lazily so that
``tint --help`` is instant and a broken optional stage cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tint.errors import TintError

# name -> (module, one-line help). Keep in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "episodes": ("tint.data.episodes_cli", "sample N-way K-shot episodes and write an episode file"),
    "plan": ("tint.evaluation.plan_cli", "plan episodes/queries with the variance theorem (Theorem 1)"),
    "pretrain-generator": ("tint.diffusion.pretrain", "pretrain tint's own small text-to-image generator"),
    "specialize": ("tint.generators.cli", "specialise a generator to the support images (TI + NTI)"),
    "generate": ("tint.generators.cli_generate", "generate synthetic images from a specialisation artifact"),
    "run": ("tint.pipeline", "run every stage of a config (default: the embedded demo), resumable"),
    "experiment": ("tint.experiment", "run a grid of methods over fixed episodes and tabulate results"),
    "fid": ("tint.evaluation.fid_cli", "FID on 64-dim features between two image sets"),
    "export": ("tint.export", "export a trained student to TorchScript and ONNX"),
    "fit": ("tint.fitting", "train a tiny classifier from a folder of labelled images (DIR/<class>/<images>)"),
    "predict": ("tint.predict", "label images with a model folder from `tint fit` (onnxruntime, no torch)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tint",
        description="Turn a few labelled images per class into a tiny, fast classifier.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"tint {name}", description=help_text)
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from: {', '.join(COMMANDS)}")
    sub_parser, module = _command_parser(name)
    args = sub_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except TintError as err:
        print(f"tint {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
