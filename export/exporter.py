"""``export_bundle``: build each requested artifact, validate it against Keras, record it.

Every artifact is written atomically into the bundle directory; its entry in
``bundle.json`` (file, sha256, size, precision, validation figures, tool versions,
build time) is saved as soon as it is done, so an interrupted export keeps what it
finished. An artifact that fails validation is renamed ``*.unvalidated.<ext>`` (kept for
inspection, never picked up as the artifact) and all failures are raised together.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from edgeclf.export.formats import ExportFormat, parse_formats
from edgeclf.export.tensorrt_engine import EngineOptions
from edgeclf.export.validate import RUNNERS, TOLERANCES, Tolerance, compare, format_check, skip_reason

from edgeclf.bundle import Bundle
from edgeclf.engine_file import read_engine_header
from edgeclf.errors import BackendUnavailableError, DataError, InvalidInputError, ValidationError
from edgeclf.fsio import sha256_file
from edgeclf.progress import log
from edgeclf.versions import installed_versions

#: Formats calibrated on training images.
CALIBRATED = ("onnx-int8", "tflite-int8")
#: Fewer calibration images than this give a warning: activation ranges get noisy.
MIN_CALIBRATION_IMAGES = 100
TOOL_PACKAGES = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxconverter-common", "onnxruntime", "openvino",
                 "ai-edge-litert", "tensorrt", "tensorrt-rtx-cu12")


@dataclass
class ExportOptions:
    opset: int = 17
    calibration_images: int = 300
    calibration_method: str = "minmax"
    int8_reduce_range: bool = True  # 7-bit weights: exact on CPUs without VNNI (see onnx_int8)
    validate: bool = True
    data: str | Path | None = None  # labelled images instead of the bundle's own
    tolerances: dict[str, Tolerance] | None = None  # per precision; defaults: validate.TOLERANCES
    engine: EngineOptions = field(default_factory=EngineOptions)  # TensorRT build settings


def _importable(module: str) -> bool:
    """Whether ``module`` (or, for "a|b", either) imports."""
    for name in module.split("|"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return True
    return False


def _check_modules(formats: list[ExportFormat]) -> None:
    for fmt in formats:
        missing = [m for m in fmt.modules if not _importable(m)]
        if missing:
            raise BackendUnavailableError(
                f"format {fmt.name!r} needs {missing}, which are not installed; "
                f"install them with: pip install 'edgeclf[{fmt.extra}]'"
            )


def _installed_only(formats: list[ExportFormat]) -> list[ExportFormat]:
    """For ``all``: the formats whose libraries are installed; a warning names the rest."""
    kept: list[ExportFormat] = []
    for fmt in formats:
        missing = [m for m in fmt.modules if not _importable(m)]
        if missing or (fmt.source and fmt.source not in {k.name for k in kept}):
            why = f"needs {missing}: pip install 'edgeclf[{fmt.extra}]'" if missing else f"needs {fmt.source}"
            warnings.warn(f"'all' skips {fmt.name}: {why}", stacklevel=3)
        else:
            kept.append(fmt)
    return kept


def _builders(model, bundle: Bundle, options: ExportOptions, calibration: np.ndarray) -> dict[str, Callable]:
    from edgeclf.export.onnx_fp16 import onnx_to_fp16
    from edgeclf.export.onnx_fp32 import keras_to_onnx
    from edgeclf.export.onnx_int8 import onnx_to_int8
    from edgeclf.export.metadata import artifact_metadata
    from edgeclf.export.openvino_ir import onnx_to_openvino
    from edgeclf.export.tensorrt_engine import onnx_to_engine
    from edgeclf.export.tflite import keras_to_tflite

    # Each builder takes (output path, path of the artifact it is converted from).
    return {
        "onnx": lambda out, src: keras_to_onnx(model, bundle, out, options.opset),
        "onnx-fp16": lambda out, src: onnx_to_fp16(src, out),
        "onnx-int8": lambda out, src: onnx_to_int8(src, out, calibration, options.calibration_method,
                                                   options.int8_reduce_range),
        "openvino": lambda out, src: onnx_to_openvino(src, out),
        "openvino-int8": lambda out, src: onnx_to_openvino(src, out),
        "tensorrt": lambda out, src: onnx_to_engine(src, out, artifact_metadata(bundle, "fp16"), options.engine),
        "tflite": lambda out, src: keras_to_tflite(model, bundle, out, "fp32"),
        "tflite-fp16": lambda out, src: keras_to_tflite(model, bundle, out, "fp16"),
        "tflite-int8": lambda out, src: keras_to_tflite(model, bundle, out, "int8", calibration),
    }


def _artifact_files(fmt: ExportFormat, entry: Path) -> list[Path]:
    from edgeclf.export.openvino_ir import ir_files

    return ir_files(entry) if fmt.runtime == "openvino" else [entry]


def _mark_unvalidated(fmt: ExportFormat, entry: Path) -> Path:
    """Rename an artifact (all its files) to ``*.unvalidated.*``; returns the new entry file."""
    renamed = entry.with_name(f"{entry.stem}.unvalidated{entry.suffix}")
    for old, new in zip(_artifact_files(fmt, entry), _artifact_files(fmt, renamed)):
        os.replace(old, new)
    return renamed


def _calibration_images(calibration, count: int) -> np.ndarray:
    if count < 1:
        raise InvalidInputError(f"calibration image count must be >= 1. Received: {count}")
    if len(calibration) == 0:
        raise DataError("no calibration images: the training data holds none. Pass --data with labelled images.")
    n = min(count, len(calibration))
    if n < MIN_CALIBRATION_IMAGES:
        warnings.warn(f"calibrating INT8 on only {n} images; {MIN_CALIBRATION_IMAGES}+ give steadier ranges.",
                      stacklevel=3)
    # A reproducible random sample of the training images.
    idx = np.random.default_rng(0).permutation(len(calibration))[:n]
    return calibration.images[np.sort(idx)]


def export_bundle(bundle_path: str | Path, formats: str | list[str] = "all",
                  options: ExportOptions | None = None) -> list[dict[str, Any]]:
    """Export the bundle to ``formats``, validate each artifact and record it in bundle.json.

    Returns:
        The artifact records written to ``bundle.json["artifacts"]``, in build order.

    Raises:
        InvalidInputError: an unknown format name (the message lists the valid ones).
        BackendUnavailableError: a converter library is missing (names the extra).
        BundleError, DataError: the bundle or its images cannot be read.
        ConversionError: a converter failed (carries its message).
        ValidationError: one or more artifacts disagree with Keras beyond tolerance.
    """
    from edgeclf.export.reference import reference_sets
    from edgeclf.train.evaluate import load_keras_model, predict_logits

    options = options or ExportOptions()
    wanted = parse_formats(formats)
    if formats == "all" or formats == ["all"]:
        wanted = _installed_only(wanted)
    _check_modules(wanted)
    bundle = Bundle.load(bundle_path)
    model = load_keras_model(bundle)
    calibration, heldout = reference_sets(bundle, options.data)
    calib_images = _calibration_images(calibration, options.calibration_images) \
        if any(f.name in CALIBRATED for f in wanted) else None
    reference = predict_logits(model, heldout.images) if options.validate else None
    builders = _builders(model, bundle, options, calib_images)

    tools = installed_versions(TOOL_PACKAGES)  # the same for every artifact of this run
    records, failures = [], []
    built: dict[str, Path] = {}  # format -> its file, for the formats converted from it
    for fmt in wanted:
        out = bundle.path / fmt.filename
        log(f"exporting {fmt.name} -> {out.name}")
        started = time.perf_counter()
        builders[fmt.name](out, built.get(fmt.source) if fmt.source else None)
        built[fmt.name] = out
        files = _artifact_files(fmt, out)
        record = {
            "file": fmt.filename, "format": fmt.name, "precision": fmt.precision,
            "size_bytes": sum(f.stat().st_size for f in files), "sha256": sha256_file(out),
            "build_seconds": round(time.perf_counter() - started, 2),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "opset": options.opset, "tools": tools,
        }
        if len(files) > 1:
            record["weights_file"] = files[1].name
            record["weights_sha256"] = sha256_file(files[1])
        if fmt.name == "openvino":
            record["run_time_precisions"] = ["fp32", "bf16 (INFERENCE_PRECISION_HINT=bf16 on AMX CPUs)"]
        if fmt.name == "onnx-int8":
            record["calibration"] = {"images": len(calib_images), "method": options.calibration_method,
                                     "reduce_range": options.int8_reduce_range}
        if fmt.name == "tflite-int8":
            record["calibration"] = {"images": len(calib_images), "method": "minmax (TFLite converter)"}
        if fmt.name == "tensorrt":
            header = read_engine_header(out)
            record["tensorrt"] = header["tensorrt"]
            record["target"] = header["target"]
            record["profile"] = header["profile"]
            record["source_sha256"] = header["onnx_sha256"]
        skipped = skip_reason(fmt.runtime) if options.validate else "validation switched off (--no-validate)"
        if skipped is None:
            logits, label_out = RUNNERS[fmt.runtime](out, heldout.images)
            tolerance = (options.tolerances or TOLERANCES).get(fmt.precision, TOLERANCES[fmt.precision])
            report = compare(fmt.precision, logits, label_out, reference, heldout.values, bundle.labels,
                             tolerance)
            for check in report["checks"]:
                log(format_check(fmt.name, check))
            record["validation"] = report
            record["status"] = "validated" if report["passed"] else "failed-validation"
            if not report["passed"]:
                kept = _mark_unvalidated(fmt, out)
                record["file"] = kept.name
                if len(files) > 1:
                    record["weights_file"] = _artifact_files(fmt, kept)[1].name
                built[fmt.name] = kept  # formats made from it are validated on their own
                failed = [c["check"] for c in report["checks"] if not c["passed"]]
                failures.append(f"{fmt.name}: {', '.join(failed)} (kept as {kept.name})")
        else:
            log(f"  {fmt.name:<13} not validated: {skipped}")
            record["validation"] = {"skipped": skipped}
            record["status"] = "unvalidated"
        bundle.meta.setdefault("artifacts", {})[fmt.name] = record
        bundle.save()
        records.append(record)
    if failures:
        raise ValidationError("artifacts failed validation against the Keras model: " + "; ".join(failures))
    return records
