"""Progress for long work, on stderr so that stdout stays machine-readable.

On a terminal, :func:`progress` draws a tqdm bar with rate and ETA. Elsewhere (logs,
CI, pipes) a bar's carriage returns would be garbage, so it prints plain
``[edgeclf]`` lines instead: one at the start, one at most every
:data:`PLAIN_INTERVAL_S` seconds with the ETA, and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

#: Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_INTERVAL_S = 30.0


def log(message: str) -> None:
    """Print ``[edgeclf] message`` to stderr at once."""
    print(f"[edgeclf] {message}", file=sys.stderr, flush=True)


def progress(items: Iterable[T], total: int, what: str, unit: str = "it") -> Iterator[T]:
    """Yield ``items`` while showing how far ``what`` has got out of ``total``."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=f"[edgeclf] {what}", unit=unit, file=sys.stderr,
                        dynamic_ncols=True, leave=False)
        return
    yield from _plain(items, total, what, unit)


def _plain(items: Iterable[T], total: int, what: str, unit: str) -> Iterator[T]:
    started = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= PLAIN_INTERVAL_S and done < total:
            rate = done / (now - started)
            log(f"{what}: {done}/{total} {unit} ({rate:.1f} {unit}/s, about {(total - done) / rate:.0f} s left)")
            last = now
    seconds = time.monotonic() - started
    if seconds >= 1.0:  # quick steps stay silent: their callers log what they did
        log(f"{what}: {done}/{total} {unit} in {seconds:.1f} s")
