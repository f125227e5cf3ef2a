"""`tint run [CONFIG]`: the command line of tint.pipeline.run_pipeline."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tint.config import dump_config, load_config

LOGGER = logging.getLogger("tint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="run config (YAML); default: the embedded demo (tint/configs/demo.yaml)")
    parser.add_argument("--run-dir", default=None, help="where results go (default: the config's run_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set distill.iterations=200 (repeatable)")
    add_execution_arguments(parser)
    parser.add_argument("--allow-config-change", action="store_true",
                        help="reuse a run dir that holds another config's results: replace them "
                             "(finished artifacts are kept and reused)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config and exit without running")


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose where units run; they never change an artifact key."""
    parser.add_argument("--device", default=None,
                        help="auto | cpu | cuda | cuda:N (default: the config's `device`, auto)")
    parser.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16", "fp16"),
                        help="number format per stage (docs/diffusion.md; default: the config's, auto)")
    parser.add_argument("--executor", default=None, choices=("local", "ray"),
                        help="run units in this process (local) or on a Ray cluster (ray)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster address; implies --executor ray (default: RAY_ADDRESS, "
                             "else a local cluster)")


def execution_overrides(args: argparse.Namespace) -> list[str]:
    """The execution flags as `--set` assignments (validated like every other key).

    `--ray-address` implies `--executor ray` (an address only means something to Ray, and
    silently running locally instead would ignore it); with `--executor local` it is an error.
    """
    from tint.errors import TintError

    out = []
    if getattr(args, "ray_address", None):
        if getattr(args, "executor", None) == "local":
            raise TintError(f"--ray-address {args.ray_address}: given with --executor local, which "
                            "runs every unit in this process; drop one of the two")
        args.executor = "ray"
    if getattr(args, "device", None):
        out.append(f"device={args.device}")
    if getattr(args, "precision", None):
        out.append(f"precision={args.precision}")
    if getattr(args, "executor", None):
        out.append(f"executor.name={args.executor}")
    if getattr(args, "ray_address", None):
        out.append(f"executor.address={args.ray_address}")
    return out


def run(args: argparse.Namespace) -> int:
    from tint.pipeline import run_pipeline
    from tint.report import summary_lines

    config = load_config(args.config, [*args.overrides, *execution_overrides(args)])
    if args.run_dir is not None:
        config.run_dir = str(args.run_dir)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("tint: %(message)s"))
    LOGGER.addHandler(console)
    try:
        results = run_pipeline(config, allow_config_change=args.allow_config_change)
    finally:
        LOGGER.removeHandler(console)
    print("\n".join(summary_lines(results)))
    print(f"report: {Path(config.run_dir) / 'report.html'}")
    return 0
