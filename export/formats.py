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
    filename: str
    precision: str
    #: Python modules the builder and its validation import, and the extra installing them.
    modules: tuple[str, ...]
    extra: str


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("onnx", "model.onnx", "fp32", ("tf2onnx", "onnx", "onnxruntime"), "export"),
        ExportFormat("onnx-fp16", "model.fp16.onnx", "fp16",
                     ("tf2onnx", "onnx", "onnxconverter_common", "onnxruntime"), "export"),
        ExportFormat("onnx-int8", "model.int8.onnx", "int8", ("tf2onnx", "onnx", "onnxruntime"), "export"),
    )
}


def parse_formats(text: str | list[str]) -> list[ExportFormat]:
    """"onnx,onnx-int8" or "all" -> formats in build order (FP32 ONNX first)."""
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
    return [f for f in FORMATS.values() if f.name in names]
