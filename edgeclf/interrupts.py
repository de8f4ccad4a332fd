"""SIGTERM and SIGINT that stop a long TensorFlow job at any point.

Python runs its signal handlers only between bytecodes of the main thread, so a process
blocked in TensorFlow's C++ (a collective waiting for a multi-worker peer, say) never
runs them; and TensorFlow's coordination service installs its own SIGTERM handler, which
only takes note. Both made ``train --strategy multiworker`` ignore SIGTERM and Ctrl+C.

:func:`stop_on_signals` blocks both signals in every thread and takes them in one of its
own with ``sigwait``, so no handler of anyone else's sees them. The first signal raises
KeyboardInterrupt in the main thread (a clean stop: the finished epochs' checkpoint stays,
nothing is left half-written); if the main thread has not stopped ``grace_s`` seconds
later, or a second signal comes, the process exits with status 130 and one line saying so.
Checkpoint and bundle writes are atomic (staged, then renamed), so that loses nothing
either.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

SIGNALS = {signal.SIGINT, signal.SIGTERM}
#: Exit status of a process stopped by a signal it could not act on in time (128 + SIGINT).
EXIT_INTERRUPTED = 130


@contextmanager
def stop_on_signals(grace_s: float = 10.0) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM raise KeyboardInterrupt, and end the process if that cannot act.

    Only the main thread may enter it (signal masks are set per thread, and new threads
    inherit the main thread's). Enter it before importing TensorFlow, so TensorFlow's
    threads are created with the signals blocked.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    # The watcher interrupts the main thread through SIGTERM's Python handler: SIGINT's may be
    # SIG_IGN (a background job of a shell), and the signal itself never reaches a handler here.
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(grace_s, done), name="edgeclf-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        # Wake the watcher: a signal to this thread only, which the watcher takes and drops.
        signal.pthread_kill(watcher.ident, signal.SIGINT)
        watcher.join(timeout=5)
        signal.signal(signal.SIGTERM, previous_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _watch(grace_s: float, done: threading.Event) -> None:
    received = signal.sigwait(SIGNALS)
    if done.is_set():
        return
    print(f"[edgeclf] {signal.Signals(received).name}: stopping (again to exit at once)", file=sys.stderr, flush=True)
    _thread.interrupt_main(signal.SIGTERM)  # KeyboardInterrupt once the main thread runs Python again
    again = threading.Event()
    threading.Thread(target=lambda: (signal.sigwait(SIGNALS), again.set()), daemon=True).start()
    deadline = time.monotonic() + grace_s
    while not done.is_set() and not again.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    if done.is_set():
        return  # the block ended (the interrupt was taken)
    reason = "a second signal" if again.is_set() else f"still blocked in a library call after {grace_s:g} s"
    print(f"error: interrupted ({reason}); exiting", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)
