"""The ``edgeclf`` command line: a dispatcher over :mod:`edgeclf.commands`, one module per command.

Errors of the project's own types print as one ``error: ...`` line with exit status 1; a
path the system refuses is one line too; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import warnings
from typing import Callable, Sequence

from edgeclf import __version__
from edgeclf.commands import COMMANDS
from edgeclf.errors import EdgeclfError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeclf",
        description="Train, export, verify and run Keras integer image classifiers on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgeclf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"edgeclf.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``edgeclf`` command. Run as a program (``argv`` None), ``train`` runs in a child process
    under a supervisor that SIGTERM and Ctrl+C always reach (see edgeclf.interrupts)."""
    from edgeclf.interrupts import is_supervised, run_supervised

    if argv is None:
        argv = sys.argv[1:]
        if argv[:1] == ["train"]:
            if not is_supervised():
                return run_supervised(argv)
            # The supervisor's SIGINT must raise KeyboardInterrupt here, even where a shell started
            # the command with SIGINT ignored (a background job).
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return _run(list(argv))


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EdgeclfError as exc:
        # One line, whatever a library put in the message it carries.
        print("error: " + " / ".join(line.strip() for line in str(exc).splitlines() if line.strip()),
              file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a path the user gave: a bug, with its traceback
        # A path the system refuses (a name too long, no permission, a loop of links): one line.
        print(f"error: {exc.strerror or exc}. Received: {str(exc.filename)[:200]}"
              f"{'...' if len(str(exc.filename)) > 200 else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
