"""ONNX -> TensorRT engine, with ``tensorrt`` or ``tensorrt_rtx``: FP16 from the FP16 ONNX,
INT8 from a QDQ ONNX (explicit quantization).

Only the API the two modules share is used. The network is *strongly typed*: the
engine computes in the types the ONNX already has (TensorRT-RTX builds nothing
else, and for ``tensorrt`` it is the way to get exactly the validated graph rather
than letting the builder choose per layer). ``tensorrt`` needs a GPU and builds for it;
``tensorrt_rtx`` builds ahead of time without one, for the compute capabilities asked
for, and compiles kernels just in time on the device. The engine file is written by
:mod:`edgeclf.engine_file` with a JSON header in front of the plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeclf.engine_file import write_engine
from edgeclf.errors import ConversionError, IncompatibleArtifactError, InvalidInputError
from edgeclf.fsio import atomic_write_bytes, sha256_file
from edgeclf.gpu import local_compute_capability, local_gpu
from edgeclf.progress import log
from edgeclf.runtime.backends.tensorrt import rtx_targets, tensorrt_module

#: TensorRT-RTX compiles no FP32 matrix product for Turing (SM75: "FP32 GEMM is not
#: supported"), and an INT8 engine keeps the layers that are not quantized in FP32; so
#: without a GPU to build for, an INT8 engine targets Ampere and newer.
INT8_FIRST_TARGET = "8.0"


@dataclass(frozen=True)
class EngineOptions:
    #: (min, opt, max) batch of the one optimisation profile.
    batch_profile: tuple[int, int, int] = (1, 8, 32)
    workspace_mib: int = 1024
    #: Compute capabilities ("8.6") to build for; None: this GPU, or without one (only
    #: tensorrt_rtx can build then) every capability TensorRT-RTX supports.
    compute_capabilities: tuple[str, ...] | None = None
    #: Timing cache file (``tensorrt`` only; TensorRT-RTX times nothing at build time).
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        low, opt, high = self.batch_profile
        if not 1 <= low <= opt <= high:
            raise InvalidInputError(f"batch profile must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX. "
                                    f"Received: {self.batch_profile}")
        if self.workspace_mib < 1:
            raise InvalidInputError(f"workspace must be >= 1 MiB. Received: {self.workspace_mib}")


def default_timing_cache(flavour: str, version: str) -> Path:
    """A per-user cache shared by every bundle: tactic timings do not depend on the model."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "edgeclf" / f"{flavour}-{version}.timing-cache"


def engine_targets(wanted: tuple[str, ...] | None = None, precision: str = "fp16") -> list[str]:
    """The compute capabilities an engine is built for with the TensorRT flavour installed.

    ``tensorrt`` builds for the GPU it runs on; ``tensorrt_rtx`` for ``wanted``, else this
    GPU, else (no GPU) every capability it supports.

    Raises:
        BackendUnavailableError: no TensorRT flavour is installed.
        ConversionError: full TensorRT and no GPU here.
        IncompatibleArtifactError: TensorRT-RTX and a GPU it builds nothing for (a V100, H100, B200).
        InvalidInputError: ``wanted`` names capabilities the flavour cannot build for.
    """
    trt, flavour = tensorrt_module()
    gpu = local_gpu()
    here = gpu.compute_capability if gpu else None
    if flavour == "tensorrt":
        if here is None:
            raise ConversionError("tensorrt builds engines only on a GPU, and none was found here; "
                                  "use tensorrt_rtx (pip install 'edgeclf[rtx]') to build ahead of time")
        if wanted is not None and list(wanted) != [here]:
            raise InvalidInputError(f"tensorrt builds only for the GPU it runs on ({here}). "
                                    f"Received compute capabilities: {list(wanted)}")
        return [here]
    supported = list(rtx_targets(trt))
    if wanted is not None:
        unknown = [cc for cc in wanted if cc not in supported]
        if unknown:
            raise InvalidInputError(f"unknown compute capability {unknown}; TensorRT-RTX {trt.__version__} builds "
                                    f"for {supported}. Received: {list(wanted)}")
        return list(wanted)
    if here is not None:
        if here not in supported:
            raise IncompatibleArtifactError(
                f"TensorRT-RTX {trt.__version__} builds engines for compute capabilities {supported}; this "
                f"machine's GPU ({gpu.name}) is {here}. Install full TensorRT to build for it "
                f"(pip install 'edgeclf[gpu]'), or build on a machine without a GPU for the others")
        return [here]
    first = supported.index(INT8_FIRST_TARGET) if precision == "int8" and INT8_FIRST_TARGET in supported else 0
    return supported[first:]


