"""Which artifact and backend a Predictor runs: asked for by name, or chosen for this machine.

``backend`` may be "auto", a backend name ("openvino") or an artifact format
("onnx-int8"). "auto" takes the fastest validated artifact from benchmark results stored
in the bundle by ``edgeclf bench`` on a machine like this one (same CPU model and ISA
flags, same GPU); without them, a fixed order for the hardware found:
TensorRT on an NVIDIA GPU, OpenVINO BF16 on Intel CPUs with AMX, OpenVINO INT8 on Intel
CPUs with VNNI, ONNX Runtime FP32 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeclf.bundle import BUNDLE_FILE, Bundle, artifact_present
from edgeclf.errors import BackendUnavailableError, BundleError, InvalidInputError
from edgeclf.runtime.backends import BACKEND_BY_SUFFIX, BACKENDS, missing_modules
from edgeclf.runtime.fingerprint import describe_machine, machine_key
from edgeclf.runtime.hardware import Hardware

#: Top-1 agreement with Keras an artifact needs to be picked by "auto" from benchmarks.
AUTO_MIN_AGREEMENT = 0.99


@dataclass(frozen=True)
class Choice:
    backend: str
    path: Path
    format: str | None  # the bundle's artifact name; None for a lone file
    precision_hint: str | None  # "bf16": run the FP32 IR in BF16 (OpenVINO on AMX)
    record: dict[str, Any] | None  # the artifact's bundle.json entry
    reason: str


def _backend_of(fmt: str) -> str:
    for info in BACKENDS.values():
        if fmt in info.formats:
            return info.name
    raise InvalidInputError(f"unknown backend or artifact {fmt!r}; expected 'auto', a backend "
                            f"{list(BACKENDS)} or an artifact format. Received: {fmt!r}")


def _installed(backend: str, hardware: Hardware) -> bool:
    info = BACKENDS[backend]
    return not missing_modules(info) and (not info.needs_gpu or hardware.gpu_compute_capability is not None)


def _usable(bundle: Bundle, fmt: str, allow_unvalidated: bool) -> dict[str, Any] | None:
    record = bundle.meta.get("artifacts", {}).get(fmt)
    if record is None or not artifact_present(bundle, record):
        return None
    if record.get("status") != "validated" and not allow_unvalidated:
        return None
    return record


def _choice(bundle: Bundle, fmt: str, record: dict, hint: str | None, reason: str) -> Choice:
    return Choice(_backend_of(fmt), bundle.inside(record["file"]), fmt, hint, record, reason)


def _from_benchmarks(bundle: Bundle, hardware: Hardware) -> Choice | None:
    run = ((bundle.meta.get("benchmarks") or {}).get("machines") or {}).get(machine_key(hardware))
    rows = (run or {}).get("rows", [])
    ranked = sorted(
        (r for r in rows if r.get("status") == "ok" and r.get("batch") == 1 and r.get("artifact")
         and (r.get("agreement") or 0) >= AUTO_MIN_AGREEMENT),
        key=lambda r: r["p50_ms"],
    )
    for row in ranked:
        record = _usable(bundle, row["artifact"], allow_unvalidated=False)
        if record is not None and _installed(_backend_of(row["artifact"]), hardware):
            return _choice(bundle, row["artifact"], record, row.get("precision_hint"),
                           f"fastest validated artifact at batch 1 in this bundle's benchmarks on this "
                           f"machine ({row['p50_ms']:.2f} ms p50, agreement {row['agreement']:.3f})")
    return None


def _no_benchmarks_here(bundle: Bundle) -> str:
    """Why the hardware rules decide: no benchmarks at all, or only other machines'."""
    benchmarks = bundle.meta.get("benchmarks") or {}
    others = [describe_machine(run.get("environment", {}).get("machine", {}))
              for run in (benchmarks.get("machines") or {}).values()]
    if others:
        return f"the bundle's benchmarks come from other machines ({'; '.join(others)}), not this one"
    if benchmarks.get("rows"):
        return "the bundle's benchmarks do not say which machine ran them"
    return "no benchmark results in the bundle"


