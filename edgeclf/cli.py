"""The ``edgeclf`` command line: thin argparse over the library functions.

Subcommand handlers import their modules lazily, so ``edgeclf --help`` and every
``edgeclf X --help`` answer without importing TensorFlow. Errors of the project's own
types print as one ``error: ...`` line with exit status 1; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from edgeclf import __version__, limits
from edgeclf.errors import EdgeclfError, InvalidInputError, ValidationError

_RANGE = re.compile(r"^\s*([+-]?\d+)\s*\.\.\s*([+-]?\d+)\s*$")


def parse_labels(text: str) -> list[int]:
    """"3,4,5", "3..7" or "-2,3,10" -> a list of integers (at most limits.MAX_CLASSES of them).

    A range's size is checked before it is expanded: "0..99999999" is refused, not built.
    """
    parts: list[tuple[int, int]] = []
    for part in text.split(","):
        match = _RANGE.match(part)
        try:
            lo, hi = (int(match.group(1)), int(match.group(2))) if match else (int(part), int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"labels must be integers separated by commas, or a range like 3..7. Received: {text!r}"
            ) from None
        if max(abs(lo), abs(hi)) > limits.MAX_LABEL:
            raise argparse.ArgumentTypeError(f"labels must lie within +-2**53. Received: {text!r}")
        parts.append((lo, hi))
    try:
        limits.check_label_count(sum(max(0, hi - lo + 1) for lo, hi in parts), text)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return [label for lo, hi in parts for label in range(lo, hi + 1)]


def parse_image_size(text: str) -> tuple[int, int]:
    """"299" or "224x320" (height x width), each side within limits.RANGES["image_side"]."""
    try:
        parts = [limits.RANGES["image_side"].parse(p, "each side") for p in text.lower().split("x")]
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, {exc}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"image size must be N or HxW. Received: {text!r}")


def _quiet_tensorflow(args: argparse.Namespace, load: bool = True) -> None:
    """Import TensorFlow (where installed and ``load``) without its start-up chatter, unless ``--verbose``.

    The chatter (absl's "All log messages before absl::InitializeLog()", the CUDA stub's and
    cuInit's lines on a machine without a GPU) hides the progress a user is looking for. C++
    writes it straight to file descriptor 2, past TF_CPP_MIN_LOG_LEVEL since TensorFlow moved to
    absl logging, so the import and the first device query run with descriptor 2 on /dev/null.
    Python's exceptions are raised after it is restored, so a broken install still says why.
    """
    if getattr(args, "verbose", False):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import importlib.util

    if not load or "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return  # already loaded, or a device install without it (bench, verify)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA platform's lines come here, not at import
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cmd_train(args: argparse.Namespace) -> int:
    settings = train_settings(args)  # a bad config file fails before TensorFlow loads
    _quiet_tensorflow(args)
    from edgeclf.train import TrainConfig, train

    bundle = train(TrainConfig(**settings))
    if bundle is None:  # a multi-worker run's other workers: the chief writes the bundle
        print(json.dumps({"bundle": None, "chief": False}))
        return 0
    m = bundle.meta["metrics"]["validation"]
    print(json.dumps({"bundle": str(bundle.path), "accuracy": m["accuracy"], "f1": m["f1"],
                      "mae": m["mae"], "rmse": m["rmse"],
                      "wall_seconds": bundle.meta["training"]["wall_seconds"]}))
    return 0


#: TrainConfig fields whose train option has another dest.
_TRAIN_DESTS = {"val_data": "val_dir"}


def train_settings(args: argparse.Namespace) -> dict:
    """TrainConfig fields from ``--config`` (if given), overridden by the flags given.

    Every train option defaults to None on the command line, so a flag the user did not
    give neither overrides the file nor hides the recipe's defaults (see TrainConfig).
    """
    from edgeclf.train.options import KEYS, read_config

    settings = read_config(args.config) if args.config else {}
    for key, (field, _) in KEYS.items():
        value = getattr(args, _TRAIN_DESTS.get(field, field), None)
        if value is not None:
            settings[field] = value
    if args.resume:
        settings["resume"] = True
    for field in ("data", "out"):
        if field not in settings:
            raise InvalidInputError(f"train needs {'DATA' if field == 'data' else '--out BUNDLE'}: "
                                    f"give it on the command line or as {field!r} in a --config file")
    return settings


def cmd_evaluate(args: argparse.Namespace) -> int:
    _quiet_tensorflow(args)
    from edgeclf.train import evaluate_bundle
    from edgeclf.train.metrics import format_metrics

    metrics = evaluate_bundle(args.bundle, args.data, report_dir=args.report, strict=args.strict, decoding=args.decode)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_metrics(metrics))
        shares = metrics["abs_error"]["shares"]
        print("  |error|: " + "  ".join(f"{b}: {share:.1%}" for b, share in zip(metrics["abs_error"]["bins"], shares))
              + f"  (decoding: {metrics['decoding']})")
        labels = metrics["confusion_matrix"]["labels"]
        for label in labels:
            row = metrics["per_class"][str(label)]
            print(f"  label {label:>4}: precision={row['precision']:.3f} recall={row['recall']:.3f} "
                  f"f1={row['f1-score']:.3f} support={row['support']}")
    return 0


def _int_triple(text: str, option: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise InvalidInputError(f"{option} expects three integers MIN,OPT,MAX such as 1,8,32. Received: {text!r}")
    for value in values:
        limits.check("batch", value, option)
    return values  # type: ignore[return-value]


def _int_list(text: str | None, option: str) -> tuple[int, ...]:
    """"8,32" -> (8, 32), each a batch size within limits.RANGES["batch"]; None -> ()."""
    if text is None:
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InvalidInputError(f"{option} expects comma-separated integers such as 8,32. Received: {text!r}") from None
    for value in values:
        limits.check("batch", value, option)
    return values


def _split_triton(formats: str) -> tuple[list[str], bool]:
    """The bundle formats of ``--format``, and whether a Triton repository is asked for."""
    names = [n.strip().lower() for n in formats.split(",") if n.strip()]
    return [n for n in names if n != "triton"], "triton" in names


def cmd_export(args: argparse.Namespace) -> int:
    formats, triton = _split_triton(args.format)
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
        _export_formats(args, ",".join(formats))
    if triton:
        _write_triton(args)
    return 0


def _write_triton(args: argparse.Namespace) -> None:
    from edgeclf.serve.repository import write_repository

    report = write_repository(args.bundle, args.out, name=args.model_name, batching=_batching(args),
                              overwrite=args.overwrite)
    print(f"Triton model repository: {report.path}")
    for model in report.models:
        print(f"  {model['model']:<20} {model['runtime']:<12} max_batch_size {model['max_batch_size']:<4} "
              f"{', '.join(model['files'])}")
    for fmt, reason in report.skipped.items():
        print(f"  (no {fmt} model: {reason})")


def _export_formats(args: argparse.Namespace, formats: str) -> None:
    _quiet_tensorflow(args)
    from edgeclf.export import ExportOptions, export_bundle
    from edgeclf.export.int8_gate import MarginRule
    from edgeclf.export.int8_search import Int8Target
    from edgeclf.export.tensorrt_engine import EngineOptions

    engine = EngineOptions(batch_profile=_int_triple(args.batch_profile, "--batch-profile"),
                           workspace_mib=args.workspace_mib,
                           compute_capabilities=tuple(args.trt_compute_capability.split(","))
                           if args.trt_compute_capability else None,
                           timing_cache=Path(args.timing_cache) if args.timing_cache else None)
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
            _print_int8_report(exc.records, Path(args.bundle))
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
        _print_int8_report(records, Path(args.bundle))


def _print_int8_report(records: list[dict], bundle: Path) -> None:
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


def cmd_predict(args: argparse.Namespace) -> int:
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


def cmd_bench(args: argparse.Namespace) -> int:
    from edgeclf.benchmarks.harness import BenchConfig, contestants, run_bench
    from edgeclf.benchmarks.report import markdown_table, write_results
    from edgeclf.bundle import Bundle

    batches = _int_list(args.batch, "--batch")
    config = BenchConfig(artifacts=tuple(args.backends.split(",")) if args.backends else None, batches=batches,
                         duration_s=args.duration, warmup_s=args.warmup, threads=args.threads,
                         baselines=False if args.no_baselines else None)
    contestants(Bundle.load(args.bundle), config)  # a bad name fails before TensorFlow loads (seconds)
    _quiet_tensorflow(args, load=not args.no_baselines)  # only the Keras baselines need it
    result = run_bench(args.bundle, config)
    out = Path(args.out) if args.out else Path(args.bundle) / "benchmarks"
    paths = write_results(result, out, Path(args.bundle))
    print(markdown_table(result))
    print(f"[edgeclf] wrote {', '.join(str(p) for p in paths.values())}; results stored in bundle.json under "
          f"this machine's key", file=sys.stderr)
    return 0


def _batching(args: argparse.Namespace):
    from edgeclf.serve.triton_config import Batching

    return Batching(max_batch=args.max_batch, preferred=_int_list(args.preferred_batch, "--preferred-batch"),
                    queue_delay_us=args.queue_delay_us, instances=args.instances)


def cmd_serve(args: argparse.Namespace) -> int:
    from edgeclf.serve.server import ServeOptions, print_ready, serve

    options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, name=args.model_name, backend=args.backend,
                           precision=args.precision, threads=args.threads, batching=_batching(args),
                           image_instances=args.image_instances, max_request_mb=args.max_request_mb,
                           max_image_pixels=args.max_image_pixels, decoding=args.decode,
                           max_connections=args.max_connections, guard_threads=args.guard_threads,
                           idle_timeout=args.idle_timeout, header_timeout=args.header_timeout)
    serve(args.bundle, options, on_ready=print_ready)
    print("[edgeclf] server stopped", file=sys.stderr)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from edgeclf.runtime import Predictor
    from edgeclf.runtime.files import image_paths
    from edgeclf.serve.load import run_load, samples_from_files

    paths = [path for path, problem in image_paths(args.images) if problem is None][: args.max_images]
    if not paths:
        raise InvalidInputError(f"no image files found in {args.images}")
    with Predictor.load(args.bundle, args.backend) as predictor:
        samples = samples_from_files(paths, predictor)
    report = run_load(samples, http_url=args.http_url, grpc_url=args.grpc_url, name=args.model_name,
                      clients=args.clients, requests=args.requests, malformed_every=args.malformed_every,
                      timeout_s=args.timeout)
    summary = report.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        lat = summary["latency_ms"]
        print(f"{summary['requests']} requests from {summary['clients']} clients in {summary['seconds']:.1f} s: "
              f"{summary['answered']} answered ({summary['throughput_rps']} req/s), {summary['wrong']} wrong, "
              f"{summary['unexpected_errors']} unexpected errors; malformed: {summary['malformed_sent']} sent, "
              f"{summary['malformed_rejected']} rejected")
        print(f"latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
    for problem in (report.wrong + report.unexpected_errors + report.malformed_answered)[:10]:
        print(f"error: {problem}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from edgeclf.runtime.doctor import doctor, format_report

    report = doctor()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    if args.name == "gauges":
        from edgeclf.train.gauges import write_gauges_folder

        write_gauges_folder(args.out, per_class=args.per_class, holdout=args.holdout, seed=args.seed,
                            size=args.size or 64, overwrite=args.overwrite)
        return 0
    from edgeclf.train.data import write_digits_folder

    write_digits_folder(args.out, holdout=args.holdout, seed=args.seed, size=args.size or 32,
                        overwrite=args.overwrite)
    return 0


def _add_model_arguments(p) -> None:
    """Which artifact runs, as in ``Predictor.load``."""
    p.add_argument("--backend", default="auto",
                   help="auto (default), onnxruntime, openvino, tflite, tensorrt, or an artifact name such as onnx-int8")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default=None,
                   help="pick the artifact of this precision (bf16: the FP32 OpenVINO IR run in BF16)")
    p.add_argument("--threads", type=limits.option("threads"), default=None, help="CPU threads per inference (default: all)")


def _add_batching_arguments(group) -> None:
    group.add_argument("--model-name", default="edgeclf", help="Triton model name (prefix) (default edgeclf)")
    group.add_argument("--max-batch", type=limits.option("batch"), default=32, help="Triton max_batch_size (default 32)")
    group.add_argument("--preferred-batch", default=None, metavar="N[,N...]",
                       help="dynamic batching preferred sizes (default 8 and the max batch)")
    group.add_argument("--queue-delay-us", type=limits.option("queue_delay_us"), default=2000,
                       help="longest wait to fill a batch, microseconds (default 2000)")
    group.add_argument("--instances", type=limits.option("instances"), default=1, help="model instances (default 1)")


def build_parser() -> argparse.ArgumentParser:
    from edgeclf.train.backbones import BACKBONES  # plain data, no TensorFlow
    from edgeclf.train.strategy import STRATEGIES  # imports TensorFlow only when called
    from edgeclf.train.data import INPUT_MODES  # numpy and Pillow only
    from edgeclf.formats import FORMATS  # plain data
    from edgeclf.decoding import DECODINGS  # numpy only
    from edgeclf.train.ordinal import DISTANCES, LOSSES  # numpy only at import
    from edgeclf.export.onnx_int8 import CALIBRATION_METHODS  # numpy only at import

    parser = argparse.ArgumentParser(
        prog="edgeclf",
        description="Train, export, verify and run Keras integer image classifiers on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgeclf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Commands that load TensorFlow: its start-up log lines are hidden unless asked for.
    tf_logs = argparse.ArgumentParser(add_help=False)
    tf_logs.add_argument("--verbose", action="store_true",
                         help="keep TensorFlow's start-up log lines (hidden by default)")

    p = sub.add_parser("train", parents=[tf_logs], help="train a model and write a bundle directory",
                       description="Two-phase fine-tuning: frozen backbone (head on cached features), "
                                   "then the top backbone blocks at a low learning rate.")
    p.add_argument("data", nargs="?",
                   help="directory with one subfolder per integer label, a CSV of path,label, or 'digits'")
    p.add_argument("--out", help="bundle directory to write")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of train options (keys named as the flags: epochs-frozen = 5); "
                        "flags given here override it")
    p.add_argument("--labels", type=parse_labels, default=None,
                   help="the integer labels, e.g. 3..7 or --labels=-2,3,10 (default: those in the data)")
    p.add_argument("--image-size", type=parse_image_size, help="N or HxW (default 299)")
    p.add_argument("--backbone", choices=sorted(BACKBONES), help="(default inception_v3)")
    p.add_argument("--weights",
                   help="'imagenet' (downloaded once by Keras), 'none', or a local weights file (default imagenet)")
    p.add_argument("--init-from", default=None, metavar="BUNDLE",
                   help="start from this bundle's weights (same backbone and labels, any image size): "
                        "train small and cheap first, then finish at full size")
    p.add_argument("--epochs-frozen", type=limits.option("epochs"), help="phase 1 epochs, backbone frozen (default 10)")
    p.add_argument("--epochs-finetune", type=limits.option("epochs"), help="phase 2 epochs, top unfrozen (default 5)")
    p.add_argument("--batch-size", type=limits.option("train_batch"), help="global batch size (default 32)")
    p.add_argument("--lr-frozen", type=limits.option("learning_rate"), help="phase 1 learning rate (default 1e-3)")
    p.add_argument("--lr-finetune", type=limits.option("learning_rate"), help="phase 2 learning rate (default 1e-5; 1e-3 with --weights none)")
    p.add_argument("--unfreeze-at", type=limits.option("layer_index"), default=None,
                   help="first backbone layer index trained in phase 2 (default: the backbone's, 249 for "
                        "InceptionV3; 0 with --weights none)")
    p.add_argument("--loss", choices=LOSSES,
                   help="crossentropy (default): one-hot targets; ordinal: soft ordinal labels (SORD), so a "
                        "prediction far from the true integer costs more than a near one")
    p.add_argument("--ordinal-alpha", type=limits.option("ordinal_alpha"), metavar="ALPHA",
                   help="ordinal: the target of true value t gives value v the weight exp(-ALPHA * phi(t, v)), "
                        "normalised (default 1)")
    p.add_argument("--ordinal-distance", choices=sorted(DISTANCES),
                   help="ordinal: phi, the distance between the integers: abs |t - v| (default) or squared")
    p.add_argument("--val-split", type=limits.option("val_split"), help="stratified validation fraction (default 0.2)")
    p.add_argument("--val-dir", default=None, help="explicit validation data instead of a split")
    p.add_argument("--seed", type=limits.option("seed"), help="(default 0)")
    p.add_argument("--strategy", choices=STRATEGIES,
                   help="tf.distribute strategy: mirrored = all GPUs of this host; multiworker = hosts in "
                        "TF_CONFIG (default: one device)")
    p.add_argument("--peer-timeout", type=limits.option("peer_timeout"), metavar="SECONDS",
                   help="multiworker: seconds to wait for every TF_CONFIG peer to listen before failing with "
                        "the unreachable addresses (default 300)")
    p.add_argument("--class-weights", choices=["balanced"], help="weight classes inversely to their size")
    p.add_argument("--augment", action="store_true", help="random rotation, zoom and shift (no flips)")
    p.add_argument("--augment-flip", action="store_true", help="with --augment, also flip horizontally")
    p.add_argument("--train-batchnorm", action=argparse.BooleanOptionalAction,
                   help="phase 2 trains BatchNormalization on batch statistics, re-estimated each epoch "
                        "(default: with --weights none only, where the whole network trains from scratch)")
    p.add_argument("--no-feature-cache", dest="cache_features", action="store_false",
                   help="run the frozen backbone every phase-1 epoch instead of caching its features")
    p.add_argument("--feature-cache-dir", metavar="DIR",
                   help="where phase 1's features are kept for later runs with the same backbone, weights, "
                        "size and images (default: $EDGECLF_CACHE_DIR, else ~/.cache/edgeclf)")
    p.add_argument("--input", choices=INPUT_MODES,
                   help="memory: decode every image before training; stream: decode batch by batch from the "
                        "files, so memory does not grow with their number; auto (default): stream when the "
                        "decoded images would take over 1 GiB")
    p.add_argument("--patience", type=limits.option("patience"), help="early-stopping patience in epochs (default 3)")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output directory (and an interrupted run's checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run writing --out from its last finished epoch (its "
                        "checkpoint is OUT.checkpoint); it ends with the bundle the run would have written")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write TensorBoard logs of both phases to DIR/frozen and DIR/finetune")
    # Every default is None, the switches' too: TrainConfig's (named in the help) apply, and an
    # option not given here neither overrides --config nor hides the recipe's defaults.
    p.set_defaults(augment=None, augment_flip=None, cache_features=None, strict=None, overwrite=None, resume=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[tf_logs], help="evaluate a bundle's Keras model on labelled data")
    p.add_argument("bundle", help="bundle directory written by 'edgeclf train'")
    p.add_argument("data", help="directory of label folders, a CSV of path,label, or 'digits'")
    p.add_argument("--report", default=None, help="directory to write metrics.json and confusion_matrix.png")
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--decode", choices=DECODINGS, default="argmax",
                   help="argmax (default) or median (of the predicted distribution over the ordered labels)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", parents=[tf_logs], help="export a bundle to ONNX, TensorRT, OpenVINO and TFLite, each validated against Keras",
                       description="Writes each artifact into the bundle directory, validates it on the images "
                                   "training held out and records it in bundle.json.")
    p.add_argument("bundle", help="bundle directory written by 'edgeclf train'")
    p.add_argument("--format", default="all",
                   help=f"comma-separated list of {', '.join(FORMATS)}, or 'all' (default); 'triton' writes a "
                        f"Triton model repository to --out")
    p.add_argument("--opset", type=limits.option("opset"), default=17, help="ONNX opset (default 17)")
    p.add_argument("--calibration-images", type=limits.option("images"), default=300,
                   help="training images used to calibrate INT8 (default 300)")
    p.add_argument("--tuning-images", type=limits.option("images"), default=500,
                   help="other training images the INT8 searches judge candidates on and the INT8 gate's decided "
                        "margin is derived on; the verification set never reaches them (default 500)")
    p.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=None,
                   help="onnxruntime's INT8 calibrator (default: minmax, then entropy and percentile while plain "
                        "INT8 misses the target)")
    p.add_argument("--int8-cpu", choices=["auto", "avx2", "vnni"], default="auto",
                   help="CPUs the INT8 artifacts are quantized for: avx2 (no VNNI: 7-bit weights, exact where u8 x s8 "
                        "pairs are summed in int16), vnni (VNNI, AMX or ARM dot product: full 8-bit weights); auto "
                        "(default): this machine's class. Other machines check them with 'edgeclf verify'")
    p.add_argument("--full-range-int8", action="store_true", help=argparse.SUPPRESS)  # the old name of --int8-cpu vnni
    p.add_argument("--data", default=None,
                   help="labelled images for calibration and validation instead of the bundle's training data")
    p.add_argument("--no-validate", action="store_true", help="skip validation against Keras (not recommended)")
    int8 = p.add_argument_group("INT8 gate (onnx-int8, openvino-int8, tflite-int8)")
    int8.add_argument("--int8-min-agreement", type=limits.option("agreement"), default=0.99,
                      help="top-1 agreement with Keras INT8 must reach on the images Keras has decided (logit margin "
                           "at least the decided margin); layers are kept in FP32 until it does (default 0.99)")
    int8.add_argument("--int8-max-accuracy-drop", type=limits.option("fraction"), default=0.005,
                      help="accuracy drop against Keras allowed; fails only when a paired exact test on the images "
                           "one gets right and the other wrong finds the drop significantly larger (default 0.005)")
    int8.add_argument("--int8-decided-margin", type=limits.option("logits"), default=None, metavar="LOGITS",
                      help="the decided margin in logits (default: derived, see --int8-margin-scale)")
    int8.add_argument("--int8-margin-scale", type=limits.option("scale"), default=2.0,
                      help="the derived decided margin is this times the 99th percentile of how far BF16 arithmetic "
                           "moves the top-1 logit towards another class on the tuning images (default 2)")
    int8.add_argument("--int8-margin-floor", type=limits.option("logits"), default=1.0, metavar="LOGITS",
                      help="the derived decided margin is at least this many logits (default 1: below it the "
                           "runner-up has more than a third of the answer's probability)")
    int8.add_argument("--int8-max-fp32-share", type=limits.option("fraction"), default=0.1,
                      help="most quantizable layers a validated INT8 artifact may keep in FP32 (default 0.1)")
    int8.add_argument("--int8-search-trials", type=limits.option("trials"), default=12,
                      help="most quantizations the FP32-fallback search tries after plain INT8 (default 12)")
    int8.add_argument("--int8-search-seconds", type=limits.option("search_seconds"), default=900,
                      help="time bound of each format's search (default 900)")
    p.add_argument("--report", action="store_true",
                   help="also print the INT8 per-layer error report (the layers ranked, those kept in FP32) and plot "
                        "it to BUNDLE/int8_layers.png")
    p.add_argument("--verification-images", type=limits.option("images"), default=2000,
                   help="held-out images kept in the bundle as its verification set, with the Keras logits; "
                        "validation here and 'edgeclf verify' on the device run on them (default: all held-out "
                        "images up to 2000)")
    trt = p.add_argument_group("TensorRT engine")
    trt.add_argument("--batch-profile", default="1,8,32", metavar="MIN,OPT,MAX",
                     help="batch sizes of the optimisation profile (default 1,8,32)")
    trt.add_argument("--workspace-mib", type=limits.option("workspace_mib"), default=1024, help="builder workspace limit (default 1024)")
    trt.add_argument("--trt-compute-capability", default=None, metavar="CC[,CC...]",
                     help="GPUs to build for, e.g. 8.6,8.9 (TensorRT-RTX; default: this GPU, or without one "
                          "every capability TensorRT-RTX supports)")
    trt.add_argument("--timing-cache", default=None,
                     help="tensorrt timing cache file, reused across builds "
                          "(default ~/.cache/edgeclf/tensorrt-VERSION.timing-cache)")
    triton = p.add_argument_group("Triton model repository (--format triton)")
    triton.add_argument("--out", default=None, metavar="REPO", help="repository directory to write")
    triton.add_argument("--overwrite", action="store_true", help="replace a non-empty REPO")
    _add_batching_arguments(triton)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="predict integers for image files with an exported model (no TensorFlow)",
                       description="Prints one line per image (JSON lines with --json); a file that fails is "
                                   "reported and the others are still predicted; exit status 1 if any failed.")
    p.add_argument("model", help="bundle directory, or one artifact (.onnx, .xml, .tflite, .engine)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or directories (read recursively)")
    _add_model_arguments(p)
    p.add_argument("--top-k", type=limits.option("top_k"), default=1, help="also list the k most probable labels")
    p.add_argument("--decode", choices=DECODINGS, default="argmax",
                   help="argmax (default): the most probable label, as the exported graphs' label output; median: "
                        "the median of the predicted distribution over the ordered labels, which minimises the "
                        "expected absolute error")
    p.add_argument("--batch-size", type=limits.option("batch"), default=32, help="images per backend call (default 32)")
    p.add_argument("--allow-unvalidated", action="store_true", help="also run artifacts export did not validate")
    p.add_argument("--json", action="store_true", help="JSON lines: file, label, index, confidence")
    from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS, PILLOW_LIMIT

    pixels_help = (f"refuse an image declaring more pixels (width x height) before decoding it (default "
                   f"{DEFAULT_MAX_IMAGE_PIXELS:,}; at most {PILLOW_LIMIT:,}, Pillow's own limit)")
    p.add_argument("--max-image-pixels", type=limits.option("image_pixels"), default=DEFAULT_MAX_IMAGE_PIXELS,
                   metavar="PIXELS", help=pixels_help)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", parents=[tf_logs], help="latency, throughput and accuracy of every artifact side by side",
                       description="Times every validated artifact (raw backend call and whole Predictor call) "
                                   "and the Keras baselines interleaved in one run; writes JSON, Markdown and a "
                                   "PNG chart, and stores the results in bundle.json for backend='auto'.")
    p.add_argument("bundle", help="bundle directory with exported artifacts")
    p.add_argument("--backends", default=None, metavar="ARTIFACTS",
                   help="comma-separated artifact names, e.g. onnx,openvino-int8 (default: every validated one)")
    p.add_argument("--batch", default="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--duration", type=limits.option("duration"), default=10.0, help="timed seconds per batch size (default 10)")
    p.add_argument("--warmup", type=limits.option("warmup"), default=2.0, help="warm-up seconds per batch size (default 2)")
    p.add_argument("--threads", type=limits.option("threads"), default=None, help="CPU threads per inference (default: all)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the Keras baselines (left out anyway where TensorFlow is not installed)")
    p.add_argument("--out", default=None, help="directory for bench.json/.md/.png (default BUNDLE/benchmarks)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="serve a bundle through a real Triton server (PyTriton), HTTP and gRPC",
                       description="Models NAME (pixels uint8 [N,H,W,3]) and NAME_image (encoded image "
                                   "bytes [N,1]) answer label (the integer), confidence and logits. Dynamic "
                                   "batching; SIGTERM or Ctrl+C stops after the requests in flight.")
    p.add_argument("bundle", help="bundle directory (or one artifact) to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics (default 8002)")
    _add_model_arguments(p)
    p.add_argument("--image-instances", type=limits.option("instances"), default=4,
                   help="encoded-image requests decoded at once (default 4)")
    p.add_argument("--max-image-pixels", type=limits.option("image_pixels"), default=DEFAULT_MAX_IMAGE_PIXELS,
                   metavar="PIXELS", help=pixels_help.replace("an image", "an encoded image (NAME_image)"))
    p.add_argument("--decode", choices=DECODINGS, default="argmax",
                   help="how both models' label output is decoded from the logits: argmax (default) or median "
                        "(of the predicted distribution over the ordered labels: the least expected |error|)")
    p.add_argument("--max-request-mb", type=limits.option("request_mb"), default=64.0,
                   help="larger requests (body, or declared tensor size) are refused before they are read "
                        "(default 64)")
    p.add_argument("--max-connections", type=limits.option("connections"), default=1024,
                   help="open connections per endpoint (default 1024, at most 65536). At the limit HTTP closes "
                        "the connection waiting longest for its request, or answers 503 when every one carries a "
                        "request; gRPC closes new connections")
    p.add_argument("--guard-threads", type=limits.option("threads"), default=64,
                   help="threads answering requests per endpoint; idle and slow clients take none "
                        "(default 64, at most 1024)")
    p.add_argument("--idle-timeout", type=limits.option("serve_timeout"), default=10.0,
                   help="seconds a kept-alive connection may wait for its next request (default 10)")
    p.add_argument("--header-timeout", type=limits.option("serve_timeout"), default=10.0,
                   help="seconds a request's line and headers may take to arrive; a large body gets this "
                        "plus 1 s per 256 KiB (default 10)")
    _add_batching_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("loadtest", help="bounded load run against 'edgeclf serve', malformed requests interleaved",
                       description="CLIENTS concurrent clients (half HTTP, half gRPC) send REQUESTS requests each; "
                                   "every answer is checked against the Predictor's integer for the image, and "
                                   "every malformed request must get an error. Exit status 1 otherwise.")
    p.add_argument("bundle", help="the served bundle: the Predictor's answers are the expected ones")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--http-url", default="127.0.0.1:8000")
    p.add_argument("--grpc-url", default="127.0.0.1:8001")
    p.add_argument("--model-name", default="edgeclf")
    p.add_argument("--backend", default="auto", help="backend of the local Predictor giving expected answers")
    p.add_argument("--clients", type=limits.option("clients"), default=16)
    p.add_argument("--requests", type=limits.option("requests"), default=50, help="requests per client (default 50)")
    p.add_argument("--malformed-every", type=limits.option("every"), default=5,
                   help="every n-th request of a client is malformed (default 5; 0: none)")
    p.add_argument("--max-images", type=limits.option("images"), default=200, help="images used (default 200)")
    p.add_argument("--timeout", type=limits.option("timeout"), default=60.0, help="seconds before a request counts as failed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_loadtest)

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
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("doctor", help="which backends and accelerators are usable here, and why not")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("dataset", help="write a bundled dataset as image files",
                       description="Write PNG files in OUT/train/<label>/ and OUT/test/<label>/: digits, "
                                   "scikit-learn's handwritten digits 0..9 (1,797 scans); gauges, analogue "
                                   "gauges whose needle reads 0..10, drawn deterministically (an ordinal "
                                   "dataset: neighbouring readings look alike).")
    p.add_argument("name", choices=["digits", "gauges"])
    p.add_argument("out", help="directory to write")
    p.add_argument("--holdout", type=limits.option("val_split"), default=0.2, help="fraction written to test/ (default 0.2)")
    p.add_argument("--size", type=limits.option("image_side"), default=None,
                   help="side of the written PNGs in pixels (default 32 for digits, 64 for gauges)")
    p.add_argument("--per-class", type=limits.option("per_class"), default=200,
                   help="gauges: images per reading (default 200)")
    p.add_argument("--seed", type=limits.option("seed"), default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_dataset)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``edgeclf`` command. Run as a program (``argv`` None), ``train`` runs in a child process
    under a supervisor that SIGTERM and Ctrl+C always reach (see edgeclf.interrupts)."""
    from edgeclf.interrupts import is_supervised, run_supervised

    if argv is None:
        argv = sys.argv[1:]
        if argv[:1] == ["train"]:
            if not is_supervised():
                return run_supervised(argv)
            # The supervisor's SIGINT must raise KeyboardInterrupt here, even where a shell started
            # the command with SIGINT ignored (a background job).
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return _run(list(argv))


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EdgeclfError as exc:
        # One line, whatever a library put in the message it carries.
        print("error: " + " / ".join(line.strip() for line in str(exc).splitlines() if line.strip()),
              file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a path the user gave: a bug, with its traceback
        # A path the system refuses (a name too long, no permission, a loop of links): one line.
        print(f"error: {exc.strerror or exc}. Received: {str(exc.filename)[:200]}"
              f"{'...' if len(str(exc.filename)) > 200 else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130

