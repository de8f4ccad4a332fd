"""The Predictor's cost over the raw backend call it wraps, per artifact, at batch 1.

    python -m edgeclf.benchmarks.overhead BUNDLE [--artifacts onnx,openvino-int8] [--duration 5]

Per artifact, interleaved in one run: the raw ``backend.infer`` on a ready uint8 batch,
``Predictor.predict`` on the same decoded image (checks, batching, decoding to an
integer), and decoding the image file from disk on its own line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgeclf.benchmarks.harness import BenchConfig, contestants, sample_image_file
from edgeclf.benchmarks.timing import time_interleaved
from edgeclf.bundle import Bundle
from edgeclf.errors import EdgeclfError
from edgeclf.images import load_image
from edgeclf.progress import log
from edgeclf.runtime import Predictor


def measure_overhead(bundle_path: str | Path, artifacts: list[str] | None = None, duration_s: float = 5.0,
                     threads: int | None = None, image: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per artifact: raw, Predictor and decode p50 (ms) and the overhead in percent."""
    bundle = Bundle.load(bundle_path)
    image = Path(image) if image else sample_image_file(bundle)
    if image is None:
        raise EdgeclfError("no image file to time decoding with: pass one with --image")
    rows = []
    for artifact in artifacts or [a for _, a, hint in contestants(bundle, BenchConfig()) if hint is None]:
        log(f"timing {artifact}")
        with Predictor.load(bundle.path, artifact, threads=threads) as predictor:
            frame = load_image(image, predictor.image_size)
            batch = frame[None]
            timings = time_interleaved({
                "raw": lambda p=predictor, b=batch: p.backend.infer(b),
                "predictor": lambda p=predictor, f=frame: p.predict(f),
                "decode": lambda: load_image(image, predictor.image_size),
            }, warmup_s=1.0, duration_s=duration_s)
            raw, pred = timings["raw"].stats(), timings["predictor"].stats()
            rows.append({
                "artifact": artifact, "backend": predictor.describe()["backend"], "runs": raw["runs"],
                "raw_p50_ms": raw["p50_ms"], "predictor_p50_ms": pred["p50_ms"],
                "overhead_ms": pred["p50_ms"] - raw["p50_ms"],
                "overhead_pct": 100.0 * (pred["p50_ms"] - raw["p50_ms"]) / raw["p50_ms"],
                "decode_p50_ms": timings["decode"].stats()["p50_ms"],
            })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| artifact | backend | raw p50 ms | Predictor p50 ms | overhead | decode from disk ms |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['artifact']} | {r['backend']} | {r['raw_p50_ms']:.3f} | {r['predictor_p50_ms']:.3f} | "
                     f"{r['overhead_ms']*1e3:+.0f} µs ({r['overhead_pct']:+.2f}%) | {r['decode_p50_ms']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeclf.benchmarks.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--artifacts", default=None, help="comma-separated (default: every validated one)")
    parser.add_argument("--duration", type=float, default=5.0, help="timed seconds per artifact (default 5)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--image", default=None, help="image file (default: one of the bundle's training images)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        rows = measure_overhead(args.bundle, args.artifacts.split(",") if args.artifacts else None,
                                args.duration, args.threads, args.image)
    except EdgeclfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
