"""Render BENCHMARKS.md: one section per machine the benchmark ran on, each with the
arithmetic floor beside the measurements.

    python -m edgeclf.benchmarks.publish --add BUNDLE/benchmarks/bench.json --docs docs > BENCHMARKS.md

``--add`` keeps the run (and its chart) in ``docs`` as ``bench_299.<machine>.json``,
replacing an earlier run on the same kind of machine; the page shows every machine kept.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
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


def machine_slug(env: dict[str, Any]) -> str:
    """"AMD EPYC" with ["avx2"] -> "amd-epyc-avx2": which kind of machine a run came from."""
    words = [env["cpu"], *sorted(env["cpu_flags"])] + ([f"gpu{env['gpu_compute_capability']}"]
                                                       if env.get("gpu_compute_capability") else [])
    return re.sub(r"[^a-z0-9]+", "-", " ".join(words).lower()).strip("-")


def _section(result: dict[str, Any], chart: str | None) -> list[str]:
    env = result["environment"]
    h, w = result["image_size"]
    macs = result.get("macs_per_image")
    onnx_path = Path(result["bundle"]) / "model.onnx"
    if macs is None and onnx_path.is_file():
        macs = count_macs(onnx_path)
    mhz = result.get("cpu_mhz") or _cpu_mhz()
    flags = ", ".join(env["cpu_flags"]) or "no AVX-512/VNNI/AMX"
    gpu = "GPU " + env["gpu_compute_capability"] if env["gpu_compute_capability"] else "no GPU"
    lines = [
        f"## {env['cpu']}, {env['cores']} vCPUs ({flags}), {gpu}",
        "",
        f"InceptionV3 (edgeclf head, 10 classes) at {h}x{w}, measured with `edgeclf bench` on {result['created']}. "
        f"Every row of a batch size was timed interleaved with the others in one run "
        f"({result['config']['duration_s']:.0f} s per batch size after {result['config']['warmup_s']:.0f} s of "
        f"warm-up). Latencies are per call (a call is one batch); images/s = batch / mean latency.",
        "",
        markdown_table(result).rstrip(),
        "",
        *([f"![latency per backend at batch 1 (p50 bar, p99 mark) with held-out accuracy]({chart})", ""]
          if chart else []),
        "### The arithmetic floor",
        "",
    ]
    if macs and mhz:
        lines.append(f"The model costs **{macs / 1e9:.2f} GMAC per image** (counted from `model.onnx` by "
                     f"`edgeclf.benchmarks.macs`). At the clock /proc/cpuinfo reported ({mhz:.0f} MHz; turbo may "
                     f"run above it) on {env['cores']} cores, no backend can beat:")
        lines += ["", "| path | floor ms per image | on this CPU |", "|---|---:|---|"]
        for path, ms, available in floors(macs, env["cores"], set(env["cpu_flags"]), mhz):
            lines.append(f"| {path} | {ms:.1f} | {'yes' if available else 'no'} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())), ""]
    return lines


def render_page(runs: list[tuple[dict[str, Any], str | None]], command: str) -> str:
    """The page: one section per (bench result, chart path), newest first."""
    lines = ["# Benchmarks", "", f"Reproduce on the machine at hand: `{command}` (it replaces that kind of "
             f"machine's section and keeps the others).", ""]
    for result, chart in sorted(runs, key=lambda run: run[0]["created"], reverse=True):
        lines += _section(result, chart)
    return "\n".join(lines)


def render(result: dict[str, Any], command: str, chart: str | None = None) -> str:
    """The page for one run."""
    return render_page([(result, chart)], command)


def add_run(bench_json: Path, docs: Path) -> Path:
    """Keep ``bench_json`` (and the chart beside it) in ``docs`` under its machine's name."""
    result = json.loads(bench_json.read_text())
    if not result.get("cpu_mhz"):
        result["cpu_mhz"] = _cpu_mhz()  # the floor needs this machine's clock, not the renderer's
    docs.mkdir(parents=True, exist_ok=True)
    kept = docs / f"bench_299.{machine_slug(result['environment'])}.json"
    kept.write_text(json.dumps(result, indent=2) + "\n")
    chart = bench_json.with_name("bench.png")
    if chart.is_file():
        shutil.copyfile(chart, kept.with_suffix(".png"))
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeclf.benchmarks.publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_json", nargs="*", help="runs to render (default: every one kept in --docs)")
    parser.add_argument("--add", default=None, help="a new bench.json to keep in --docs first")
    parser.add_argument("--docs", default="docs", help="where runs and charts are kept (default docs)")
    parser.add_argument("--command", default="make benchmarks", help="the command that reproduces the table")
    args = parser.parse_args(argv)
    docs = Path(args.docs)
    if args.add:
        add_run(Path(args.add), docs)
    paths = [Path(p) for p in args.bench_json] or sorted(docs.glob("bench_299.*.json"))
    runs = []
    for path in paths:
        chart = path.with_suffix(".png")
        runs.append((json.loads(path.read_text()), str(chart) if chart.is_file() else None))
    print(render_page(runs, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
