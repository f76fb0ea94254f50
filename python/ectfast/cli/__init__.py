"""The ``ectfast`` command line: one sub-command per module.

Each sub-command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only registers them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command -> (module, one-line help)
COMMANDS = {
    "detect": ("ectfast.app.detector", "detect faces and 68 landmarks in images, draw them and write JSON"),
    "eval": ("ectfast.app.evaluate", "evaluate on a 300-W-layout folder: NME, failure rate, AUC, CED plot"),
    "train": ("ectfast.nets.train", "train the FCN on 300-W-layout folders (checkpoints, resume)"),
    "export-onnx": ("ectfast.nets.export", "export the FCN to ONNX"),
    "bench": ("ectfast.app.benchmark", "throughput of the fit backends on synthetic maps"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ectfast", description="ECT facial landmark detection")
    parser.add_argument("--version", action="version", version=f"ectfast {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # a module not written yet, or a missing optional dependency
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


def main(argv=None) -> int:
    parser = build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
