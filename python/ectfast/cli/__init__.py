"""The ``ectfast`` command line: one module per sub-command in this package.

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int``; this file only
registers them. A command's module is imported only when that command runs (or its ``--help``
is asked for), so ``ectfast bench --help`` imports neither torch nor onnxruntime, and a command
whose optional dependency is missing says so instead of breaking the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

#: sub-command -> (module, one-line help)
COMMANDS = {
    "detect": ("ectfast.cli.detect", "detect faces and 68 landmarks in images, draw them and write JSON"),
    "eval": ("ectfast.cli.eval", "evaluate on a 300-W-layout folder: NME, failure rate, AUC, CED plot"),
    "train": ("ectfast.cli.train", "train the estimation network on 300-W-layout folders (checkpoints, resume)"),
    "export-onnx": ("ectfast.cli.export_onnx", "export the estimation network to ONNX"),
    "bench": ("ectfast.cli.bench", "throughput of the fit backends on synthetic maps"),
}


def build_parser(commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser; the options of ``commands`` (default: all) are added, importing their modules."""
    parser = argparse.ArgumentParser(prog="ectfast", description="ECT facial landmark detection")
    parser.add_argument("--version", action="version", version=f"ectfast {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if commands is not None and name not in commands:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # a missing optional dependency
            missing = (getattr(e, "name", None) or "").split(".")[0]
            msg = str(e)
            if missing in ("torch", "onnx"):
                msg = f"needs {missing}, which is not installed: pip install 'ectfast[torch]'"
            p.set_defaults(_import_error=msg)
            continue
        mod.add_arguments(p)
    return parser


def _version() -> str:
    from ectfast import __version__

    return __version__


def _command(argv: Sequence[str]) -> Optional[str]:
    """The sub-command named in ``argv`` (the first argument that is not an option)."""
    for a in argv:
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = _command(argv)
    parser = build_parser([cmd] if cmd else [])
    args, unknown = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    err = getattr(args, "_import_error", None)
    if err:  # its options are unknown here: say why the command is unavailable instead
        print(f"ectfast {args.command}: unavailable ({err})", file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(importlib.import_module(args._module).run(args) or 0)
