"""``edgeclf verify``: check a bundle's artifacts on this machine against the Keras reference (no TensorFlow)."""

from __future__ import annotations

import argparse
import json
import sys

from edgeclf.decoding import DECODINGS


def run(args: argparse.Namespace) -> int:
    from edgeclf.runtime.checks import format_check
    from edgeclf.runtime.verifier import verify

    report = verify(args.model, args.backend, args.precision, record=not args.no_record,
                    allow_small_set=args.allow_small_set, decoding=args.decode)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"machine {report.machine['key']}: {report.machine['cpu_model']} "
              f"({', '.join(report.machine['cpu_flags']) or 'no listed ISA flags'})")
        for name, result in report.results.items():
            if "error" in result:
                print(f"  {name:<13} {result['error']}")
            for check in result.get("checks", []):
                print(format_check(name, check))
        # agree: on every image, with its one-sided 95% lower bound; decided: on the images the gate
        # judges (INT8 and BF16: a Keras margin at least the recorded one).
        print(f"{'entry':<15} {'backend':<12} {'images':>6} {'max|diff|':>10} {'agree':>7} {'(95% lb)':>8} "
              f"{'decided':>7} {'acc':>7} {'acc drop':>8}  result")
        for name, r in report.results.items():
            decided = f"{r['decided']['agreement']:>7.4f}" if "decided" in r else f"{'-':>7}"
            figures = (f"{r['images']:>6} {r['max_abs_logit_diff']:>10.3g} {r['top1_agreement']:>7.4f} "
                       f"{r.get('top1_agreement_lower_95', float('nan')):>8.4f} {decided} "
                       f"{r['accuracy']:>7.4f} {r['accuracy_keras'] - r['accuracy']:>+8.4f}") if "images" in r \
                else f"{'-':>60}"
            backend = (r.get("run_by") or {}).get("backend", "-")
            print(f"{name:<15} {backend:<12} {figures}  {'passed' if r['passed'] else 'FAILED'}")
        medians = {name: r["median"] for name, r in report.results.items() if "median" in r}
        if medians:  # decoded by median: agreement with Keras's median, accuracy and MAE beside Keras's
            print(f"{'decoded by median':<22} {'agree':>7} {'(95% lb)':>8} {'acc':>7} {'acc Keras':>9} "
                  f"{'MAE':>7} {'MAE Keras':>9}")
            for name, m in medians.items():
                print(f"{name:<22} {m['agreement']:>7.4f} {m['agreement_lower_95']:>8.4f} {m['accuracy']:>7.4f} "
                      f"{m['accuracy_keras']:>9.4f} {m['mae']:>7.4f} {m['mae_keras']:>9.4f}")
        print(f"[edgeclf] verified in {report.seconds:.1f} s"
              + ("; results stored in bundle.json under this machine's key" if not args.no_record else ""),
              file=sys.stderr)
    if not report.passed:
        print("error: verification failed: " + "; ".join(report.failures()), file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("verify", help="check the bundle's artifacts on this machine against the Keras reference "
                                      "(no TensorFlow)",
                       description="Runs each artifact through the runtime's own backend on the verification set "
                                   "export stored in the bundle and checks max |logit diff|, top-1 agreement, "
                                   "accuracy drop and the graph's label output against the tolerances export "
                                   "used. Results are stored in bundle.json under this machine's fingerprint "
                                   "(auto runs OpenVINO BF16 only once it passed here). Exit status 1 if a "
                                   "check fails.")
    p.add_argument("model", help="bundle directory")
    p.add_argument("--backend", default="all",
                   help="all (default: every artifact a backend here runs), auto (what predict would run), a "
                        "backend (onnxruntime, openvino, tflite, tensorrt) or an artifact name such as onnx-int8")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default=None,
                   help="only entries of this precision (bf16: the FP32 OpenVINO IR run in BF16)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--no-record", action="store_true", help="do not store the results in bundle.json")
    p.add_argument("--allow-small-set", action="store_true",
                   help="judge an artifact even where the verification set is too small to show its agreement "
                        "target (all images agreeing leave the 95%% lower bound below it: 0.99 needs 299 images); "
                        "by default that fails the artifact")
    p.add_argument("--decode", choices=DECODINGS, default="argmax",
                   help="argmax (default) or median: also check the answers decoded by median (agreement with the "
                        "Keras model's median, accuracy kept); stored as ENTRY+median")
    p.set_defaults(func=run)
