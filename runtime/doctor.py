"""``edgeclf doctor``: which backends and accelerators are usable here, and why not if not."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from edgeclf.gpu import GpuSearch, find_gpu
from edgeclf.runtime.backends import BACKENDS, missing_modules
from edgeclf.runtime.fingerprint import machine_key
from edgeclf.runtime.hardware import Hardware, detect
from edgeclf.versions import installed_versions

def _version(backend: str) -> str | None:
    found = installed_versions(BACKENDS[backend].distributions)
    return next((f"{name} {version}" for name, version in found.items()), None)


class _Unusable(Exception):
    """The backend is installed but cannot run on this machine; the message says why."""


def _details(backend: str, hw: Hardware) -> str:
    """What the backend can use on this machine (called only when it is installed)."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        return "providers: " + ", ".join(ort.get_available_providers())
    if backend == "openvino":
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        bf16 = ("BF16 with AMX" if hw.amx else "BF16 with AVX512_BF16") if hw.bf16 else \
            ("BF16 emulated (slower than FP32)" if "BF16" in caps else "no BF16")
        int8 = "fast INT8 (VNNI)" if hw.vnni else "INT8 without VNNI (AVX2: a 7-bit weight range is exact)"
        return f"CPU capabilities {caps}; {bf16}; {int8}"
    if backend == "tflite":
        return "XNNPACK delegate on the CPU"
    from edgeclf.runtime.backends.tensorrt import rtx_targets, tensorrt_module

    trt, flavour = tensorrt_module()
    here = hw.gpu_compute_capability
    if flavour == "tensorrt-rtx" and here not in rtx_targets(trt):
        raise _Unusable(f"TensorRT-RTX {trt.__version__} runs engines on compute capabilities "
                        f"{list(rtx_targets(trt))}, not this GPU's {here}: pip install 'edgeclf[gpu]' (full TensorRT)")
    return f"{flavour} {trt.__version__} builds and runs engines for this GPU (compute capability {here})"


def _gpu_line(search: GpuSearch) -> str:
    """The GPU and how it was found, or every way asked and what each said."""
    gpu = search.gpu
    if gpu is None:
        return "none (" + "; ".join(f"{way}: {said}" for way, said in search.tried.items()) + ")"
    board = f" on {gpu.jetson}" if gpu.jetson and gpu.jetson != gpu.name else ""
    return f"{gpu.name}{board}, compute capability {gpu.compute_capability} (found by {gpu.found_by})"


def doctor() -> dict[str, Any]:
    """A report: the hardware, and for each backend whether it is usable and why not."""
    hw, search = detect(), find_gpu()
    rows = []
    for name, info in BACKENDS.items():
        missing = missing_modules(info)
        row: dict[str, Any] = {"backend": name, "version": _version(name), "runs": list(info.formats)}
        if missing:
            row.update(usable=False, why=f"{', '.join(missing)} not installed: pip install 'edgeclf[{info.extra}]'")
        elif info.needs_gpu and hw.gpu_compute_capability is None:
            row.update(usable=False, why="no NVIDIA GPU found (see nvidia_gpu above for what was asked)")
        else:
            try:
                row.update(usable=True, why=_details(name, hw))
            except _Unusable as exc:
                row.update(usable=False, why=str(exc))
            except Exception as exc:  # a library that imports but cannot start is not usable
                row.update(usable=False, why=f"installed but failed to start: {exc}")
        rows.append(row)
    accelerators = {
        "nvidia_gpu": _gpu_line(search),
        "amx": "yes" if hw.amx else "no",
        "bf16": ("yes (AMX)" if hw.amx else "yes (AVX512_BF16)") if hw.bf16 else
                "no (OpenVINO BF16 needs AMX or AVX512_BF16)",
        "vnni": "yes" if hw.vnni else "no (INT8 runs, but without single-instruction INT8 dot products)",
    }
    gpu = {**asdict(search.gpu), "tried": search.tried} if search.gpu else {"tried": search.tried}
    return {"hardware": {"cpu": hw.cpu_model, "vendor": hw.cpu_vendor, "cores": hw.cores,
                         "flags": sorted(hw.cpu_flags), "machine_key": machine_key(hw), "gpu": gpu},
            "accelerators": accelerators, "backends": rows}


def format_report(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = [f"CPU: {hw['cpu']} ({hw['vendor']}, {hw['cores']} cores; {', '.join(hw['flags']) or 'no notable flags'})"]
    lines.append(f"machine key: {hw['machine_key']} (auto trusts benchmark rows stored under it)")
    lines += [f"{name}: {value}" for name, value in report["accelerators"].items()]
    lines.append("")
    for row in report["backends"]:
        mark = "ok " if row["usable"] else "no "
        lines.append(f"{mark} {row['backend']:<12} {row['version'] or '-':<28} {row['why']}")
    return "\n".join(lines)
