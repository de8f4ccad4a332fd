"""Native TensorRT engines (``tensorrt`` or ``tensorrt_rtx``) on an NVIDIA GPU.

Device buffers are allocated once for the engine's largest batch with cuda-python; a
call copies the batch in, runs the engine on the backend's own stream and copies the
logits out. The engine header is checked before TensorRT sees the plan, so an engine
built for another TensorRT version or GPU is refused with a message saying which.
"""

from __future__ import annotations

import importlib
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.engine_file import check_engine_compatible, read_engine
from edgeclf.errors import BackendUnavailableError, IncompatibleArtifactError, InvalidInputError
from edgeclf.gpu import local_compute_capability
from edgeclf.runtime.backends.base import BackendOptions


def tensorrt_module() -> tuple[Any, str]:
    """(module, flavour): ``tensorrt`` where installed, else ``tensorrt_rtx``."""
    for name, flavour in (("tensorrt", "tensorrt"), ("tensorrt_rtx", "tensorrt-rtx")):
        try:
            return importlib.import_module(name), flavour
        except ImportError:
            continue
    raise BackendUnavailableError("TensorRT engines need tensorrt (pip install 'edgeclf[gpu]') or tensorrt_rtx "
                                  "(pip install 'edgeclf[rtx]'); neither is installed")


def rtx_targets(trt) -> dict[str, Any]:
    """The compute capabilities ("8.6") this TensorRT-RTX builds for -> its ``ComputeCapability`` member,
    read from the module (``SM86`` -> "8.6"), so a newer release's targets need no change here."""
    found = {}
    for name in dir(trt.ComputeCapability):
        match = re.fullmatch(r"SM(\d+)(\d)", name)
        if match:
            found[f"{match[1]}.{match[2]}"] = getattr(trt.ComputeCapability, name)
    return dict(sorted(found.items(), key=lambda kv: tuple(int(p) for p in kv[0].split("."))))


def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise BackendUnavailableError("the TensorRT backend needs cuda-python for device buffers: "
                                          "pip install 'edgeclf[gpu]'") from None
    return runtime


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self) -> None:
        self.metadata: dict[str, Any] = {}
        self.max_batch: int | None = None
        self._lock = threading.Lock()  # one execution context: calls take turns
        self._buffers: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        self._cuda = None
        self._stream = None
        self._flavour = ""
        self.graph: dict[str, Any] = {}  # output names: the Predictor reads the embedding where there is one

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self._cuda.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA call failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    def load(self, path: Path, options: BackendOptions) -> None:
        trt, self._flavour = tensorrt_module()
        header, plan = read_engine(path)
        check_engine_compatible(header, self._flavour, trt.__version__, None)  # the library first: no GPU needed
        here = local_compute_capability()
        if here is None:
            raise IncompatibleArtifactError(f"{path} is a TensorRT engine and needs an NVIDIA GPU; none was found "
                                            f"here. Use an ONNX, OpenVINO or TFLite artifact on this machine")
        check_engine_compatible(header, self._flavour, trt.__version__, here)
        self.metadata = header
        self._cuda = _cudart()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise IncompatibleArtifactError(f"{self._flavour} {trt.__version__} could not deserialize {path}")
        self._context = self._engine.create_execution_context()
        self.max_batch = int(header["profile"]["max"][0])
        self._stream = self._check(self._cuda.cudaStreamCreate())
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = (self.max_batch, *tuple(self._engine.get_tensor_shape(name))[1:])
            pointer = self._check(self._cuda.cudaMalloc(int(np.prod(shape)) * dtype.itemsize))
            self._buffers[name] = (pointer, dtype, shape)
            self._context.set_tensor_address(name, pointer)
        self.graph = {"outputs": sorted(name for name in self._buffers if name != "pixels")}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)["logits"]

    def run(self, batch: np.ndarray, outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]:
        """The named outputs for a uint8 NHWC ``batch`` (export validation also reads ``label``)."""
        if len(batch) > self.max_batch:
            raise InvalidInputError(f"batch of {len(batch)} exceeds the engine's profile maximum {self.max_batch}")
        cuda = self._cuda
        batch = np.ascontiguousarray(batch)
        with self._lock:
            self._context.set_input_shape("pixels", batch.shape)
            self._check(cuda.cudaMemcpyAsync(self._buffers["pixels"][0], batch.ctypes.data, batch.nbytes,
                                             cuda.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
            if not self._context.execute_async_v3(self._stream):
                raise RuntimeError("TensorRT execution failed")
            results = {}
            for name in outputs:
                pointer, dtype, shape = self._buffers[name]
                results[name] = np.empty((len(batch), *shape[1:]), dtype)
                self._check(cuda.cudaMemcpyAsync(results[name].ctypes.data, pointer, results[name].nbytes,
                                                 cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
            self._check(cuda.cudaStreamSynchronize(self._stream))
        return results

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "flavour": self._flavour, "max_batch": self.max_batch,
                "gpu_compute_capability": local_compute_capability()}

    def close(self) -> None:
        if self._cuda is not None:
            for pointer, _, _ in self._buffers.values():
                self._cuda.cudaFree(pointer)
            if self._stream is not None:
                self._cuda.cudaStreamDestroy(self._stream)
        self._buffers, self._stream = {}, None
