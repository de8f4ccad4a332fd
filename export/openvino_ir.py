"""ONNX -> OpenVINO IR (``.xml`` graph + ``.bin`` weights).

The device runs IRs rather than the ONNX files: an IR is OpenVINO's own format, so a
device skips the ONNX front end at every start, and it carries edgeclf's metadata in
its ``rt_info``. Two IRs cover the three precisions:

- ``model.openvino.xml`` from the FP32 ONNX, kept in FP32 (no weight compression). On
  CPUs with AMX, OpenVINO runs it in BF16 with the ``INFERENCE_PRECISION_HINT=bf16``
  property: BF16 is a run-time choice on the same file, not another artifact.
- ``model.int8.openvino.xml`` from the QDQ INT8 ONNX, which OpenVINO executes as INT8.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from edgeclf.errors import ConversionError
from edgeclf.export.metadata import read_onnx_metadata
from edgeclf.runtime.metadata import read_openvino_metadata  # noqa: F401  (re-exported)


def ir_files(xml: Path) -> list[Path]:
    """The files of one IR: the graph and the weights beside it (same stem)."""
    return [xml, xml.with_suffix(".bin")]


def onnx_to_openvino(src: Path, out: Path) -> None:
    """Convert the ONNX model ``src`` to the IR ``out`` (.xml, with its .bin), atomically.

    The .bin is moved into place before the .xml, so the entry file never names
    weights that are not complete.
    """
    import onnx
    import openvino as ov

    try:
        model = ov.convert_model(str(src))
    except Exception as exc:
        raise ConversionError(f"OpenVINO could not convert {src.name}: {exc}") from exc
    for key, value in read_onnx_metadata(onnx.load(str(src), load_external_data=False)).items():
        model.set_rt_info(json.dumps(value), ["edgeclf", key])
    stage = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", dir=out.parent))
    try:
        staged = stage / out.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        for final, tmp in reversed(list(zip(ir_files(out), ir_files(staged)))):
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
