"""Render BENCHMARKS.md from a bench.json, with the arithmetic floor beside the measurements.

    python -m edgeclf.benchmarks.publish BUNDLE/benchmarks/bench.json > BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgeclf.benchmarks.macs import count_macs
from edgeclf.benchmarks.report import markdown_table

#: Multiply-accumulates per cycle and core that the ISA allows, by path.
PEAK_MACS_PER_CYCLE = {
    "fp32 AVX2 (2 FMA units x 8 lanes)": 16,
    "fp32 AVX-512 (2 x 16)": 32,
    "int8 AVX2, no VNNI (vpmaddubsw + vpmaddwd)": 32,
    "int8 AVX-512 VNNI (2 x 64)": 128,
    "bf16 AMX (per core, theoretical)": 1024,
}
_NEEDS = {"AVX-512": "avx512f", "VNNI": "avx512_vnni", "AMX": "amx_bf16", "AVX2": "avx2"}


def _cpu_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return None


def floors(macs: int, cores: int, flags: set[str], mhz: float | None) -> list[tuple[str, float, bool]]:
    """(path, floor ms per image, available here) for each ISA path."""
    if not mhz:
        return []
    out = []
    for path, per_cycle in PEAK_MACS_PER_CYCLE.items():
        needs = [flag for key, flag in _NEEDS.items() if key in path]
        available = all(flag in flags for flag in needs[-1:])
        out.append((path, 1e3 * macs / (per_cycle * cores * mhz * 1e6), available))
    return out


def render(result: dict[str, Any], command: str, chart: str | None = None) -> str:
    env = result["environment"]
    h, w = result["image_size"]
    macs = result.get("macs_per_image")
    onnx_path = Path(result["bundle"]) / "model.onnx"
    if macs is None and onnx_path.is_file():
        macs = count_macs(onnx_path)
    mhz = _cpu_mhz()
    lines = [
        "# Benchmarks",
        "",
        f"InceptionV3 (edgeclf head, 10 classes) at {h}x{w}, measured with `edgeclf bench` on "
        f"{env['cpu']}, {env['cores']} vCPUs ({', '.join(env['cpu_flags']) or 'no AVX-512/VNNI/AMX'}), "
        f"{'GPU ' + env['gpu_compute_capability'] if env['gpu_compute_capability'] else 'no GPU'}, "
        f"{result['created']}. Every row of a batch size was timed interleaved with the others in one run "
        f"({result['config']['duration_s']:.0f} s per batch size after {result['config']['warmup_s']:.0f} s of "
        f"warm-up). Latencies are per call (a call is one batch); images/s = batch / mean latency.",
        "",
        "Reproduce: `" + command + "`",
        "",
        markdown_table(result).rstrip(),
        "",
        *([f"![latency per backend at batch 1 (p50 bar, p99 mark) with held-out accuracy]({chart})", ""]
          if chart else []),
        "## The arithmetic floor",
        "",
    ]
    if macs:
        lines.append(f"The model costs **{macs / 1e9:.2f} GMAC per image** (counted from `model.onnx` by "
                     f"`edgeclf.benchmarks.macs`). At the clock /proc/cpuinfo reports ({mhz:.0f} MHz; turbo may "
                     f"run above it) on {env['cores']} cores, no backend can beat:")
        lines += ["", "| path | floor ms per image | on this CPU |", "|---|---:|---|"]
        for path, ms, available in floors(macs, env["cores"], set(env["cpu_flags"]), mhz):
            lines.append(f"| {path} | {ms:.1f} | {'yes' if available else 'no'} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeclf.benchmarks.publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_json")
    parser.add_argument("--command", default="make benchmarks", help="the command that reproduces the table")
    parser.add_argument("--chart", default=None, help="path of the chart, as the page should link it")
    args = parser.parse_args(argv)
    print(render(json.loads(Path(args.bench_json).read_text()), args.command, args.chart))
    return 0


if __name__ == "__main__":
    sys.exit(main())
