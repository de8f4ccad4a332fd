"""``edgeclf evaluate``: evaluate a bundle's Keras model on labelled data."""

from __future__ import annotations

import argparse
import json

from edgeclf.commands.common import quiet_tensorflow, require_training_stack, tf_logs
from edgeclf.decoding import DECODINGS


def run(args: argparse.Namespace) -> int:
    require_training_stack("evaluate")
    quiet_tensorflow(args)
    from edgeclf.train import evaluate_bundle
    from edgeclf.train.metrics import format_metrics

    metrics = evaluate_bundle(args.bundle, args.data, report_dir=args.report, strict=args.strict, decoding=args.decode)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_metrics(metrics))
        shares = metrics["abs_error"]["shares"]
        print("  |error|: " + "  ".join(f"{b}: {share:.1%}" for b, share in zip(metrics["abs_error"]["bins"], shares, strict=True))
              + f"  (decoding: {metrics['decoding']})")
        labels = metrics["confusion_matrix"]["labels"]
        for label in labels:
            row = metrics["per_class"][str(label)]
            print(f"  label {label:>4}: precision={row['precision']:.3f} recall={row['recall']:.3f} "
                  f"f1={row['f1-score']:.3f} support={row['support']}")
        print("  trust: " + _trust_line(metrics["trust"]))
    return 0


def _trust_line(trust: dict) -> str:
    if "skipped" in trust:
        return trust["skipped"]
    ece, interval = trust["ece_15_bins"], trust["interval"]
    alarms = ", ".join(f"{v:.1%} at alpha {k}" for k, v in trust["false_alarms"].items())
    return (f"ECE (15 bins) {ece['before']:.3f} -> {ece['after']:.3f} with temperature {trust['temperature']:.3g}; "
            f"intervals at {interval['coverage_asked']:.0%} held the true label on {interval['coverage_reached']:.1%} "
            f"of {trust['images']} images, {interval['mean_labels_spanned']:.2f} labels wide on average; "
            f"flagged unfamiliar: {alarms}")


def register(sub) -> None:
    p = sub.add_parser("evaluate", parents=[tf_logs()], help="evaluate a bundle's Keras model on labelled data")
    p.add_argument("bundle", help="bundle directory written by 'edgeclf train'")
    p.add_argument("data", help="directory of label folders, a CSV of path,label, or 'digits'")
    p.add_argument("--report", default=None, help="directory to write metrics.json and confusion_matrix.png")
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--decode", choices=DECODINGS, default="argmax",
                   help="argmax (default) or median (of the predicted distribution over the ordered labels)")
    p.set_defaults(func=run)
