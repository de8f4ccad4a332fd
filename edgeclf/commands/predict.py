"""``edgeclf predict``: predict integers for image files with an exported model (no TensorFlow)."""

from __future__ import annotations

import argparse
import json
import sys

from edgeclf import limits
from edgeclf.commands.common import add_model_arguments, add_trust_arguments, pixels_help, trust_options
from edgeclf.decoding import DECODINGS


def run(args: argparse.Namespace) -> int:
    from edgeclf.runtime import Predictor
    from edgeclf.runtime.files import predict_paths

    with Predictor.load(args.model, args.backend, precision=args.precision, batch_size=args.batch_size,
                        threads=args.threads, allow_unvalidated=args.allow_unvalidated, decoding=args.decode,
                        max_image_pixels=args.max_image_pixels, decode_threads=args.decode_threads,
                        **trust_options(args)) as predictor:
        described = predictor.describe()
        print(f"[edgeclf] {described['backend']} running {described['artifact']}: {described['reason']}",
              file=sys.stderr)
        print(f"[edgeclf] {described['trust']}", file=sys.stderr)
        done = failed = unfamiliar = 0
        for record in predict_paths(predictor, args.inputs, args.top_k):
            done += 1
            if "error" in record:
                failed += 1
                if args.json:
                    print(json.dumps(record), flush=True)
                else:
                    print(f"error: {record['file']}: {record['error']}", file=sys.stderr)
                continue
            if record.get("familiar") is False:
                unfamiliar += 1
                if args.unfamiliar == "withhold":  # a script must not log a reading the model cannot vouch for
                    record.update(label=None, index=None, withheld="unfamiliar")
            print(json.dumps(record) if args.json else _line(record), flush=True)
    print(f"[edgeclf] {done - failed} predicted, {failed} failed"
          + (f", {unfamiliar} unfamiliar" if predictor.scores_familiarity else ""), file=sys.stderr)
    if failed:
        return 1
    return UNFAMILIAR_STATUS if unfamiliar and args.unfamiliar == "withhold" else 0


#: The exit status of ``--unfamiliar withhold`` when any image was unfamiliar (1: a file failed).
UNFAMILIAR_STATUS = 3


def _line(record: dict) -> str:
    """file, label, confidence[, interval][, familiarity][, top-k], tab-separated."""
    label = "-" if record["label"] is None else str(record["label"])
    fields = [record["file"], label, f"{record['confidence']:.4f}"]
    if "interval" in record:
        low, high = record["interval"]
        fields.append(f"{low}..{high}@{record['coverage']:.0%}")
    if "familiar" in record:
        fields.append(f"{'familiar' if record['familiar'] else 'UNFAMILIAR'} p={record['p_value']:.3g}")
    top = " ".join(f"{t['label']}:{t['confidence']:.3f}" for t in record.get("top_k", []))
    return "\t".join(fields) + (f"  {top}" if top else "")


def register(sub) -> None:
    from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS
    from edgeclf.runtime.decode_ahead import DEFAULT_DECODE_THREADS

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
    p.add_argument("--decode-threads", type=limits.option("decode_threads"), default=None, metavar="N",
                   help="threads decoding and resizing the next images while the model runs (default: one per "
                        f"core, at most 4; here {DEFAULT_DECODE_THREADS})")
    p.add_argument("--allow-unvalidated", action="store_true", help="also run artifacts export did not validate")
    p.add_argument("--json", action="store_true",
                   help="JSON lines: file, label, index, confidence[, interval, coverage][, familiar, p_value]")
    add_trust_arguments(p)
    p.add_argument("--unfamiliar", choices=("report", "withhold"), default="report",
                   help="report (default): print the reading and flag it; withhold: print no label for an "
                        f"unfamiliar image and exit with status {UNFAMILIAR_STATUS} if there was one")
    p.add_argument("--max-image-pixels", type=limits.option("image_pixels"), default=DEFAULT_MAX_IMAGE_PIXELS,
                   metavar="PIXELS", help=pixels_help())
    p.set_defaults(func=run)