def _logger(trt):
    class ErrorLogger(trt.ILogger):
        """Keeps the builder's errors for the ConversionError; drops its chatter."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)

    return ErrorLogger()


def onnx_to_engine(src: Path, out: Path, meta: dict[str, Any], options: EngineOptions) -> dict[str, Any]:
    """Build a TensorRT engine from the FP16 or QDQ INT8 ONNX ``src`` and write it with its
    header to ``out``.

    Args:
        meta: the artifact's self-description (labels, input spec, precision...), put in the header.

    Returns:
        The header as written.

    Raises:
        ConversionError: the ONNX parser or the builder failed (carries their messages).
    """
    trt, flavour = tensorrt_module()
    precision = meta.get("precision", "fp16")
    targets = engine_targets(options.compute_capabilities, precision)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise ConversionError(f"the TensorRT ONNX parser rejected {src.name}: {'; '.join(errors or logger.errors)}")

    pixels = network.get_input(0)
    _, height, width, channels = pixels.shape
    low, opt, high = options.batch_profile
    profile = builder.create_optimization_profile()
    profile.set_shape(pixels.name, (low, height, width, channels), (opt, height, width, channels),
                      (high, height, width, channels))
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    timing_cache = None
    if flavour == "tensorrt":
        timing_cache = options.timing_cache or default_timing_cache(flavour, trt.__version__)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    else:
        members = rtx_targets(trt)
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            config.set_compute_capability(members[cc], i)

    log(f"building a {flavour} {trt.__version__} {precision.upper()} engine for compute capability "
        f"{', '.join(targets)}, "
        f"batch {low}..{high} (opt {opt})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ConversionError(f"the {flavour} builder failed on {src.name}: {'; '.join(logger.errors) or 'no message'}")
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))

    io = []
    for i in range(network.num_inputs):
        io.append({"name": network.get_input(i).name, "mode": "input", "dtype": network.get_input(i).dtype.name,
                   "shape": list(network.get_input(i).shape)})
    for i in range(network.num_outputs):
        io.append({"name": network.get_output(i).name, "mode": "output",
                   "dtype": network.get_output(i).dtype.name, "shape": list(network.get_output(i).shape)})
    header = {
        **meta,
        "tensorrt": {"flavour": flavour, "version": trt.__version__, "strongly_typed": True},
        "target": {"compute_capabilities": targets, "built_on_gpu": local_compute_capability()},
        "onnx_file": src.name,
        "onnx_sha256": sha256_file(src),
        "profile": {"input": pixels.name, "min": [low, height, width, channels],
                    "opt": [opt, height, width, channels], "max": [high, height, width, channels]},
        "workspace_bytes": options.workspace_mib << 20,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "io": io,
    }
    return write_engine(out, header, bytes(plan))


def header_record(header: dict[str, Any]) -> dict[str, Any]:
    """What bundle.json records of an engine from its header: TensorRT, targets, profile, source ONNX."""
    return {"tensorrt": header["tensorrt"], "target": header["target"], "profile": header["profile"],
            "source_sha256": header["onnx_sha256"]}


def onnx_to_int8_engine(src: Path, out: Path, calibration, method: str, meta: dict[str, Any],
                        options: EngineOptions) -> tuple[dict[str, Any], Path]:
    """Quantize the FP32 ONNX ``src`` in TensorRT's QDQ layout and build an INT8 engine from it.

    Returns:
        The engine's header and the QDQ ONNX it was built from (beside ``out``; the caller
        checks it with ONNX Runtime and removes it).
    """
    from edgeclf.export.onnx_int8 import onnx_to_int8

    qdq = out.with_name(f".{out.stem}.qdq.onnx")
    # 8-bit weights: GPUs accumulate INT8 products in 32 bits, so nothing saturates.
    onnx_to_int8(src, qdq, calibration, method, reduce_range=False, for_tensorrt=True)
    return onnx_to_engine(qdq, out, meta, options), qdq
