"""``edgeclf bench``: latency, throughput and accuracy of every artifact side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeclf import limits
from edgeclf.commands.common import int_list, quiet_tensorflow, tf_logs


def run(args: argparse.Namespace) -> int:
    from edgeclf.benchmarks.harness import BenchConfig, contestants, run_bench
    from edgeclf.benchmarks.report import markdown_table, write_results
    from edgeclf.bundle import Bundle

    batches = int_list(args.batch, "--batch")
    config = BenchConfig(artifacts=tuple(args.backends.split(",")) if args.backends else None, batches=batches,
                         duration_s=args.duration, warmup_s=args.warmup, threads=args.threads,
                         baselines=False if args.no_baselines else None, end_to_end=not args.no_end_to_end,
                         images=Path(args.images) if args.images else None, folder_images=args.folder_images)
    contestants(Bundle.load(args.bundle), config)  # a bad name fails before TensorFlow loads (seconds)
    quiet_tensorflow(args, load=not args.no_baselines)  # only the Keras baselines need it
    result = run_bench(args.bundle, config)
    out = Path(args.out) if args.out else Path(args.bundle) / "benchmarks"
    paths = write_results(result, out, Path(args.bundle))
    print(markdown_table(result))
    print(f"[edgeclf] wrote {', '.join(str(p) for p in paths.values())}; results stored in bundle.json under "
          f"this machine's key", file=sys.stderr)
    return 0


def register(sub) -> None:
    from edgeclf.benchmarks.harness import BenchConfig  # a dataclass; the harness loads backends when run

    defaults = BenchConfig()
    p = sub.add_parser("bench", parents=[tf_logs()], help="latency, throughput and accuracy of every artifact side by side",
                       description="Times every validated artifact (raw backend call and whole Predictor call) "
                                   "and the Keras baselines interleaved in one run; writes JSON, Markdown and a "
                                   "PNG chart, and stores the results in bundle.json for backend='auto'.")
    p.add_argument("bundle", help="bundle directory with exported artifacts")
    p.add_argument("--backends", default=None, metavar="ARTIFACTS",
                   help="comma-separated artifact names, e.g. onnx,openvino-int8 (default: every validated one)")
    p.add_argument("--batch", default=",".join(map(str, defaults.batches)), help="batch sizes (default %(default)s)")
    p.add_argument("--duration", type=limits.option("duration"), default=defaults.duration_s,
                   help="timed seconds per batch size (default %(default)g)")
    p.add_argument("--warmup", type=limits.option("warmup"), default=defaults.warmup_s,
                   help="warm-up seconds per batch size (default %(default)g)")
    p.add_argument("--threads", type=limits.option("threads"), default=None, help="CPU threads per inference (default: all)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the Keras baselines (left out anyway where TensorFlow is not installed)")
    p.add_argument("--no-end-to-end", action="store_true",
                   help="skip the whole path from a camera picture (12 MP JPEG, PNG, 1080p array) to the integer")
    p.add_argument("--images", metavar="DIR", help="camera JPEGs for the end-to-end rows (default: made here, "
                                                    "photo-like 4000x3000)")
    p.add_argument("--folder-images", type=limits.option("images"), default=defaults.folder_images, metavar="N",
                   help="pictures predicted as one list by the fastest artifact (default %(default)s)")
    p.add_argument("--out", default=None, help="directory for bench.json/.md/.png (default BUNDLE/benchmarks)")
    p.set_defaults(func=run)
