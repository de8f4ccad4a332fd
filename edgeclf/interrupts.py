"""SIGTERM and Ctrl+C that stop ``edgeclf train`` at any point.

A training process cannot be relied on to act on a signal itself: TensorFlow's
coordination service installs a SIGTERM handler that only takes note, and while a
multi-worker run waits for its peers, TensorFlow holds Python's GIL inside one C++ call
(``Context.ensure_initialized``), so no Python code of that process runs again, in any
thread. Both made ``train --strategy multiworker`` ignore SIGTERM and SIGINT for good.

So the command line runs training in a child process and stays a small supervisor
without TensorFlow (:func:`run_supervised`). On SIGTERM or SIGINT it sends the child
SIGINT, which Python turns into KeyboardInterrupt there as soon as it runs Python again
(a clean stop: finished epochs stay checkpointed, nothing is left half-written). If the
child has not ended ``grace_s`` seconds later, or a second signal comes, it is killed,
and the supervisor says so in one line and exits with status 130. Checkpoint and bundle
writes are atomic (staged, then renamed), so even that loses no finished work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Sequence

#: Set in the child's environment, so that it runs the command instead of supervising again.
SUPERVISED_ENV = "EDGECLF_SUPERVISED"
#: Exit status of a run stopped by SIGINT or SIGTERM (128 + SIGINT, as a shell reports Ctrl+C).
EXIT_INTERRUPTED = 130


def is_supervised() -> bool:
    return os.environ.get(SUPERVISED_ENV) == "1"


#: Interpreter options whose value may be the next argument.
_VALUED = "XW"


def interpreter_options(orig_argv: Sequence[str] | None = None) -> list[str]:
    """The options this interpreter was started with (``-I``, ``-X dev``, ``-W error`` ...), read
    from ``sys.orig_argv`` up to the script, ``-m`` or ``-c``: what a child must be given to run
    as this process does."""
    args = list(sys.orig_argv if orig_argv is None else orig_argv)[1:]
    options: list[str] = []
    while args:
        arg = args.pop(0)
        if arg == "--check-hash-based-pycs" and args:  # the one long option that takes a value
            options += [arg, args.pop(0)]
            continue
        if not arg.startswith("-") or arg in ("-", "--") or arg.startswith("--"):
            return options  # the script, stdin, or --help/--version (which end the run anyway)
        letters = arg[1:]
        for i, letter in enumerate(letters):  # a cluster such as -Im or -bbX dev
            if letter in "mc":
                return options + ([f"-{letters[:i]}"] if i else [])
            if letter in _VALUED:
                value = letters[i + 1:] or (args.pop(0) if args else "")
                options += ([f"-{letters[:i]}"] if i else []) + [f"-{letter}", value]
                break
        else:
            options.append(arg)
    return options


def run_supervised(argv: Sequence[str], grace_s: float = 30.0, program: Sequence[str] | None = None) -> int:
    """Run ``python -m edgeclf ARGV`` (or ``program ARGV``) as a child; return its exit status (130 if
    stopped by a signal)."""
    # The child runs as this interpreter was started (-S, -I, -X ...), as multiprocessing's spawn does.
    interpreter = (sys.executable, *interpreter_options(), "-m", "edgeclf")
    command = [*(program or interpreter), *argv]
    received: list[int] = []
    started: list[subprocess.Popen] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        if len(received) == 1:
            print(f"[edgeclf] {signal.Signals(signum).name}: stopping training (send it again to stop at once)",
                  file=sys.stderr, flush=True)
            if started:
                _send(started[0], signal.SIGINT)

    # The handlers come before the child: a signal that arrives while the child starts is passed on
    # to it (below), not lost to Python's default handler, which would end the supervisor alone.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        child = subprocess.Popen(command, env={**os.environ, SUPERVISED_ENV: "1"}, preexec_fn=_die_with_parent)
    except BaseException:
        for s, handler in previous.items():
            signal.signal(s, handler)
        raise
    started.append(child)
    if received:
        _send(child, signal.SIGINT)
    try:
        deadline = None
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and (len(received) > 1 or time.monotonic() > deadline):
                child.kill()
                child.wait()
                reason = "a second signal" if len(received) > 1 else f"training did not stop within {grace_s:g} s"
                print(f"error: interrupted ({reason}: blocked in a library call, such as TensorFlow waiting for "
                      f"a multi-worker peer); killed", file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:  # the supervisor itself failed: leave no training behind
            child.kill()
            child.wait()
    if received and code != 0:
        return EXIT_INTERRUPTED
    return code if code >= 0 else 128 - code


def _die_with_parent() -> None:
    """In the child: be killed if the supervisor dies without passing a signal on (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _send(child: subprocess.Popen, signum: int) -> None:
    try:
        child.send_signal(signum)
    except ProcessLookupError:
        pass
