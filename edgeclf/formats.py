"""Every artifact format, as plain data: the one table export, runtime, doctor and serve read.

A format is what export builds and records in ``bundle.json["artifacts"]``: its file, its
precision, the runtime backend that runs it (and so validates it: export checks each
artifact through the same backend the Predictor uses), the modules and extra its builder
needs, the format it is converted from, and the Triton backend that serves it.

Some formats also run in another precision chosen at run time (the FP32 OpenVINO IR in
BF16 on AMX or AVX512_BF16 CPUs). Such a run is an *entry* of its own, named ``FORMAT-PRECISION``
("openvino-bf16"): numerics differ, so it is validated (export on such a CPU, ``edgeclf
verify`` on the device) before ``auto`` may pick it.

Nothing here imports a heavy library: the CLI lists formats without TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeclf.errors import InvalidInputError


@dataclass(frozen=True)
class Format:
    name: str
    filename: str  # the entry file; an OpenVINO IR has its .bin beside it
    precision: str  # "fp32", "fp16" or "int8": what the file holds
    #: The runtime backend (edgeclf.runtime.backends) that runs and validates it.
    backend: str
    #: Modules the builder imports ("a|b": either) and the extra installing them.
    build_modules: tuple[str, ...]
    extra: str
    #: The format it is converted from (built first if not asked for); None: from Keras.
    source: str | None = None
    #: Whether its builder calibrates INT8 ranges on training images.
    calibrated: bool = False
    #: Precisions it can also run in, chosen at run time (each one an entry FORMAT-PRECISION).
    run_time_precisions: tuple[str, ...] = ()
    #: Served by Triton (serve/repository.py) through ``backend``'s Triton counterpart.
    triton: bool = False


_ONNX = ("tf2onnx", "onnx", "onnxruntime")
_TFLITE = ("tensorflow", "ai_edge_litert")
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx", "model.onnx", "fp32", "onnxruntime", _ONNX, "export", triton=True),
        Format("onnx-fp16", "model.fp16.onnx", "fp16", "onnxruntime", _ONNX + ("onnxconverter_common",), "export",
               source="onnx"),
        Format("onnx-int8", "model.int8.onnx", "int8", "onnxruntime", _ONNX, "export", source="onnx",
               calibrated=True),
        Format("openvino", "model.openvino.xml", "fp32", "openvino", _ONNX + ("openvino",), "openvino",
               source="onnx", run_time_precisions=("bf16",), triton=True),
        Format("openvino-int8", "model.int8.openvino.xml", "int8", "openvino", _ONNX + ("openvino", "nncf"),
               "openvino-int8", source="onnx", calibrated=True),
        Format("tensorrt", "model.fp16.engine", "fp16", "tensorrt", ("onnx", "tensorrt|tensorrt_rtx"), "rtx",
               source="onnx-fp16", triton=True),
        Format("tensorrt-int8", "model.int8.engine", "int8", "tensorrt", _ONNX + ("tensorrt|tensorrt_rtx",), "rtx",
               source="onnx", calibrated=True),
        Format("tflite", "model.tflite", "fp32", "tflite", _TFLITE, "tflite"),
        Format("tflite-fp16", "model.fp16.tflite", "fp16", "tflite", _TFLITE, "tflite"),
        # The INT8 gate's decided margin is derived on the FP32 ONNX (export.int8_gate): the ONNX stack too.
        Format("tflite-int8", "model.int8.tflite", "int8", "tflite", _TFLITE + _ONNX, "export,tflite",
               calibrated=True),
    )
}


def entry_name(fmt: str, precision_hint: str | None) -> str:
    """"openvino" + "bf16" -> "openvino-bf16"; a format run as built keeps its name."""
    return f"{fmt}-{precision_hint}" if precision_hint else fmt


def entries(fmt: str) -> list[tuple[str, str | None]]:
    """(entry name, precision hint) for each way ``fmt`` runs: as built, then each run-time precision."""
    return [(fmt, None)] + [(entry_name(fmt, p), p) for p in FORMATS[fmt].run_time_precisions]


def parse_formats(text: str | list[str]) -> list[Format]:
    """"onnx-int8,openvino" or "all" -> formats in build order, with what they are made from."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip().lower() for n in names if n.strip()]
    if names == ["all"]:
        return list(FORMATS.values())
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise InvalidInputError(
            f"unknown export format(s) {unknown or names}; expected a comma-separated list of "
            f"{list(FORMATS)} or 'all'. Received: {text!r}"
        )
    return with_sources([f for f in FORMATS.values() if f.name in names])


def with_sources(formats: list[Format]) -> list[Format]:
    """``formats`` plus every format they are converted from, in build order."""
    needed = {f.name for f in formats}
    for fmt in formats:
        source = fmt.source
        while source is not None:
            needed.add(source)
            source = FORMATS[source].source
    return [f for f in FORMATS.values() if f.name in needed]
