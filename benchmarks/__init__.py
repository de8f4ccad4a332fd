"""Benchmarks: latency and throughput of every backend side by side, with accuracy.

``timing`` is the measuring core (warm-up, interleaved timed runs, percentiles);
``overhead`` compares the Predictor with the raw backend call it wraps.
"""
