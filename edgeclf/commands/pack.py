"""``edgeclf pack``: a device package holding only what a device needs."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from edgeclf.pack import pack

    report = pack(args.bundle, args.formats.split(","), args.out, allow_unvalidated=args.allow_unvalidated,
                  overwrite=args.overwrite)
    for name, size in sorted(report.files.items()):
        print(f"  {name:<28} {size / 1e6:>9.1f} MB")
    print(f"package {report.path}: {', '.join(report.formats)}, {report.bytes / 1e6:.1f} MB in "
          f"{len(report.files)} files (the bundle: {report.source_bytes / 1e6:.1f} MB)")
    for name in report.build_on_device:
        print(f"{name}: an engine runs only on the GPU and TensorRT it was built with; on the device, after "
              f"unpacking: edgeclf engine PACKAGE")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pack", help="write a device package: chosen artifacts, their records and the verification set",
                       description="Copies the chosen artifacts (an OpenVINO IR with its weights), the verification "
                                   "set and bundle.json cut down to them, with a record of what was packed (source "
                                   "bundle.json sha256, formats, edgeclf version, every file's sha256). No "
                                   "model.keras, no other artifact. predict, verify and bench read a package folder "
                                   "as a bundle; an archive is written out first with 'edgeclf unpack'.")
    p.add_argument("bundle", help="bundle directory with exported artifacts")
    p.add_argument("--for", dest="formats", required=True, metavar="FORMAT[,FORMAT...]",
                   help="artifact formats to ship, e.g. onnx-int8 or openvino-int8,onnx (openvino-bf16 runs the "
                        "openvino artifact; tensorrt ships the FP16 ONNX, and 'edgeclf engine' builds the engine on "
                        "the device)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="a folder, or one file when PATH ends in .tar.gz, .tgz or .zip")
    p.add_argument("--allow-unvalidated", action="store_true",
                   help="also pack artifacts export did not validate (refused by default)")
    p.add_argument("--overwrite", action="store_true", help="replace PATH")
    p.set_defaults(func=run)
