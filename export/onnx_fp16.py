"""ONNX FP32 -> FP16 with onnxconverter-common, inputs and outputs kept in their types."""

from __future__ import annotations

import warnings
from pathlib import Path

from edgeclf.errors import ConversionError
from edgeclf.export.metadata import read_onnx_metadata, set_onnx_metadata
from edgeclf.export.onnx_fp32 import preprocessing_nodes
from edgeclf.fsio import atomic_path

#: Ops left in FP32: ArgMax has no FP16 kernel in ONNX Runtime's CPU provider.
FP32_OPS = ["ArgMax"]


def onnx_to_fp16(src: Path, out: Path) -> None:
    """Write an FP16 copy of the FP32 ONNX model ``src`` to ``out``.

    ``pixels`` stays uint8 and ``logits`` float32 (``keep_io_types``); the preprocessing
    nodes and ArgMax stay FP32.
    """
    import onnx
    from onnxconverter_common import float16

    proto = onnx.load(str(src))
    try:
        with warnings.catch_warnings():
            # One warning per weight below FP16's smallest normal: expected, and many.
            warnings.simplefilter("ignore", UserWarning)
            half = float16.convert_float_to_float16(
                proto, keep_io_types=True, op_block_list=FP32_OPS,
                node_block_list=preprocessing_nodes(proto),
            )
    except Exception as exc:
        raise ConversionError(f"onnxconverter-common could not convert {src.name} to FP16: {exc}") from exc
    meta = read_onnx_metadata(proto)
    meta["precision"] = "fp16"
    set_onnx_metadata(half, meta)
    with atomic_path(out, suffix=".onnx") as tmp:
        onnx.save(half, str(tmp))
