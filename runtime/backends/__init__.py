"""The backend registry: one module per backend, its library imported only when used.

``BACKENDS`` maps a name to where its class lives, the modules it needs and the extra
that installs them; what it runs comes from the format registry (:mod:`edgeclf.formats`).
Nothing here imports a backend library.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from edgeclf.errors import BackendUnavailableError, InvalidInputError
from edgeclf.formats import FORMATS
from edgeclf.runtime.backends.base import Backend, BackendOptions

__all__ = ["BACKENDS", "Backend", "BackendOptions", "BackendInfo", "create_backend", "missing_modules", "runs_here"]


@dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  # "module:Class"
    #: Modules it needs; "a|b" means either.
    modules: tuple[str, ...]
    extra: str
    #: Distributions whose versions doctor and benchmark records report.
    distributions: tuple[str, ...]
    needs_gpu: bool = False

    @property
    def formats(self) -> tuple[str, ...]:
        """The artifact formats it runs, in order of preference (the format registry's order)."""
        return tuple(f.name for f in FORMATS.values() if f.backend == self.name)


BACKENDS: dict[str, BackendInfo] = {
    b.name: b
    for b in (
        BackendInfo("tensorrt", "edgeclf.runtime.backends.tensorrt:TensorRTBackend",
                    ("tensorrt|tensorrt_rtx", "cuda.bindings|cuda"), "gpu", ("tensorrt", "tensorrt-rtx-cu12"),
                    needs_gpu=True),
        BackendInfo("openvino", "edgeclf.runtime.backends.openvino:OpenVINOBackend", ("openvino",), "openvino",
                    ("openvino",)),
        BackendInfo("onnxruntime", "edgeclf.runtime.backends.onnxruntime:OnnxRuntimeBackend", ("onnxruntime",),
                    "cpu", ("onnxruntime", "onnxruntime-gpu")),
        BackendInfo("tflite", "edgeclf.runtime.backends.tflite:TFLiteBackend", ("ai_edge_litert",), "tflite",
                    ("ai-edge-litert",)),
    )
}

#: Which backend runs a lone file, by its extension.
BACKEND_BY_SUFFIX = {".onnx": "onnxruntime", ".xml": "openvino", ".tflite": "tflite", ".engine": "tensorrt",
                     ".plan": "tensorrt"}


def missing_modules(info: BackendInfo) -> list[str]:
    """The modules of ``info`` that do not import here."""
    missing = []
    for alternatives in info.modules:
        for name in alternatives.split("|"):
            try:
                importlib.import_module(name)
                break
            except ImportError:
                continue
        else:
            missing.append(alternatives.replace("|", " or "))
    return missing


def runs_here(name: str, hardware) -> bool:
    """Whether backend ``name`` is installed and has what it needs here (a GPU for TensorRT)."""
    info = BACKENDS[name]
    return not missing_modules(info) and (not info.needs_gpu or hardware.gpu_compute_capability is not None)


def create_backend(name: str) -> Backend:
    """A new, unloaded backend by registry name.

    Raises:
        InvalidInputError: an unknown name (the message lists the known ones).
        BackendUnavailableError: its library is not installed (names the extra).
    """
    if name not in BACKENDS:
        raise InvalidInputError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}. Received: {name!r}")
    info = BACKENDS[name]
    missing = missing_modules(info)
    if missing:
        raise BackendUnavailableError(f"backend {name!r} needs {missing}, which are not installed; "
                                      f"install them with: pip install 'edgeclf[{info.extra}]'")
    module, _, cls = info.target.partition(":")
    return getattr(importlib.import_module(module), cls)()
