"""A bundle's validated artifacts as a ready Triton model repository.

    REPO/
      edgeclf_onnx/      config.pbtxt  labels.txt  1/model.onnx            (onnxruntime backend)
      edgeclf_openvino/  config.pbtxt  labels.txt  1/model.xml, model.bin  (openvino backend)
      edgeclf_tensorrt/  config.pbtxt  labels.txt  1/model.plan            (tensorrt backend)

Only artifacts that export validated against Keras are packaged, after their sha256 is
checked against bundle.json. The repository is built under a temporary name and moved
into place when complete, so a failure leaves no partial repository.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeclf.bundle import Bundle, ArtifactFiles, artifact_files
from edgeclf.engine_file import read_engine
from edgeclf.errors import BundleError
from edgeclf.formats import FORMATS
from edgeclf.fsio import atomic_write_bytes, staged_directory
from edgeclf.limits import is_int
from edgeclf.serve.triton_config import (LABELS_FILE, PLATFORMS, Batching, build_config, check_model_name,
                                         config_text, labels_text, parse_config)

# Bundle artifact -> the Triton runtime that serves it, in the order models are written.
ARTIFACT_RUNTIMES = {f.name: f.backend for f in FORMATS.values() if f.triton}
# Triton's tensorrt backend links full TensorRT: a TensorRT-RTX plan does not load there.
TRITON_TENSORRT_FLAVOUR = "tensorrt"


@dataclass
class RepositoryReport:
    """What was written, and what was left out and why."""

    path: Path
    models: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _model_name(prefix: str, runtime: str) -> str:
    return f"{prefix}_{'onnx' if runtime == 'onnxruntime' else runtime}"


def _skip_reason(fmt: str, record: dict[str, Any] | None, bundle: Bundle) -> str | None:
    if record is None:
        return f"not exported (edgeclf export {bundle.path} --format {fmt})"
    flavour = (record.get("tensorrt") or {}).get("flavour", TRITON_TENSORRT_FLAVOUR)
    if fmt == "tensorrt" and flavour != TRITON_TENSORRT_FLAVOUR:
        return (f"{record['file']} was built with {flavour}, whose plans Triton's tensorrt backend "
                f"(full TensorRT) cannot load; build the engine with full TensorRT (pip install 'edgeclf[gpu]')")
    if record.get("status") != "validated":
        why = (record.get("validation") or {}).get("skipped") or "it disagreed with Keras"
        return f"{record['file']} is {record.get('status', 'not validated')}: {why}"
    return None


def _write_version(version_dir: Path, fmt: str, source: ArtifactFiles) -> tuple[list[str], int | None]:
    """Copy one artifact into ``version_dir`` under the file names its Triton backend expects.

    Returns the file names and, for an engine, the largest batch of its profile.
    """
    version_dir.mkdir(parents=True)
    names = list(PLATFORMS[ARTIFACT_RUNTIMES[fmt]]["files"])
    if fmt == "tensorrt":
        # Triton loads a bare plan: drop edgeclf's self-describing header.
        header, plan = read_engine(source.entry)
        atomic_write_bytes(version_dir / names[0], plan)
        return names, int(header["profile"]["max"][0])
    shutil.copyfile(source.entry, version_dir / names[0])
    if fmt == "openvino":
        shutil.copyfile(source.weights, version_dir / names[1])
    return names, None


def write_repository(bundle_path: str | Path, out: str | Path, *, name: str = "edgeclf",
                     batching: Batching | None = None, overwrite: bool = False) -> RepositoryReport:
    """Write a Triton model repository for every validated ONNX, OpenVINO and TensorRT artifact.

    Args:
        name: model name prefix; models are ``NAME_onnx``, ``NAME_openvino``, ``NAME_tensorrt``.
        batching: max batch, preferred sizes, queue delay and instance count of every model
            (an engine's max batch is capped at its profile's maximum).
        overwrite: replace a non-empty ``out``.

    Raises:
        BundleError: no validated ONNX model in the bundle, or an artifact differs from the
            file export validated.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is false.
        BackendUnavailableError: tritonclient (the config schema) is not installed.
    """
    check_model_name(name)
    batching = batching or Batching()
    bundle = Bundle.load(bundle_path)
    artifacts = bundle.meta.get("artifacts", {})
    onnx_problem = _skip_reason("onnx", artifacts.get("onnx"), bundle)
    if onnx_problem:
        raise BundleError(f"a Triton repository needs the validated ONNX model: {onnx_problem}")
    height, width = bundle.image_size
    report = RepositoryReport(path=Path(out).absolute())
    with staged_directory(out, overwrite) as stage:
        for fmt, runtime in ARTIFACT_RUNTIMES.items():
            record = artifacts.get(fmt)
            reason = _skip_reason(fmt, record, bundle)
            if reason:
                report.skipped[fmt] = reason
                continue
            # Inside the bundle, of the recorded size and sha256: never a file from elsewhere.
            source = artifact_files(bundle, record)
            model = _model_name(name, runtime)
            files, profile_max = _write_version(stage / model / "1", fmt, source)
            model_batching = batching
            if profile_max is not None and profile_max < batching.max_batch:
                model_batching = replace(
                    batching, max_batch=profile_max, preferred=tuple(p for p in batching.preferred if p <= profile_max))
            config = build_config(model, runtime, height, width, len(bundle.labels), model_batching,
                                  _embedding_width(bundle))
            text = config_text(config)
            if parse_config(text) != config:  # the file says exactly what was built
                raise BundleError(f"{model}: config.pbtxt does not read back as written")
            (stage / model / "config.pbtxt").write_text(text)
            (stage / model / LABELS_FILE).write_text(labels_text(bundle.labels))
            report.models.append({"model": model, "runtime": runtime, "artifact": fmt,
                                  "files": [f"{model}/1/{f}" for f in files],
                                  "max_batch_size": config.max_batch_size})
    return report


def _embedding_width(bundle: Bundle) -> int | None:
    """The width of the graphs' ``embedding`` output, where the bundle's trust file says they have one."""
    width = ((bundle.meta.get("trust") or {}).get("familiarity") or {}).get("dimension")
    return width if is_int(width) and width > 0 else None
