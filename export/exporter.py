"""``export_bundle``: build each requested artifact, validate it against Keras, record it.

Export draws the bundle's verification set (a sample of the held-out images with the
Keras logits, see :mod:`edgeclf.verification`; written into the bundle with the first
artifact). Each artifact is validated on it through the runtime's own Predictor and
backend, exactly as it will run on the device
(:func:`edgeclf.runtime.verifier.check_entry`, the code path of ``edgeclf verify``).

Each artifact is built and validated in a private staging directory inside the bundle,
then its files and its entry in ``bundle.json`` (file, sha256, size, precision,
validation figures, tool versions, build time) are put in force together by
:func:`edgeclf.bundle.commit_artifact`, under the bundle's lock: concurrent exports keep
each other's records, an interrupted export keeps what it finished, and a re-export
killed at any point leaves either the old artifact and record or the new ones.

A validated artifact is only ever replaced by a validated one. An artifact that fails
validation is kept as ``*.unvalidated.<ext>`` for inspection (never picked up as the
artifact) and all failures are raised together.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from edgeclf.export.builders import Builders, RecordFields, TrainingSide
from edgeclf.export.int8_gate import MarginRule
from edgeclf.export.int8_search import Int8Target
from edgeclf.export.tensorrt_engine import EngineOptions, header_record
from edgeclf.export.tflite import ServingSavedModel

from edgeclf.bundle import Bundle, commit_artifact, recover_bundle
from edgeclf.engine_file import read_engine_header
from edgeclf.errors import (BackendUnavailableError, ConversionError, DataError, EdgeclfError,
                            IncompatibleArtifactError, InvalidInputError, ValidationError)
from edgeclf.formats import Format, entries, parse_formats
from edgeclf.fsio import sha256_file, staging_directory, storage_error, storage_errors
from edgeclf.progress import log
from edgeclf.runtime.backends import BACKENDS, missing_modules
from edgeclf.runtime.checks import TOLERANCES, Tolerance, format_check
from edgeclf.runtime.hardware import Hardware, detect
from edgeclf.runtime.verifier import check_entry, store_results
from edgeclf.trust_file import Trust, embedding_block, write_trust
from edgeclf.verification import DEFAULT_IMAGES, VerificationSet, sample_indices, write_verification_set
from edgeclf.versions import installed_versions

#: INT8 formats validated against ExportOptions.int8_target (each made by an accuracy-aware search).
INT8_SEARCHED = ("onnx-int8", "openvino-int8", "tflite-int8")
#: Fewer calibration images than this give a warning: activation ranges get noisy.
MIN_CALIBRATION_IMAGES = 100
#: The CPU classes INT8 is quantized for (runtime.hardware.Hardware.int8_class).
INT8_CPU_CLASSES = ("avx2", "vnni")
TOOL_PACKAGES = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxconverter-common", "onnxruntime", "openvino",
                 "ai-edge-litert", "tensorrt", "tensorrt-rtx-cu12")


@dataclass
class ExportOptions:
    opset: int = 17
    calibration_images: int = 300
    #: Training images (not used to calibrate) the INT8 searches judge their candidates on
    #: and the decided margin is derived on; the verification set never reaches them.
    tuning_images: int = 500
    #: onnxruntime's calibrator for the QDQ INT8 models; None: min-max, and where plain INT8
    #: misses the target, entropy then percentile before any layer is kept in FP32.
    calibration_method: str | None = None
    #: The CPUs INT8 is quantized for: "avx2" (no VNNI: 7-bit weights, exact where u8 x s8 pairs
    #: are summed in int16), "vnni" (VNNI, AMX, any ARM: full 8-bit weights); None: this
    #: machine's class. Other machines rely on `edgeclf verify` there.
    int8_cpu: str | None = None
    #: How the INT8 gate's decided margin is derived (int8_gate).
    decided: MarginRule = field(default_factory=MarginRule)
    validate: bool = True
    #: Held-out images kept in the bundle as its verification set (validation runs on them).
    verification_images: int = DEFAULT_IMAGES
    data: str | Path | None = None  # labelled images instead of the bundle's own
    tolerances: dict[str, Tolerance] | None = None  # per precision; defaults: checks.TOLERANCES
    #: What every INT8 artifact but the TensorRT engine must reach; their searches keep layers
    #: in FP32 until they do.
    int8_target: Int8Target = field(default_factory=Int8Target)
    engine: EngineOptions = field(default_factory=EngineOptions)  # TensorRT build settings

    def __post_init__(self) -> None:
        if self.int8_cpu not in (None, *INT8_CPU_CLASSES):
            raise InvalidInputError(f"the INT8 CPU class must be one of {list(INT8_CPU_CLASSES)} (or None: this "
                                    f"machine's). Received: {self.int8_cpu!r}")

    def int8_class(self, hardware: Hardware) -> str:
        """The CPU class INT8 artifacts are quantized for: the one asked for, else this machine's."""
        return self.int8_cpu or hardware.int8_class


