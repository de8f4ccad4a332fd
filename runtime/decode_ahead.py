"""Decoding beside inference: a small thread pool turns inputs into frames while the backend
runs the previous ones.

Pillow releases the GIL while it decodes and resizes, so the threads decode in parallel with
each other and with the backend's call. The work in flight is bounded by ``ahead`` whatever the
number of inputs: memory stays flat over a folder of thousands of camera pictures or an endless
camera loop. Results come back in input order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from edgeclf import limits
from edgeclf.errors import EdgeclfError

T = TypeVar("T")
R = TypeVar("R")

#: Decode threads unless asked otherwise: one per core, at most 4. A 12 MP JPEG takes one core
#: about 25 ms to decode and resize to 299 px (AMD EPYC Zen 5), longer than the INT8 model
#: there: the backend is kept fed only by decoding several at once.
DEFAULT_DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))


def check_decode_threads(threads: int | None) -> int:
    """``threads`` checked (limits' "decode_threads": each holds one image's decode), or the default."""
    return DEFAULT_DECODE_THREADS if threads is None else limits.check("decode_threads", threads, "decode_threads")


def _attempt(decode: Callable[[T], R], item: T) -> R | EdgeclfError:
    try:
        return decode(item)
    except EdgeclfError as exc:  # reported beside its input; anything else is a bug and propagates
        return exc


def decode_ahead(items: Iterable[T], decode: Callable[[T], R], threads: int,
                 ahead: int) -> Iterator[tuple[T, R | EdgeclfError]]:
    """(item, ``decode(item)`` or the EdgeclfError it raised), in input order, decoding up to
    ``ahead`` items beyond the one last handed out on ``threads`` threads.

    ``items`` is read lazily (a camera's frames may never end). Closing the iterator early
    cancels what has not started and waits for what has.
    """
    if threads <= 1 and ahead <= 1:  # nothing to overlap: no thread at all
        for item in items:
            yield item, _attempt(decode, item)
        return
    window: deque[tuple[T, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgeclf-decode")
    try:
        for item in items:
            window.append((item, pool.submit(_attempt, decode, item)))
            if len(window) > ahead:
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
