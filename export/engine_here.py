"""``edgeclf engine``: build the TensorRT FP16 engine where it runs, without TensorFlow.

A TensorRT engine runs only on the GPU and the TensorRT version it was built with, so an
engine made on the workstation cannot go to a Jetson. The bundle's (or a package's) validated
FP16 ONNX can: ``pack --for tensorrt`` ships it with a note that the engine is built on the
device, and this builds it there with whichever TensorRT is installed (full TensorRT, or
TensorRT-RTX), writes it with its header beside the ONNX and records it in ``bundle.json``
(and in a package's file list). With a GPU, ``verify`` then validates it on the verification
set and stores the result; without one it stays unvalidated, with the reason, as export
records an engine built ahead of time. An engine already there that was built from the same
ONNX, by the same TensorRT, for the same GPUs and batch profile is reused (tensorrt's timing
cache is reused in any case).
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeclf.bundle import Bundle, artifact_files, update_bundle
from edgeclf.engine_file import read_engine_header
from edgeclf.errors import BundleError, EdgeclfError
from edgeclf.export.metadata import artifact_metadata
from edgeclf.export.tensorrt_engine import EngineOptions, engine_targets, header_record, onnx_to_engine
from edgeclf.formats import FORMATS
from edgeclf.fsio import atomic_path, sha256_file
from edgeclf.gpu import local_compute_capability
from edgeclf.pack import check_package
from edgeclf.progress import log
from edgeclf.runtime.backends.tensorrt import tensorrt_module

ENGINE = FORMATS["tensorrt"]
SOURCE = ENGINE.source  # "onnx-fp16"


@dataclass(frozen=True)
class EngineReport:
    path: Path  # the engine file
    reused: bool  # an engine built as asked was already there
    record: dict[str, Any]  # bundle.json's artifacts.tensorrt
    verified: bool | None  # verify's result here; None without a GPU to run it


def build_engine_here(path: str | Path, options: EngineOptions | None = None, force: bool = False,
                      check: bool = True) -> EngineReport:
    """Build (or reuse) the FP16 engine of the bundle or package at ``path`` with this machine's TensorRT.

    Args:
        force: build even where an engine as asked is already there.
        check: run ``verify`` on the engine where a GPU can run it.

    Raises:
        BundleError: no validated FP16 ONNX, or a package whose files are not as packed.
        BackendUnavailableError: no TensorRT (or TensorRT-RTX) installed.
        ConversionError, IncompatibleArtifactError: the builder failed, or builds nothing for this machine.
    """
    options = options or EngineOptions()
    bundle = Bundle.load(path)
    check_package(bundle)
    source = (bundle.meta.get("artifacts") or {}).get(SOURCE)
    if not isinstance(source, dict) or source.get("status") != "validated":
        raise BundleError(f"{bundle.path} has no validated {SOURCE} artifact to build the engine from; on the "
                          f"workstation, export it (edgeclf export BUNDLE --format {SOURCE}) and ship it with "
                          f"`edgeclf pack BUNDLE --for tensorrt`")
    onnx = artifact_files(bundle, source).entry  # its size and sha256 checked against the record
    trt, flavour = tensorrt_module()
    out = bundle.path / ENGINE.filename
    wanted = {"flavour": flavour, "version": trt.__version__,
              "targets": engine_targets(options.compute_capabilities, ENGINE.precision),
              "source_sha256": sha256_file(onnx), "batch_profile": list(options.batch_profile)}
    current = (bundle.meta.get("artifacts") or {}).get(ENGINE.name)
    if not force and _built_as(current, out, wanted):
        log(f"the engine in {out} was built from this {SOURCE} by {flavour} {trt.__version__} for "
            f"{', '.join(wanted['targets'])}: reused (--force builds it again)")
        return EngineReport(out, True, current, None)

    started = time.perf_counter()
    with atomic_path(out, suffix=".engine") as tmp:
        header = onnx_to_engine(onnx, tmp, artifact_metadata(bundle, ENGINE.precision), options)
    record = _record(out, header, time.perf_counter() - started)
    with update_bundle(bundle.path) as locked:
        locked.meta.setdefault("artifacts", {})[ENGINE.name] = record
        package = locked.meta.get("package")
        if isinstance(package, dict):  # the package's file list names the engine, as pack would have
            package["files"][ENGINE.filename] = {"sha256": record["sha256"], "size_bytes": record["size_bytes"]}
            package["formats"] = list(dict.fromkeys([*package.get("formats", []), ENGINE.name]))
            package.pop("build_on_device", None)
    log(f"wrote {out} ({record['size_bytes'] / 1e6:.1f} MB) in {record['build_seconds']:.1f} s")
    verified = None
    if check and local_compute_capability() is not None:
        from edgeclf.runtime.verifier import verify

        verified = verify(bundle.path, ENGINE.name).passed
    return EngineReport(out, False, record, verified)


def _built_as(record: Any, out: Path, wanted: dict[str, Any]) -> bool:
    """Whether ``record`` describes the engine file ``out`` as built just as ``wanted``."""
    if not isinstance(record, dict) or not out.is_file() or record.get("sha256") != sha256_file(out):
        return False
    try:
        header = read_engine_header(out)
    except EdgeclfError:
        return False
    return (header["tensorrt"].get("flavour"), header["tensorrt"].get("version"),
            header["target"].get("compute_capabilities"), header.get("onnx_sha256"),
            [header["profile"][k][0] for k in ("min", "opt", "max")]) == \
        (wanted["flavour"], wanted["version"], wanted["targets"], wanted["source_sha256"], wanted["batch_profile"])


def _record(out: Path, header: dict[str, Any], seconds: float) -> dict[str, Any]:
    """bundle.json's record of an engine built here; validated by ``verify`` on a GPU, not by export."""
    gpu = header["target"].get("built_on_gpu")
    return {
        "file": ENGINE.filename, "format": ENGINE.name, "precision": ENGINE.precision,
        "size_bytes": out.stat().st_size, "sha256": sha256_file(out), "build_seconds": round(seconds, 2),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "built_by": "edgeclf engine", **header_record(header),
        "status": "unvalidated",
        "validation": {"skipped": (f"built on this device ({'GPU ' + gpu if gpu else 'no GPU'}) from the validated "
                                   f"{SOURCE}, where no Keras model is: `edgeclf verify` checks it on the "
                                   f"verification set on a GPU, and `auto` runs it once that passed there")},
    }
