"""``edgeclf predict``: predict integers for image files with an exported model (no TensorFlow)."""

from __future__ import annotations

import argparse
import json
import sys

from edgeclf import limits
from edgeclf.commands.common import add_model_arguments, pixels_help
from edgeclf.decoding import DECODINGS


def run(args: argparse.Namespace) -> int:
    from edgeclf.runtime import Predictor
    from edgeclf.runtime.files import predict_paths

    with Predictor.load(args.model, args.backend, precision=args.precision, batch_size=args.batch_size,
                        threads=args.threads, allow_unvalidated=args.allow_unvalidated, decoding=args.decode,
                        max_image_pixels=args.max_image_pixels) as predictor:
        described = predictor.describe()
        print(f"[edgeclf] {described['backend']} running {described['artifact']}: {described['reason']}",
              file=sys.stderr)
        done = failed = 0
        for record in predict_paths(predictor, args.inputs, args.top_k):
            done += 1
            if "error" in record:
                failed += 1
                if args.json:
                    print(json.dumps(record), flush=True)
                else:
                    print(f"error: {record['file']}: {record['error']}", file=sys.stderr)
            elif args.json:
                print(json.dumps(record), flush=True)
            else:
                extra = "  " + " ".join(f"{t['label']}:{t['confidence']:.3f}" for t in record.get("top_k", []))
                print(f"{record['file']}\t{record['label']}\t{record['confidence']:.4f}{extra.rstrip()}", flush=True)
    print(f"[edgeclf] {done - failed} predicted, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def register(sub) -> None:
    from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS

    p = sub.add_parser("predict", help="predict integers for image files with an exported model (no TensorFlow)",
                       description="Prints one line per image (JSON lines with --json); a file that fails is "
                                   "reported and the others are still predicted; exit status 1 if any failed.")
    p.add_argument("model", help="bundle directory, or one artifact (.onnx, .xml, .tflite, .engine)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or directories (read recursively)")
    add_model_arguments(p)
    p.add_argument("--top-k", type=limits.option("top_k"), default=1, help="also list the k most probable labels")
    p.add_argument("--decode", choices=DECODINGS, default="argmax",
                   help="argmax (default): the most probable label, as the exported graphs' label output; median: "
                        "the median of the predicted distribution over the ordered labels, which minimises the "
                        "expected absolute error")
    p.add_argument("--batch-size", type=limits.option("batch"), default=32, help="images per backend call (default 32)")
    p.add_argument("--allow-unvalidated", action="store_true", help="also run artifacts export did not validate")
    p.add_argument("--json", action="store_true", help="JSON lines: file, label, index, confidence")
    p.add_argument("--max-image-pixels", type=limits.option("image_pixels"), default=DEFAULT_MAX_IMAGE_PIXELS,
                   metavar="PIXELS", help=pixels_help())
    p.set_defaults(func=run)
