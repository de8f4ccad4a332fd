"""The export formats, as plain data (no heavy imports): name, file, precision, needs.

The CLI lists these in its help without importing TensorFlow; ``exporter`` maps each
name to its builder.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeclf.errors import InvalidInputError


@dataclass(frozen=True)
class ExportFormat:
    name: str
    filename: str  # the entry file; an OpenVINO IR has its .bin beside it
    precision: str
    #: Python modules the builder and its validation import ("a|b": either), and the
    #: extra installing them.
    modules: tuple[str, ...]
    extra: str
    #: The format this one is converted from (built first if not asked for).
    source: str | None
    #: What runs it for validation: "onnxruntime", "openvino", "litert" or "tensorrt".
    runtime: str


_ONNX = ("tf2onnx", "onnx", "onnxruntime")
FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("onnx", "model.onnx", "fp32", _ONNX, "export", None, "onnxruntime"),
        ExportFormat("onnx-fp16", "model.fp16.onnx", "fp16", _ONNX + ("onnxconverter_common",), "export",
                     "onnx", "onnxruntime"),
        ExportFormat("onnx-int8", "model.int8.onnx", "int8", _ONNX, "export", "onnx", "onnxruntime"),
        ExportFormat("openvino", "model.openvino.xml", "fp32", _ONNX + ("openvino",), "openvino",
                     "onnx", "openvino"),
        ExportFormat("openvino-int8", "model.int8.openvino.xml", "int8", _ONNX + ("openvino",), "openvino",
                     "onnx-int8", "openvino"),
        ExportFormat("tensorrt", "model.fp16.engine", "fp16", ("onnx", "tensorrt|tensorrt_rtx"), "rtx",
                     "onnx-fp16", "tensorrt"),
        ExportFormat("tflite", "model.tflite", "fp32", ("tensorflow", "ai_edge_litert"), "tflite", None, "litert"),
        ExportFormat("tflite-fp16", "model.fp16.tflite", "fp16", ("tensorflow", "ai_edge_litert"), "tflite",
                     None, "litert"),
        ExportFormat("tflite-int8", "model.int8.tflite", "int8", ("tensorflow", "ai_edge_litert"), "tflite",
                     None, "litert"),
    )
}


def parse_formats(text: str | list[str]) -> list[ExportFormat]:
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


def with_sources(formats: list[ExportFormat]) -> list[ExportFormat]:
    """``formats`` plus every format they are converted from, in build order."""
    needed = {f.name for f in formats}
    for fmt in formats:
        source = fmt.source
        while source is not None:
            needed.add(source)
            source = FORMATS[source].source
    return [f for f in FORMATS.values() if f.name in needed]
