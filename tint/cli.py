"""The `tint` command.

Each sub-command lives in the module that owns its stage and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. They are imported lazily so that
``tint --help`` is instant and a broken optional stage cannot break the others.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path

from tint.errors import TintError

INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)

# name -> (module, one-line help). Keep in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "episodes": ("tint.data.episodes_cli", "sample N-way K-shot episodes and write an episode file"),
    "plan": ("tint.evaluation.plan_cli", "plan episodes/queries with the variance theorem (Theorem 1)"),
    "pretrain-generator": ("tint.diffusion.pretrain", "pretrain tint's own small text-to-image generator"),
    "specialize": ("tint.generators.cli", "specialise a generator to the support images (TI + NTI)"),
    "generate": ("tint.generators.cli_generate", "generate synthetic images from a specialisation artifact"),
    "run": ("tint.run_cli", "run every stage of a config (default: the embedded demo), resumable"),
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
    args = parse_command_line(sub_parser, argv[1:])
    try:
        return int(module.run(args) or 0)
    except TintError as err:
        return _fail(name, str(err))
    except KeyboardInterrupt:
        print(f"tint {name}: interrupted; finished work is kept: run the same command again "
              "to resume", file=sys.stderr)
        return INTERRUPTED
    except OSError as err:
        if os.environ.get("TINT_DEBUG"):
            raise
        return _fail(name, os_error_message(err))


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Positionals may come before, between or after options, as the docs write them
    (`tint fit DATA_DIR --out MODEL_DIR [CONFIG]`): plain `parse_args` stops filling an
    optional positional at the first option and then rejects CONFIG as unrecognised."""
    try:
        return parser.parse_intermixed_args(argv)
    except TypeError:  # a parser feature intermixed parsing does not support
        return parser.parse_args(argv)


def _fail(name: str, message: str) -> int:
    """One line on stderr, exit status 2: the user can act on it, a traceback would not help."""
    print(f"tint {name}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def os_error_message(err: OSError) -> str:
    """An operating-system error as one line: the path, what happened, what to do."""
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    where = " -> ".join(paths) if paths else _path_in_traceback(err) or "a file"
    reason = err.strerror or str(err) or type(err).__name__
    advice = _OS_ADVICE.get(err.errno or 0, "check the path and run the same command again")
    return f"{where}: {reason}; {advice}"


def _path_in_traceback(err: BaseException) -> str | None:
    """The file a failed write() was writing: such errors (a full disk) carry no name,
    but the innermost tint function on the way down holds it as `path`."""
    tb, found = err.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        value = frame.f_locals.get("path")
        if frame.f_globals.get("__name__", "").startswith("tint.") and isinstance(value, str | Path):
            found = str(value)
        tb = tb.tb_next
    return found


_OS_ADVICE = {
    errno.ENOSPC: "free disk space (or use another --run-dir/--out) and run the same command "
                  "again to resume",
    errno.EDQUOT: "free space within your disk quota and run the same command again to resume",
    errno.EROFS: "that file system is read-only: write to a writable folder (--run-dir/--out)",
    errno.EACCES: "permission denied: fix the permissions or write to a folder you own",
    errno.EPERM: "operation not permitted: fix the permissions or write to a folder you own",
    errno.EISDIR: "that is a folder: give a file",
    errno.ENOTDIR: "a part of that path is a file, not a folder: fix the path",
    errno.ENOENT: "no such file or folder: check the path",
}


if __name__ == "__main__":
    sys.exit(main())
