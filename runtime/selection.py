"""Which artifact and backend a Predictor runs: asked for by name, or chosen for this machine.

``backend`` may be "auto", a backend name ("openvino") or an artifact format
("onnx-int8"). "auto" takes the fastest validated artifact from benchmark results stored
in the bundle by ``edgeclf bench`` on a machine like this one (same CPU model and ISA
flags, same GPU); without them, a fixed order for the hardware found:
TensorRT on an NVIDIA GPU, OpenVINO BF16 on CPUs with AMX or AVX512_BF16, OpenVINO INT8 on Intel
CPUs with VNNI, ONNX Runtime FP32 otherwise.

"auto" never runs what was not checked for this machine: a run-time precision (OpenVINO
BF16) only once export or ``edgeclf verify`` passed it on a machine like this one, and
an INT8 artifact with full-range 8-bit weights never on x86 CPUs without VNNI or AMX,
since AVX2 alone saturates on them (ARM does not, with or without dot product: measured on
an emulated Raspberry Pi 4, see ``Hardware.int8_saturates``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeclf.bundle import BUNDLE_FILE, Bundle, artifact_present
from edgeclf.errors import BackendUnavailableError, BundleError, InvalidInputError
from edgeclf.formats import FORMATS, entry_name
from edgeclf.runtime.backends import BACKEND_BY_SUFFIX, BACKENDS, missing_modules, runs_here
from edgeclf.runtime.fingerprint import describe_machine, machine_key
from edgeclf.runtime.hardware import Hardware
from edgeclf.runtime.verifier import passed_here

#: Top-1 agreement with Keras (all images) a benchmark row needs for "auto" to rank it: a sanity
#: floor only. What makes an artifact a candidate is the gate export and verify applied (agreement on
#: the images Keras has decided, a paired accuracy test); all-image agreement also counts near-ties
#: that any change of arithmetic flips (BF16: 0.9896 on the main job's model), so 0.99 here would
#: rule out INT8 and BF16 artifacts that passed that gate.
AUTO_MIN_AGREEMENT = 0.95


@dataclass(frozen=True)
class Choice:
    backend: str
    path: Path
    format: str | None  # the bundle's artifact name; None for a lone file
    precision_hint: str | None  # "bf16": run the FP32 IR in BF16 (OpenVINO on AMX or AVX512_BF16 CPUs)
    record: dict[str, Any] | None  # the artifact's bundle.json entry
    reason: str


def _backend_of(fmt: str) -> str:
    for info in BACKENDS.values():
        if fmt in info.formats:
            return info.name
    raise InvalidInputError(f"unknown backend or artifact {fmt!r}; expected 'auto', a backend "
                            f"{list(BACKENDS)} or an artifact format. Received: {fmt!r}")


def trusted_here(bundle: Bundle, fmt: str, hardware: Hardware) -> bool:
    """Validated by export, or (an artifact export could not run) by ``edgeclf verify`` on this
    kind of machine: a TensorRT engine built without a GPU is checked on the GPU device."""
    status = bundle.meta.get("artifacts", {}).get(fmt, {}).get("status")
    return status == "validated" or (status == "unvalidated" and passed_here(bundle, fmt, hardware))


def needs_int8_dot_product(record: dict[str, Any]) -> bool:
    """Whether an INT8 artifact has full-range 8-bit weights, which saturate on AVX2 without VNNI.

    Records from before the field existed say it through their calibration settings."""
    return bool(record.get("needs_int8_dot_product", (record.get("calibration") or {}).get("reduce_range") is False))


def _usable(bundle: Bundle, fmt: str, allow_unvalidated: bool, hardware: Hardware,
            hint: str | None = None, auto: bool = False) -> dict[str, Any] | None:
    """The artifact's record if it may run here (see :func:`trusted_here`). For "auto", only
    what was checked for this kind of machine."""
    record = bundle.meta.get("artifacts", {}).get(fmt)
    if record is None or not artifact_present(bundle, record):
        return None
    if not allow_unvalidated and not trusted_here(bundle, fmt, hardware):
        return None
    if auto:
        if needs_int8_dot_product(record) and hardware.int8_saturates:
            return None
        if hint is not None and not passed_here(bundle, entry_name(fmt, hint), hardware):
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
        record = _usable(bundle, row["artifact"], False, hardware, row.get("precision_hint"), auto=True)
        if record is not None and runs_here(_backend_of(row["artifact"]), hardware):
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
        gpu = f"NVIDIA GPU (compute capability {hardware.gpu_compute_capability})"
        order.append(("tensorrt-int8", None, f"{gpu}: TensorRT INT8, validated on a GPU"))
        order.append(("tensorrt", None, gpu))
    if hardware.bf16:
        order.append(("openvino", "bf16", "CPU with BF16 arithmetic (AMX or AVX512_BF16): OpenVINO in BF16, "
                                          "verified on this machine"))
    if hardware.intel and hardware.vnni:
        order.append(("openvino-int8", None, "Intel CPU with VNNI: OpenVINO INT8"))
    order += [("onnx", None, "ONNX Runtime FP32, the portable default"),
              ("openvino", None, "OpenVINO FP32 (onnxruntime not installed)"),
              ("tflite", None, "LiteRT FP32 (onnxruntime and openvino not installed)")]
    for fmt, hint, why in order:
        record = _usable(bundle, fmt, False, hardware, hint, auto=True)
        if record is not None and runs_here(_backend_of(fmt), hardware):
            held = "".join(f"; {note}" for note in _held_back(bundle, hardware))
            return _choice(bundle, fmt, record, hint, f"{why}; {_no_benchmarks_here(bundle)}{held}")
    # None of those is in the bundle (a device package of one INT8 artifact): a validated one that runs here,
    # INT8 first (the fastest on a CPU), then FP32; FP16 last (most CPUs convert it back to FP32 at every layer).
    present = bundle.meta.get("artifacts", {})
    rank = {"int8": 0, "fp32": 1, "fp16": 2}
    for fmt in sorted((f for f in FORMATS if f in present), key=lambda f: rank.get(FORMATS[f].precision, 3)):
        record = _usable(bundle, fmt, False, hardware, None, auto=True)
        if record is not None and runs_here(_backend_of(fmt), hardware):
            held = "".join(f"; {note}" for note in _held_back(bundle, hardware))
            return _choice(bundle, fmt, record, None, f"a validated artifact of the bundle that runs here (none of the "
                                                      f"ones preferred for this machine is in it); "
                                                      f"{_no_benchmarks_here(bundle)}{held}")
    return None


def _held_back(bundle: Bundle, hardware: Hardware) -> list[str]:
    """What "auto" left out on this machine until it is checked here, for ``describe()["reason"]``."""
    notes = []
    for fmt, record in bundle.meta.get("artifacts", {}).items():
        if record.get("status") != "validated":
            continue
        if needs_int8_dot_product(record) and hardware.int8_saturates:
            notes.append(f"{fmt} left out: its full-range INT8 weights saturate on x86 without VNNI or AMX "
                         f"(`edgeclf verify {bundle.path} --backend {fmt}` shows how far it drifts here)")
    if hardware.bf16 and "openvino" in bundle.meta.get("artifacts", {}) \
            and not passed_here(bundle, "openvino-bf16", hardware):
        notes.append(f"OpenVINO BF16 left out until it passes here: `edgeclf verify {bundle.path} "
                     f"--backend openvino --precision bf16`")
    return notes


def _nothing_to_run(bundle: Bundle, hardware: Hardware) -> str:
    """Why "auto" found nothing here, and what to do: on a workstation, export; on a device (a package,
    which has no model to export from), what it can do itself, or what to pack instead."""
    path = bundle.path
    if "package" not in bundle.meta:
        return (f"{path} has no validated artifact a backend installed here can run; export one with "
                f"`edgeclf export {path}` and see `edgeclf doctor`")
    held = _held_back(bundle, hardware)
    formats = list(bundle.meta.get("artifacts") or {})
    here = (f"; here: {'; '.join(held)}, and `--backend NAME` runs it once verify passed it" if held else
            "; see `edgeclf doctor` for the backends installed here")
    return (f"the package {path} has no artifact `auto` may run on this machine (it holds {formats or 'none'})"
            f"{here}; or, on the workstation, pack an artifact this CPU runs exactly (an INT8 one exported with "
            f"`--int8-cpu avx2`, or an FP32 one)")


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
            raise BundleError(_nothing_to_run(bundle, hardware))
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
        record = _usable(bundle, fmt, allow_unvalidated, hardware)
        if record is not None:
            return _choice(bundle, fmt, record, hint, f"asked for {backend}" + (f" in {precision}" if precision else ""))
    have = {f: r.get("status") for f, r in bundle.meta.get("artifacts", {}).items()}
    raise BundleError(f"{path} has no validated artifact for {backend!r}"
                      f"{' in ' + precision if precision else ''}; it has {have or 'none'}. "
                      f"Export one with `edgeclf export {path} --format ...`")
