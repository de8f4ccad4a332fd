"""``edgeclf engine``: build the TensorRT FP16 engine on the device it runs on (no TensorFlow)."""

from __future__ import annotations

import argparse

from edgeclf.commands.common import add_engine_arguments, engine_options


def run(args: argparse.Namespace) -> int:
    from edgeclf.export.engine_here import build_engine_here

    report = build_engine_here(args.bundle, engine_options(args), force=args.force, check=not args.no_verify)
    record = report.record
    print(f"engine {report.path}: {record['tensorrt']['flavour']} {record['tensorrt']['version']}, compute capability "
          f"{', '.join(record['target']['compute_capabilities'])}, {record['size_bytes'] / 1e6:.1f} MB"
          + (" (reused)" if report.reused else f", built in {record['build_seconds']:.1f} s"))
    if report.verified is None:
        print(f"not verified here: {record['validation']['skipped']}")
        return 0
    print(f"verify on this GPU: {'passed' if report.verified else 'FAILED'} (stored in bundle.json)")
    return 0 if report.verified else 1


def register(sub) -> None:
    p = sub.add_parser("engine", help="build the TensorRT FP16 engine on this device from the bundle's or "
                                      "package's FP16 ONNX (no TensorFlow)",
                       description="A TensorRT engine runs only on the GPU and TensorRT it was built with: ship the "
                                   "FP16 ONNX (edgeclf pack BUNDLE --for tensorrt) and build the engine where it "
                                   "runs, with whichever TensorRT (or TensorRT-RTX) is installed. It is written "
                                   "beside the ONNX and recorded in bundle.json (and the package's file list); "
                                   "with a GPU, verify then checks it on the verification set. An engine built as "
                                   "asked is reused.")
    p.add_argument("bundle", help="bundle or package folder holding the validated FP16 ONNX (model.fp16.onnx)")
    add_engine_arguments(p)
    p.add_argument("--force", action="store_true", help="build even where an engine built as asked is there")
    p.add_argument("--no-verify", action="store_true", help="do not run verify on the engine after building it")
    p.set_defaults(func=run)
