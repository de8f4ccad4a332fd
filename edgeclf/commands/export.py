"""``edgeclf export``: export a bundle to every format, each validated against Keras, or a Triton repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeclf import limits
from edgeclf.commands.common import (add_batching_arguments, add_engine_arguments, batching, engine_options,
                                     quiet_tensorflow, require_training_stack, tf_logs)
from edgeclf.errors import InvalidInputError, ValidationError


def split_triton(formats: str) -> tuple[list[str], bool]:
    """The bundle formats of ``--format``, and whether a Triton repository is asked for."""
    names = [n.strip().lower() for n in formats.split(",") if n.strip()]
    return [n for n in names if n != "triton"], "triton" in names


def run(args: argparse.Namespace) -> int:
    formats, triton = split_triton(args.format)
    if triton and not args.out:
        raise InvalidInputError("--format triton writes a Triton model repository: give its directory with "
                                "--out REPO")
    if args.out and not triton:
        raise InvalidInputError(f"--out is the Triton repository directory, used only with --format triton. "
                                f"Received: --format {args.format} --out {args.out}")
    if triton:
        from edgeclf.bundle import Bundle
        from edgeclf.serve.triton_config import model_config_pb2

        model_config_pb2()  # fail now, not after the exports, if tritonclient is missing
        artifacts = Bundle.load(args.bundle).meta.get("artifacts", {})
        if not {"onnx", "all"} & set(formats) and (artifacts.get("onnx") or {}).get("status") != "validated":
            formats.insert(0, "onnx")  # the repository's one required model
    if formats:
        export_formats(args, ",".join(formats))
    if triton:
        write_triton(args)
    return 0


def write_triton(args: argparse.Namespace) -> None:
    from edgeclf.serve.repository import write_repository

    report = write_repository(args.bundle, args.out, name=args.model_name, batching=batching(args),
                              overwrite=args.overwrite)
    print(f"Triton model repository: {report.path}")
    for model in report.models:
        print(f"  {model['model']:<20} {model['runtime']:<12} max_batch_size {model['max_batch_size']:<4} "
              f"{', '.join(model['files'])}")
    for fmt, reason in report.skipped.items():
        print(f"  (no {fmt} model: {reason})")


def export_formats(args: argparse.Namespace, formats: str) -> None:
    require_training_stack("export", "export")
    quiet_tensorflow(args)
    from edgeclf.export import ExportOptions, export_bundle
    from edgeclf.export.int8_gate import MarginRule
    from edgeclf.export.int8_search import Int8Target

    engine = engine_options(args)
    if args.full_range_int8 and args.int8_cpu not in ("auto", "vnni"):
        raise InvalidInputError(f"--full-range-int8 (the old name of --int8-cpu vnni) contradicts --int8-cpu "
                                f"{args.int8_cpu}. Received both; give one")
    cpu = "vnni" if args.full_range_int8 else (None if args.int8_cpu == "auto" else args.int8_cpu)
    options = ExportOptions(opset=args.opset, calibration_images=args.calibration_images,
                            tuning_images=args.tuning_images, calibration_method=args.calibration_method,
                            int8_cpu=cpu, validate=not args.no_validate,
                            verification_images=args.verification_images,
                            int8_target=Int8Target(args.int8_min_agreement, args.int8_max_accuracy_drop,
                                                   args.int8_search_trials, args.int8_search_seconds,
                                                   args.int8_max_fp32_share),
                            decided=MarginRule(scale=args.int8_margin_scale, margin=args.int8_decided_margin,
                                               floor=args.int8_margin_floor),
                            data=args.data, engine=engine)
    try:
        records = export_bundle(args.bundle, formats, options)
    except ValidationError as exc:
        if args.report:  # most wanted when the INT8 target was missed
            print_int8_report(exc.records, Path(args.bundle))
        raise
    print(f"{'format':<13} {'file':<24} {'MB':>7} {'build s':>8} {'max|diff|':>10} {'agree':>7} "
          f"{'acc':>7} {'acc diff':>8}  status")
    for r in records:
        v = r["validation"] or {}
        figures = (f"{v['max_abs_logit_diff']:>10.3g} {v['top1_agreement']:>7.4f} {v['accuracy']:>7.4f} "
                   f"{v['accuracy_delta']:>+8.4f}") if "top1_agreement" in v else f"{'-':>10} {'-':>7} {'-':>7} {'-':>8}"
        print(f"{r['format']:<13} {r['file']:<24} {r['size_bytes'] / 1e6:>7.1f} {r['build_seconds']:>8.1f} "
              f"{figures}  {r['status']}")
    if args.report:
        print_int8_report(records, Path(args.bundle))


def print_int8_report(records: list[dict], bundle: Path) -> None:
    from edgeclf.export.int8_plot import plot_layer_errors

    for r in records:
        if "layers" in r.get("quantization", {}):
            print(quantization_report(r))
    plot = plot_layer_errors(records, bundle / "int8_layers.png")
    if plot is not None:
        print(f"\nper-layer error plot: {plot}")


def quantization_report(record: dict) -> str:
    """The INT8 search of one artifact: target, trials, and the layers ranked by added error."""
    q = record["quantization"]
    decided = q.get("decided") or {}
    gate = (f" on images with a Keras margin >= {decided['margin']:.3g} ({decided['decided_share']:.0%} of the tuning "
            f"images)" if "margin" in decided else "")
    lines = [f"\n{record['format']}: target agreement >= {q['target']['min_agreement']}{gate}, accuracy drop <= "
             f"{q['target']['max_accuracy_drop']}; {'met' if q['met'] else 'NOT met'} with {q['kept_fp32_layers']} "
             f"of {q.get('quantizable_layers', '?')} layer(s) in FP32 ({q['seconds']:.0f} s)",
             f"  quantized by {q['quantizer']} for {record.get('int8_cpu_class', '?')} CPUs; judged on "
             f"{q['judged_on']}; layers ranked by {q['ranked_by']}"]
    for t in [q["plain"], *q["trials"]]:
        on_decided = f" (decided {t['decided_agreement']:.4f})" if "decided_agreement" in t else ""
        lines.append(f"  {t.get('layers', 0):>4} in FP32: agreement {t['agreement']:.4f}{on_decided}, accuracy drop "
                     f"{t['accuracy_drop']:+.4f}{'  ok' if t['passed'] else ''}")
    lines.append(f"  {'node':<40} {'op':<7} {'added NSR':>10} {'SQNR dB':>8}  kept FP32")
    for layer in q["layers"]:
        lines.append(f"  {layer['node'][:40]:<40} {layer['op']:<7} {layer['added_nsr']:>10.2e} "
                     f"{layer['output_sqnr_db']:>8.1f}  {'yes' if layer['kept_fp32'] else ''}")
    return "\n".join(lines)


def register(sub) -> None:
    from edgeclf.export.exporter import ExportOptions  # these four: plain dataclasses, no TensorFlow
    from edgeclf.export.int8_gate import MarginRule
    from edgeclf.export.int8_search import Int8Target
    from edgeclf.export.onnx_int8 import CALIBRATION_METHODS  # numpy only at import
    from edgeclf.formats import FORMATS  # plain data

    # The defaults are the library's own, so the command line and the Python API cannot drift apart.
    options, target, rule = ExportOptions(), Int8Target(), MarginRule()
    p = sub.add_parser("export", parents=[tf_logs()], help="export a bundle to ONNX, TensorRT, OpenVINO and TFLite, each validated against Keras",
                       description="Writes each artifact into the bundle directory, validates it on the images "
                                   "training held out and records it in bundle.json.")
    p.add_argument("bundle", help="bundle directory written by 'edgeclf train'")
    p.add_argument("--format", default="all",
                   help=f"comma-separated list of {', '.join(FORMATS)}, or 'all' (default); 'triton' writes a "
                        f"Triton model repository to --out")
    p.add_argument("--opset", type=limits.option("opset"), default=options.opset, help="ONNX opset (default %(default)s)")
    p.add_argument("--calibration-images", type=limits.option("images"), default=options.calibration_images,
                   help="training images used to calibrate INT8 (default %(default)s)")
    p.add_argument("--tuning-images", type=limits.option("images"), default=options.tuning_images,
                   help="other training images the INT8 searches judge candidates on and the INT8 gate's decided "
                        "margin is derived on; the verification set never reaches them (default %(default)s)")
    p.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=None,
                   help="onnxruntime's INT8 calibrator (default: minmax, then entropy and percentile while plain "
                        "INT8 misses the target)")
    p.add_argument("--int8-cpu", choices=["auto", "avx2", "vnni"], default="auto",
                   help="CPUs the INT8 artifacts are quantized for: avx2 (no VNNI: 7-bit weights, exact where u8 x s8 "
                        "pairs are summed in int16), vnni (VNNI, AMX or any ARM: full 8-bit weights); auto "
                        "(default): this machine's class. Other machines check them with 'edgeclf verify'")
    p.add_argument("--full-range-int8", action="store_true", help=argparse.SUPPRESS)  # the old name of --int8-cpu vnni
    p.add_argument("--data", default=None,
                   help="labelled images for calibration and validation instead of the bundle's training data")
    p.add_argument("--no-validate", action="store_true", help="skip validation against Keras (not recommended)")
    int8 = p.add_argument_group("INT8 gate (onnx-int8, openvino-int8, tflite-int8)")
    int8.add_argument("--int8-min-agreement", type=limits.option("agreement"), default=target.min_agreement,
                      help="top-1 agreement with Keras INT8 must reach on the images Keras has decided (logit margin "
                           "at least the decided margin); layers are kept in FP32 until it does (default %(default)s)")
    int8.add_argument("--int8-max-accuracy-drop", type=limits.option("fraction"), default=target.max_accuracy_drop,
                      help="accuracy drop against Keras allowed; fails only when a paired exact test on the images "
                           "one gets right and the other wrong finds the drop significantly larger (default %(default)s)")
    int8.add_argument("--int8-decided-margin", type=limits.option("logits"), default=None, metavar="LOGITS",
                      help="the decided margin in logits (default: derived, see --int8-margin-scale)")
    int8.add_argument("--int8-margin-scale", type=limits.option("scale"), default=rule.scale,
                      help="the derived decided margin is this times the 99th percentile of how far BF16 arithmetic "
                           "moves the top-1 logit towards another class on the tuning images (default %(default)g)")
    int8.add_argument("--int8-margin-floor", type=limits.option("logits"), default=rule.floor, metavar="LOGITS",
                      help="the derived decided margin is at least this many logits (default %(default)g: below it the "
                           "runner-up has more than a third of the answer's probability)")
    int8.add_argument("--int8-max-fp32-share", type=limits.option("fraction"), default=target.max_fp32_share,
                      help="most quantizable layers a validated INT8 artifact may keep in FP32 (default %(default)s)")
    int8.add_argument("--int8-search-trials", type=limits.option("trials"), default=target.max_trials,
                      help="most quantizations the FP32-fallback search tries after plain INT8 (default %(default)s)")
    int8.add_argument("--int8-search-seconds", type=limits.option("search_seconds"), default=target.max_seconds,
                      help="time bound of each format's search (default %(default)g)")
    p.add_argument("--report", action="store_true",
                   help="also print the INT8 per-layer error report (the layers ranked, those kept in FP32) and plot "
                        "it to BUNDLE/int8_layers.png")
    p.add_argument("--verification-images", type=limits.option("images"), default=options.verification_images,
                   help="held-out images kept in the bundle as its verification set, with the Keras logits; "
                        "validation here and 'edgeclf verify' on the device run on them (default: all held-out "
                        "images up to %(default)s)")
    add_engine_arguments(p.add_argument_group("TensorRT engine"))
    triton = p.add_argument_group("Triton model repository (--format triton)")
    triton.add_argument("--out", default=None, metavar="REPO", help="repository directory to write")
    triton.add_argument("--overwrite", action="store_true", help="replace a non-empty REPO")
    add_batching_arguments(triton)
    p.set_defaults(func=run)
