"""Run a command (``make test``) while the machine is busy on purpose, as CI's machine may be.

Beside the command it starts CPU-bound processes (a Python loop each) and memory-bandwidth-bound
ones (numpy copying 256 MiB arrays, far past any cache), at the same priority as the command, and
runs the command ``--runs`` times back to back. Each run's exit status and time are printed, with
the work the load did, so a green run shows that the suite does not race the clock.

    python -m tests.under_load --runs 3 -- make test     (make test-loaded LOADED_RUNS=3)
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

# Each load process counts its work until SIGTERM, then prints it (one line) and exits.
_CPU = """
import signal, sys
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
n = 0
while not stop:
    for _ in range(100_000):
        n += 1
print(f"cpu: {n / 1e6:.0f} M loop steps", flush=True)
"""
_MEMORY = """
import signal, sys, time
import numpy as np
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
src, dst = np.ones(32 << 20), np.empty(32 << 20)  # 256 MiB each
copied, started = 0, time.perf_counter()
while not stop:
    np.copyto(dst, src)
    copied += 2 * src.nbytes  # read and written
print(f"memory: {copied / (time.perf_counter() - started) / 1e9:.1f} GB/s copied on average", flush=True)
"""


def _start_load(cpu: int, memory: int) -> list[subprocess.Popen]:
    code = [_CPU] * cpu + [_MEMORY] * memory
    return [subprocess.Popen([sys.executable, "-c", c], stdout=subprocess.PIPE, text=True) for c in code]


def _stop_load(load: list[subprocess.Popen]) -> list[str]:
    for proc in load:
        proc.send_signal(signal.SIGTERM)
    return [(proc.communicate(timeout=60)[0] or f"exit {proc.returncode}").strip() for proc in load]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs of the command, back to back (default 1)")
    parser.add_argument("--cpu", type=int, default=2, help="CPU-bound load processes (default 2)")
    parser.add_argument("--memory", type=int, default=1, help="memory-bandwidth-bound load processes (default 1)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.runs < 1 or args.cpu < 0 or args.memory < 0:
        parser.error("give --runs >= 1, --cpu and --memory >= 0, and a command after --")
    # SIGTERM (as from CI's stop) unwinds through the finally below: no load process is left behind.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    results: list[tuple[int, float]] = []
    for run in range(1, args.runs + 1):
        load = _start_load(args.cpu, args.memory)
        print(f"[under_load] run {run}/{args.runs}: {' '.join(command)} beside {args.cpu} CPU-bound and "
              f"{args.memory} memory-bound processes", flush=True)
        started = time.perf_counter()
        try:
            code = subprocess.call(command)
        finally:
            work = _stop_load(load)
        results.append((code, time.perf_counter() - started))
        print(f"[under_load] run {run}/{args.runs}: exit {code} in {results[-1][1]:.0f} s; load: {'; '.join(work)}",
              flush=True)
        if code != 0:
            break
    for run, (code, seconds) in enumerate(results, 1):
        print(f"[under_load] run {run}: {'passed' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s")
    failed = [code for code, _ in results if code != 0]
    return (failed[0] if failed[0] > 0 else 1) if failed else 0


if __name__ == "__main__":
    sys.exit(main())
