"""`kdlab`: the command-line interface.

Each subcommand lives in its own module under `kdlab/commands/` and exposes
`register(subparsers)`; this file only discovers them, sets up logging, and turns
`KDLabError` into a one-paragraph message with exit code 2 (no traceback for user errors).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

import kdlab.commands
from kdlab.commands._common import add_import_arg
from kdlab.errors import KDLabError

DESCRIPTION = """\
kdlab: knowledge distillation for image classifiers and object detectors (task: detection).

Methods: Hinton KD, DKD (decoupled KD), ReviewKD (knowledge review), tolerant teachers
trained in generations. Every experiment is one YAML config; any value can be
overridden on the command line as a dotted key=value pair.
"""

EPILOG = """\
examples:
  kdlab demo                                         # end to end on the bundled digits (~1 min)
  kdlab train configs/cifar100/teachers/resnet32x4.yaml data.root=/data/cifar
  kdlab train configs/cifar100/dkd/resnet32x4_resnet8x4.yaml \\
        teacher.checkpoint=runs/resnet32x4/best.pt train.epochs=240
  kdlab train CONFIG --resume                        # continue an interrupted run
  kdlab train CONFIG --overwrite                     # replace the earlier run in that folder
  kdlab eval runs/dkd_resnet32x4_resnet8x4/best.pt
  kdlab cache-teacher CONFIG teacher.cache=PATH      # teacher logits of every crop/flip view, once
  kdlab -q train CONFIG                              # warnings and errors only, no progress bars

Progress bars are drawn only when stderr is a terminal (a log file gets one line per epoch);
train.progress=false turns them off everywhere. train.save=last|best|none chooses the checkpoints
a run keeps (default last: last.pt resumes exactly, best.pt holds the weights only).

'kdlab COMMAND --help' explains each command.
"""


def _commands():
    for info in sorted(pkgutil.iter_modules(kdlab.commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"kdlab.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdlab", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors: no progress bars and no per-epoch lines "
                        "(bars alone: train.progress=false)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _commands():
        module.register(sub)
    for command in sub.choices.values():
        add_import_arg(command)
    return parser


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `kdlab train CFG --resume a.b=1`: argparse stops collecting the positional overrides at
    # the option, so key=value words after it arrive here; they are overrides all the same.
    stray = [w for w in extra if w.startswith("-") or "=" not in w]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    resume = getattr(args, "resume", None)
    if isinstance(resume, str) and "=" in resume and not os.path.exists(resume):
        extra.insert(0, resume)  # `--resume key=value`: a bare --resume, then an override
        args.resume = True
    if extra:
        args.overrides = list(args.overrides) + extra
    if not args.command:
        parser.print_help()
        return 0
    setup_logging(args.quiet)
    try:
        # lazy: keeps `kdlab --help` fast (a plugin imports torch; the command is about to run anyway)
        from kdlab.config.plugins import command_line_imports

        with command_line_imports(args.imports):
            return int(args.func(args) or 0)
    except KDLabError as exc:
        print(f"kdlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