def _importable(module: str) -> bool:
    """Whether ``module`` (or, for "a|b", either) imports."""
    for name in module.split("|"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return True
    return False


def cannot_build(fmt: Format, options: ExportOptions) -> EdgeclfError | None:
    """Why this machine cannot build ``fmt``, or None: a converter library is missing, or the
    installed TensorRT flavour builds nothing for this machine (TensorRT-RTX on an H100)."""
    missing = [m for m in fmt.build_modules if not _importable(m)]
    if missing:
        return BackendUnavailableError(f"format {fmt.name!r} needs {missing}, which are not installed; "
                                       f"install them with: pip install 'edgeclf[{fmt.extra}]'")
    if fmt.backend == "tensorrt":
        from edgeclf.export.tensorrt_engine import engine_targets

        try:
            engine_targets(options.engine.compute_capabilities, fmt.precision)
        except (ConversionError, IncompatibleArtifactError) as exc:
            return type(exc)(f"format {fmt.name!r} cannot be built here: {exc}")
    return None


def _check_buildable(formats: list[Format], options: ExportOptions) -> None:
    """Formats asked for by name: what cannot be built here is refused up front."""
    for fmt in formats:
        error = cannot_build(fmt, options)
        if error is not None:
            raise error


def _buildable_only(formats: list[Format], options: ExportOptions) -> list[Format]:
    """For ``all``: the formats this machine can build; a warning names the rest and why."""
    kept: list[Format] = []
    for fmt in formats:
        error = cannot_build(fmt, options)
        if error is None and fmt.source and fmt.source not in {k.name for k in kept}:
            error = f"needs {fmt.source}"
        if error is None:
            kept.append(fmt)
        else:
            warnings.warn(f"'all' skips {fmt.name}: {error}", stacklevel=3)
    return kept


def _artifact_files(fmt: Format, entry: Path) -> list[Path]:
    from edgeclf.export.openvino_ir import ir_files

    return ir_files(entry) if fmt.backend == "openvino" else [entry]


def _unvalidated_name(fmt: Format) -> str:
    """``model.int8.onnx`` -> ``model.int8.unvalidated.onnx``: kept for inspection, never run as the artifact."""
    entry = Path(fmt.filename)
    return f"{entry.stem}.unvalidated{entry.suffix}"


def _build(builder: Callable, out: Path, source: Path | None, needed: int) -> dict[str, Any]:
    """Run one builder; running out of space (whatever library hit it) is one StorageError.

    Returns what the builder adds to the artifact's record (usually nothing)."""
    try:
        with storage_errors(out, needed):
            result = builder(out, source)
            # Only what a builder marks for the record joins it (onnx_to_engine returns its header, say).
            return result if isinstance(result, RecordFields) else {}
    except ConversionError as exc:
        # The converter's message may carry the OSError (or only its text) that stopped it.
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else OSError(None, str(exc))
        converted = storage_error(cause, out, needed)
        if converted is cause:
            raise
        raise converted from None


def training_side(model, training, calibration_count: int, tuning_count: int,
                  searched: bool, calibrated: bool = True) -> TrainingSide:
    """Calibration and tuning images: disjoint reproducible samples of the training images.

    ``searched``: an INT8 search will run (or a BF16 gate be recorded), so the tuning images (and
    their Keras logits) are needed. ``calibrated``: a calibrated format is built (else the
    calibration sample only sets the tuning images apart, and a small one is not worth a warning).
    When the training side is too small for both, the tuning images are the calibration ones
    (with a warning): still never a held-out image.
    """
    from edgeclf.train.evaluate import predict_logits

    if calibration_count < 1:
        raise InvalidInputError(f"calibration image count must be >= 1. Received: {calibration_count}")
    if tuning_count < 1:
        raise InvalidInputError(f"tuning image count must be >= 1. Received: {tuning_count}")
    if len(training) == 0:
        raise DataError("no calibration images: the training data holds none. Pass --data with labelled images.")
    n = min(calibration_count, len(training))
    if calibrated and n < MIN_CALIBRATION_IMAGES:
        warnings.warn(f"calibrating INT8 on only {n} images; {MIN_CALIBRATION_IMAGES}+ give steadier ranges.",
                      stacklevel=3)
    order = np.random.default_rng(0).permutation(len(training))  # a reproducible sample of the training images
    calibration = training.images[np.sort(order[:n])]
    if not searched:
        return TrainingSide(calibration, None)
    rest = np.sort(order[n:n + tuning_count])
    if len(rest) == 0:
        warnings.warn(f"all {n} training images calibrate INT8, so the INT8 searches are tuned on the same "
                      f"images; fewer --calibration-images leave some to tune on", stacklevel=3)
        rest = np.sort(order[:min(n, tuning_count)])
    images = training.images[rest]
    return TrainingSide(calibration, VerificationSet(images, np.asarray(training.values)[rest],
                                                     predict_logits(model, images)))


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
    from edgeclf.export.trust_fit import fit_trust
    from edgeclf.train.evaluate import load_keras_model
    from edgeclf.train.model import embedding_model

    options = options or ExportOptions()
    wanted = parse_formats(formats)
    if formats == "all" or formats == ["all"]:
        wanted = _buildable_only(wanted, options)
    else:
        _check_buildable(wanted, options)
    if options.verification_images < 1:
        raise InvalidInputError(f"verification image count must be >= 1. Received: {options.verification_images}")
    bundle = Bundle.load(bundle_path)
    model = load_keras_model(bundle)
    calibration, heldout = reference_sets(bundle, options.data)
    searching = any(f.name in INT8_SEARCHED for f in wanted)
    # The gate's decided margin also judges BF16 runs: recorded with the FP32 IR wherever it is
    # exported (BF16 is emulated to derive it), so a BF16 device's `verify` applies it.
    tuned = searching or any("bf16" in f.run_time_precisions for f in wanted)
    calibrated = any(f.calibrated for f in wanted)
    side = training_side(model, calibration, options.calibration_images, options.tuning_images, tuned, calibrated) \
        if tuned or calibrated else TrainingSide(None, None)
    keep = sample_indices(len(heldout), options.verification_images)  # the verification set's images
    reference, drawn = _reference(bundle, model, heldout, keep, options)
    trust = fit_trust(model, bundle, calibration, heldout, keep)
    to_judge = options.int8_target.images_to_judge()
    if searching and len(reference) < to_judge:
        warnings.warn(f"the INT8 target ({options.int8_target.min_agreement} agreement) is judged on only "
                      f"{len(reference)} held-out images, where one disagreement costs {1 / len(reference):.4f}; "
                      f"it needs at least {to_judge} (a larger held-out split, --data, or --verification-images)",
                      stacklevel=2)
    if searching and side.tuning is not None and len(side.tuning) < to_judge:
        warnings.warn(f"the INT8 searches are tuned on only {len(side.tuning)} training images, where one "
                      f"disagreement costs {1 / len(side.tuning):.4f}; the target needs at least {to_judge} "
                      f"(more training images, fewer --calibration-images, or more --tuning-images)", stacklevel=2)

    tools = installed_versions(TOOL_PACKAGES)  # the same for every artifact of this run
    for done in recover_bundle(bundle.path):  # what a killed export left behind
        log(f"recovered an interrupted export: {done}")
    needed = bundle.model_path.stat().st_size  # about what one FP32 artifact takes
    records, failures = [], []
    built: dict[str, tuple[Path, dict[str, Any]]] = {}  # format -> its file and record, for those made from it
    # Every graph gives the embedding of the block the familiarity check was fitted on.
    served = embedding_model(model, embedding_block(trust.record))
    with staging_directory(bundle.path, "export") as stage, ServingSavedModel(served, bundle, stage) as serving:
        builders = Builders(served, bundle, options, side, reference, serving, stage)
        run = _Run(bundle, stage, builders, reference, drawn, options, tools, needed, detect(), side, trust)
        for fmt in wanted:
            record, kept = _export_one(run, fmt, built)
            built[fmt.name] = kept, record
            records.append(record)
            if record["status"] == "failed-validation":
                failed = [c["check"] for c in record["validation"]["checks"] if not c["passed"]]
                failures.append(f"{fmt.name}: {', '.join(failed)} (kept as {kept.name})")
    if failures:
        raise ValidationError("artifacts failed validation against the Keras model: " + "; ".join(failures), records)
    return records


def _reference(bundle: Bundle, model, heldout, keep: np.ndarray,
               options: ExportOptions) -> tuple[VerificationSet, dict[str, Any]]:
    """The verification set: the held-out images ``keep`` (a reproducible sample) with their Keras
    logits (every artifact of this run is validated on it), and how it was drawn."""
    from edgeclf.train.evaluate import predict_logits

    images = heldout.images[keep]
    reference = VerificationSet(images, np.asarray(heldout.values)[keep], predict_logits(model, images))
    settings, data = bundle.meta["training"]["settings"], bundle.meta["training"]["data"]
    drawn = {"from": str(options.data) if options.data is not None else
             ("the held-out split of " + str(data["source"]) if data.get("validation") == "split"
              else str(data.get("validation"))),
             "split": {"val_split": settings.get("val_split"), "seed": settings.get("seed")}
             if options.data is not None or data.get("validation") == "split" else None,
             "held_out_images": len(heldout), "kept": len(keep), "sample": "uniform without replacement, seed 0",
             "reference": "Keras model.keras logits (float32)", "model_sha256": bundle.meta.get("model", {}).get("sha256")}
    return reference, drawn


@dataclass(frozen=True)
class _Run:
    """What every artifact of one export run shares."""

    bundle: Bundle
    stage: Path  # the private staging directory inside the bundle
    builders: Builders
    reference: VerificationSet  # what validation runs on, kept in the bundle with the first artifact
    drawn: dict[str, Any]
    options: ExportOptions
    tools: dict[str, str]
    needed: int  # bytes one artifact may take (for out-of-space messages)
    hardware: Hardware
    side: TrainingSide  # calibration and tuning images, and the gate's decided margin
    trust: Trust  # temperature, familiarity and conformal calibration, written with the verification set
    written: list[dict] = field(default_factory=list)  # the verification set's record, once written


def _export_one(run: _Run, fmt: Format, built: dict[str, tuple[Path, dict]]) -> tuple[dict[str, Any], Path]:
    """Build, validate and commit one artifact; returns its record and where its entry file now is."""
    out = run.stage / fmt.filename
    source = built.get(fmt.source) if fmt.source else None
    log(f"exporting {fmt.name} -> {fmt.filename}")
    started = time.perf_counter()
    extra = _build(run.builders[fmt.name], out, source[0] if source else None, run.needed)
    record = _new_record(run, fmt, out, time.perf_counter() - started, source[1] if source else None)
    record.update(extra)
    if fmt.precision == "int8" and _cannot_validate(fmt, run.hardware) is None:
        offset = _embedding_offset(run, fmt, out)
        if offset is not None:
            record["embedding_offset"] = offset
    run_time = _validate(run, fmt, out, record, source[0] if source else None)
    if not run.written:  # with the first artifact: an export that makes none leaves the bundle as it was
        run.written.append(write_verification_set(run.bundle.path, run.reference, run.drawn))
        log(f"verification set: {len(run.reference)} held-out images -> {run.written[0]['file']} "
            f"({run.written[0]['size_bytes'] / 1e6:.1f} MB)")
        # Its reference scores are those of these verification images: written together.
        written = write_trust(run.bundle.path, run.trust)
        log(f"trust: {written['file']} ({written['size_bytes'] / 1e6:.1f} MB)")
    record, kept = _put_in_force(run, fmt, out, record)
    if kept.name == fmt.filename and "checks" in record["validation"]:
        # The figures behind this artifact, on this kind of machine: what `auto` and `verify` read.
        results = {fmt.name: {**record["validation"], "format": fmt.name, "precision_hint": None}, **run_time}
        store_results(run.bundle.path, {name: {**r, "artifact_sha256": record["sha256"], "by": "export"}
                                        for name, r in results.items()}, run.hardware)
    return record, kept


def _new_record(run: _Run, fmt: Format, out: Path, seconds: float, source: dict | None) -> dict[str, Any]:
    """The bundle.json entry of a freshly built artifact (before validation)."""
    options, files = run.options, _artifact_files(fmt, out)
    record = {
        "file": fmt.filename, "format": fmt.name, "precision": fmt.precision,
        "size_bytes": sum(f.stat().st_size for f in files), "sha256": sha256_file(out),
        "build_seconds": round(seconds, 2),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "opset": options.opset, "tools": run.tools,
    }
    if len(files) > 1:
        record["weights_file"] = files[1].name
        record["weights_sha256"] = sha256_file(files[1])
        record["weights_size_bytes"] = files[1].stat().st_size
    if fmt.run_time_precisions:
        record["run_time_precisions"] = list(fmt.run_time_precisions)
    if fmt.name in ("onnx-int8", "openvino-int8"):  # their calibration joins the record with the search's report
        # 8-bit weights overflow AVX2's u8 x s8 pair sums (VPMADDUBSW) on CPUs without VNNI;
        # NNCF's default overflow fix covers only the first layer.
        record["needs_int8_dot_product"] = options.int8_class(run.hardware) == "vnni"
    if fmt.backend == "tensorrt":
        record.update(header_record(read_engine_header(out)))
    return record


def _cannot_validate(fmt: Format, hardware: Hardware) -> str | None:
    """Why the artifact cannot be run here to validate it, or None."""
    info = BACKENDS[fmt.backend]
    if info.needs_gpu and hardware.gpu_compute_capability is None:
        made = "the validated FP16 ONNX" if fmt.precision == "fp16" else "a QDQ ONNX (checked on ONNX Runtime)"
        return (f"no NVIDIA GPU here: the engine was built ahead of time from {made}; its header "
                "lets the device refuse a mismatch, and `edgeclf verify` on the GPU machine validates it")
    missing = missing_modules(info)
    if missing:
        return f"running it needs {missing}: pip install 'edgeclf[{info.extra}]'"
    return None


def _tolerance(options: ExportOptions, fmt: Format, record: dict[str, Any]) -> Tolerance:
    """What the artifact is validated against: the INT8 gate, with the decided margin its search
    recorded, for the INT8 formats the search serves; otherwise the given or default tolerance
    of its precision."""
    if options.tolerances and fmt.precision in options.tolerances:
        return options.tolerances[fmt.precision]
    if fmt.name in INT8_SEARCHED:
        decided = (record.get("quantization") or {}).get("decided") or {}
        return options.int8_target.tolerance(decided.get("margin"))
    return TOLERANCES[fmt.precision]


def _embedding_offset(run: _Run, fmt: Format, out: Path) -> dict[str, Any] | None:
    """Where an INT8 artifact's embedding sits off Keras' on the calibration images (training images,
    never the verification set): quantizing shifts each pooled channel by a bias of its own, a tenth
    of its spread across images and up to its whole spread (mixed0 at 299 px), which alone made 13%
    of held-out images unfamiliar at p <= 0.01. The device removes it before scoring familiarity."""
    from edgeclf.runtime.predictor import Predictor
    from edgeclf.trust_file import offset_record

    try:
        with Predictor.load(out, fmt.backend, allow_unvalidated=True) as predictor:
            artifact = predictor.embeddings(run.side.offset_images)
    except EdgeclfError:  # it does not load: its validation says so
        return None
    found = offset_record(artifact, run.side.keras_embedding(run.builders.model))
    log(f"  {fmt.name:<13} embedding offset from Keras' on {found['images']} calibration images: median "
        f"{found['median_shift_of_spread']:.3f}, largest {found['largest_shift_of_spread']:.3f} of a channel's spread")
    return found


def _check(run: _Run, fmt: Format, out: Path, hint: str | None, tolerance: Tolerance,
           record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The artifact run by the runtime's Predictor on the verification set, compared with Keras."""
    offset = ((record or {}).get("embedding_offset") or {}).get("values")
    try:
        return check_entry(out, fmt.backend, hint, run.reference, run.bundle.labels, tolerance, trust=run.trust,
                           embedding_offset=None if offset is None else np.asarray(offset, np.float32))
    except EdgeclfError as exc:  # built, but the runtime cannot load it: that is a failed validation
        return {"error": f"{type(exc).__name__}: {exc}", "passed": False,
                "checks": [{"check": "loads in the runtime", "value": False, "limit": True, "passed": False}]}


def _run_time_tolerance(run: _Run, hint: str, onnx_fp32: Path | None) -> Tolerance:
    """The limits of a run-time precision: BF16 is judged like INT8 on the decided images and by
    the paired accuracy test (a change of arithmetic flips near-ties: 0.9896 agreement on all
    images for the main job's model here), besides its logit tolerance."""
    given = (run.options.tolerances or {}).get(hint)
    if given is not None or run.side.tuning is None or onnx_fp32 is None:
        return given or TOLERANCES[hint]
    margin = run.side.decided_margin(onnx_fp32, run.options.decided)["margin"]
    return replace(TOLERANCES[hint], decided_margin=margin, paired_alpha=run.options.int8_target.paired_alpha)


def _validate(run: _Run, fmt: Format, out: Path, record: dict[str, Any],
              source: Path | None = None) -> dict[str, dict[str, Any]]:
    """Validate the built artifact against Keras; sets the record's ``validation`` and ``status``.

    Returns the results of its run-time precisions (BF16 on AMX or AVX512_BF16 CPUs), which do not decide
    its status: a failed BF16 run only keeps ``auto`` from running the IR in BF16."""
    skipped = _cannot_validate(fmt, run.hardware) if run.options.validate else \
        "validation switched off (--no-validate)"
    for _, hint in entries(fmt.name)[1:]:  # what verify checks a run-time precision against, on any device
        record.setdefault("run_time_tolerances", {})[hint] = asdict(_run_time_tolerance(run, hint, source))
    if skipped is not None:
        log(f"  {fmt.name:<13} not validated: {skipped}")
        record["validation"] = {"skipped": skipped}
        record["status"] = "unvalidated"
        return {}
    report = _check(run, fmt, out, None, _tolerance(run.options, fmt, record), record)
    if fmt.name in INT8_SEARCHED and "quantizable_layers" in record.get("quantization", {}):
        from edgeclf.export.int8_search import fp32_share_check

        # A model mostly in FP32 under an INT8 name is refused, whatever its agreement.
        report["checks"].append(fp32_share_check(record["quantization"], run.options.int8_target))
        report["passed"] = all(c["passed"] for c in report["checks"])
    for check in report["checks"]:
        log(format_check(fmt.name, check))
    record["validation"] = report
    record["status"] = "validated" if report["passed"] else "failed-validation"
    run_time: dict[str, dict[str, Any]] = {}
    for name, hint in entries(fmt.name)[1:]:
        if hint == "bf16" and not run.hardware.bf16:
            log(f"  {name:<13} not validated: BF16 runs natively only on CPUs with AMX or AVX512_BF16; "
                f"`edgeclf verify` validates it on such a device")
            continue
        result = _check(run, fmt, out, hint, Tolerance(**record["run_time_tolerances"][hint]))
        for check in result["checks"]:
            log(format_check(name, check))
        run_time[name] = {**result, "format": fmt.name, "precision_hint": hint}
    return run_time


def _put_in_force(run: _Run, fmt: Format, out: Path, record: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """Move the staged artifact into the bundle with its record, or beside it when it must not
    replace the artifact in force. Returns the record and the artifact's entry file."""
    bundle_path, files = run.bundle.path, _artifact_files(fmt, out)
    unvalidated = [f.name for f in _artifact_files(fmt, out.with_name(_unvalidated_name(fmt)))]
    names = unvalidated if record["status"] == "failed-validation" else [f.name for f in files]
    record["file"] = names[0]
    if len(names) > 1:
        record["weights_file"] = names[1]
    shas = [record["sha256"]] + ([record["weights_sha256"]] if len(files) > 1 else [])
    kept = commit_artifact(bundle_path, fmt.name, record, list(zip(files, names, shas, strict=True)))
    if kept is None:
        return record, bundle_path / names[0]
    # A validated artifact is in force and this build is not validated: keep it beside, unused.
    for src, name in zip(files, unvalidated, strict=True):
        with storage_errors(bundle_path / name):
            os.replace(src, bundle_path / name)
    log(f"  {fmt.name:<13} the earlier validated {kept['file']} stays in use; this build is kept as {unvalidated[0]}")
    record["file"] = unvalidated[0]
    if len(unvalidated) > 1:
        record["weights_file"] = unvalidated[1]
    return record, bundle_path / unvalidated[0]
