"""Timing core: a time-based warm-up, then timed calls, with latency percentiles.

Callables compared with each other are run *interleaved* (round-robin, one call each
in turn), so a noisy neighbour or a frequency change hits all of them alike and their
ratio holds even when absolute times drift.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from edgeclf.errors import InvalidInputError

K = TypeVar("K", bound=Hashable)  # what names a callable: a string, or a (row, role) pair


@dataclass(frozen=True)
class Timing:
    """The timed calls of one callable (milliseconds), warm-up excluded."""

    samples_ms: np.ndarray

    @property
    def runs(self) -> int:
        return len(self.samples_ms)

    def stats(self) -> dict[str, float]:
        """p50/p90/p95/p99 (linear interpolation), mean, min and total, in ms."""
        s = self.samples_ms
        p50, p90, p95, p99 = np.percentile(s, [50, 90, 95, 99])
        return {"p50_ms": float(p50), "p90_ms": float(p90), "p95_ms": float(p95), "p99_ms": float(p99),
                "mean_ms": float(s.mean()), "min_ms": float(s.min()), "total_ms": float(s.sum()), "runs": self.runs}

    def throughput(self, batch: int) -> float:
        """Images per second of back-to-back calls: every image of every timed call over the time they took."""
        return batch * self.runs / (float(self.samples_ms.sum()) / 1e3)


def time_interleaved(
    fns: dict[K, Callable[[], Any]], warmup_s: float = 1.0, duration_s: float = 5.0, min_runs: int = 10,
    max_runs: int | None = None, clock: Callable[[], float] = time.perf_counter,
    errors: dict[K, str] | None = None, group: Callable[[K], str] | None = None,
) -> dict[K, Timing]:
    """Warm each callable up for ``warmup_s`` (at least one call each), then time them.

    Timed rounds call every callable once, in turn, until ``duration_s`` has passed and
    each has ``min_runs`` calls, or each has ``max_runs``.

    Args:
        errors: if given, a callable that raises is dropped from the rotation and its
            error recorded here (by name) instead of ending the whole measurement.
        group: names the library behind a callable. When the next call is from another
            group, one untimed call settles it first: the previous library's worker
            threads may still be spinning, and would be billed to whoever comes next.
            Within a group the order alternates from round to round.

    Returns:
        One :class:`Timing` per name that did not fail.
    """
    if not fns:
        raise InvalidInputError("nothing to time: no callables given")
    if duration_s < 0 or warmup_s < 0 or min_runs < 1 or (max_runs is not None and max_runs < min_runs):
        raise InvalidInputError(f"need warmup_s, duration_s >= 0 and 1 <= min_runs <= max_runs. Received: "
                                f"warmup_s={warmup_s}, duration_s={duration_s}, min_runs={min_runs}, "
                                f"max_runs={max_runs}")
    live = list(fns)

    def call(name: K) -> bool:
        if errors is None:
            fns[name]()
            return True
        try:
            fns[name]()
            return True
        except Exception as exc:  # one failing backend must not stop the others
            errors[name] = f"{type(exc).__name__}: {exc}"
            live.remove(name)
            return False

    start = clock()
    while live:  # warm-up: caches, lazy compilation, thread pools
        for name in list(live):
            call(name)
        if clock() - start >= warmup_s:
            break
    samples: dict[K, list[float]] = {name: [] for name in live}
    start = clock()
    rounds = 0
    while live:
        order = list(live)
        if group is not None:
            groups: dict[str, list[K]] = {}
            for name in order:
                groups.setdefault(group(name), []).append(name)
            order = [n for members in groups.values() for n in (members if rounds % 2 == 0 else members[::-1])]
        previous = None
        for name in order:
            if name not in live:
                continue
            if group is not None and group(name) != previous and not call(name):
                continue  # the settling call failed: already dropped
            previous = group(name) if group is not None else None
            t0 = clock()
            if call(name):
                samples[name].append((clock() - t0) * 1e3)
        rounds += 1
        if max_runs is not None and rounds >= max_runs:
            break
        if rounds >= min_runs and clock() - start >= duration_s:
            break
    return {name: Timing(np.asarray(samples[name])) for name in live}
