"""The timing core: warm-up excluded, interleaving, and the statistics."""

from __future__ import annotations

import numpy as np
import pytest

from edgeclf.benchmarks.timing import Timing, time_interleaved
from edgeclf.errors import InvalidInputError


class FakeClock:
    """A clock that each call of a timed function advances by that function's cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_warm_up_is_excluded_and_calls_are_interleaved():
    clock, calls = FakeClock(), []

    def fn(name, cost):
        def call():
            calls.append(name)
            # The first calls are slow (a cold cache): they must fall in the warm-up.
            clock.advance(1.0 if len(calls) <= 2 else cost)
        return call

    timings = time_interleaved({"a": fn("a", 0.001), "b": fn("b", 0.003)}, warmup_s=1.5, duration_s=0.04,
                               min_runs=3, clock=clock)
    assert calls[:4] == ["a", "b", "a", "b"]  # round-robin from the start
    np.testing.assert_allclose(timings["a"].samples_ms, 1.0)
    np.testing.assert_allclose(timings["b"].samples_ms, 3.0)
    assert timings["a"].runs == timings["b"].runs == 10  # 10 rounds of 4 ms reach 40 ms


def test_statistics_are_the_percentiles_of_the_samples():
    samples = np.arange(1, 101, dtype=float)  # 1..100 ms
    stats = Timing(samples).stats()
    assert stats["p50_ms"] == pytest.approx(50.5) and stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01) and stats["mean_ms"] == 50.5 and stats["min_ms"] == 1.0
    assert stats["runs"] == 100


def test_run_limits_and_bad_settings():
    clock = FakeClock()
    timings = time_interleaved({"x": lambda: clock.advance(1.0)}, warmup_s=0, duration_s=1e9, min_runs=2,
                               max_runs=5, clock=clock)
    assert timings["x"].runs == 5
    with pytest.raises(InvalidInputError, match="nothing to time"):
        time_interleaved({})
    with pytest.raises(InvalidInputError, match="min_runs"):
        time_interleaved({"x": lambda: None}, min_runs=0)