def _by_hardware(bundle: Bundle, hardware: Hardware) -> Choice | None:
    order: list[tuple[str, str | None, str]] = []
    if hardware.gpu_compute_capability:
        order.append(("tensorrt", None, f"NVIDIA GPU (compute capability {hardware.gpu_compute_capability})"))
    if hardware.intel and hardware.amx:
        order.append(("openvino", "bf16", "Intel CPU with AMX: OpenVINO in BF16"))
    if hardware.intel and hardware.vnni:
        order.append(("openvino-int8", None, "Intel CPU with VNNI: OpenVINO INT8"))
    order += [("onnx", None, "ONNX Runtime FP32, the portable default"),
              ("openvino", None, "OpenVINO FP32 (onnxruntime not installed)"),
              ("tflite", None, "LiteRT FP32 (onnxruntime and openvino not installed)")]
    for fmt, hint, why in order:
        record = _usable(bundle, fmt, allow_unvalidated=False)
        if record is not None and _installed(_backend_of(fmt), hardware):
            return _choice(bundle, fmt, record, hint, f"{why}; {_no_benchmarks_here(bundle)}")
    return None


def choose(path: Path, backend: str, precision: str | None, hardware: Hardware,
           allow_unvalidated: bool = False) -> Choice:
    """The artifact and backend to run for ``path`` (a bundle directory or one artifact file).

    Raises:
        BundleError: nothing usable in the bundle, or the path is neither.
        InvalidInputError: an unknown backend or precision.
        BackendUnavailableError: the backend asked for is not installed (names the extra).
    """
    if path.is_file():
        by_suffix = BACKEND_BY_SUFFIX.get(path.suffix.lower())
        if by_suffix is None:
            raise BundleError(f"cannot tell what runs {path.name}: expected a bundle directory or a "
                              f"{'/'.join(BACKEND_BY_SUFFIX)} file. Received: {path}")
        if backend not in ("auto", by_suffix):
            raise InvalidInputError(f"{path.name} is run by {by_suffix}, not {backend!r}. Received: {backend!r}")
        return Choice(by_suffix, path, None, precision if precision == "bf16" else None, None,
                      f"a lone {path.suffix} file is run by {by_suffix}")
    if not (path / BUNDLE_FILE).is_file():
        raise BundleError(f"not a bundle directory or an artifact file (no {BUNDLE_FILE}). Received: {path}")
    bundle = Bundle.load(path)
    if backend == "auto":
        choice = _from_benchmarks(bundle, hardware) or _by_hardware(bundle, hardware)
        if choice is None:
            raise BundleError(f"{path} has no validated artifact a backend installed here can run; "
                              f"export one with `edgeclf export {path}` and see `edgeclf doctor`")
        return choice
    formats = (backend,) if backend not in BACKENDS else BACKENDS[backend].formats
    name = backend if backend in BACKENDS else _backend_of(backend)
    missing = missing_modules(BACKENDS[name])
    if missing:
        raise BackendUnavailableError(f"backend {name!r} needs {missing}, which are not installed; "
                                      f"install them with: pip install 'edgeclf[{BACKENDS[name].extra}]'")
    hint = None
    if precision is not None:
        if precision == "bf16" and name == "openvino":
            formats, hint = ("openvino",), "bf16"
        else:
            formats = tuple(f for f in formats if bundle.meta.get("artifacts", {}).get(f, {}).get("precision")
                            == precision) or (f"{name}/{precision}",)
    for fmt in formats:
        record = _usable(bundle, fmt, allow_unvalidated)
        if record is not None:
            return _choice(bundle, fmt, record, hint, f"asked for {backend}" + (f" in {precision}" if precision else ""))
    have = {f: r.get("status") for f, r in bundle.meta.get("artifacts", {}).items()}
    raise BundleError(f"{path} has no validated artifact for {backend!r}"
                      f"{' in ' + precision if precision else ''}; it has {have or 'none'}. "
                      f"Export one with `edgeclf export {path} --format ...`")
