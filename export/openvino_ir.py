"""ONNX -> OpenVINO IR (``.xml`` graph + ``.bin`` weights).

The device runs IRs rather than the ONNX files: an IR is OpenVINO's own format, so a
device skips the ONNX front end at every start, and it carries edgeclf's metadata in
its ``rt_info``. Two IRs cover the three precisions:

- ``model.openvino.xml`` from the FP32 ONNX, kept in FP32 (no weight compression). On
  CPUs with AMX or AVX512_BF16, OpenVINO runs it in BF16 with the ``INFERENCE_PRECISION_HINT=bf16``
  property: BF16 is a run-time choice on the same file, not another artifact.
- ``model.int8.openvino.xml`` quantized by NNCF, OpenVINO's own post-training quantizer,
  from the FP32 model (its ranges and bias correction suit OpenVINO's INT8 kernels better
  than a QDQ ONNX made for ONNX Runtime; see :func:`onnx_to_openvino_int8`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeclf.errors import ConversionError
from edgeclf.export.metadata import read_onnx_metadata
from edgeclf.runtime.metadata import read_openvino_metadata  # noqa: F401  (re-exported)


def ir_files(xml: Path) -> list[Path]:
    """The files of one IR: the graph and the weights beside it (same stem)."""
    return [xml, xml.with_suffix(".bin")]


def _convert(src: Path):
    """The ONNX model ``src`` as an OpenVINO model."""
    import openvino as ov

    try:
        return ov.convert_model(str(src))
    except Exception as exc:
        raise ConversionError(f"OpenVINO could not convert {src.name}: {exc}") from exc


def _save(model, src: Path, out: Path, updates: dict | None = None) -> None:
    """Write ``model`` to the IR ``out`` with ``src``'s edgeclf metadata (and ``updates`` to
    it), atomically.

    The .bin is moved into place before the .xml, so the entry file never names
    weights that are not complete.
    """
    import onnx
    import openvino as ov

    meta = read_onnx_metadata(onnx.load(str(src), load_external_data=False)) | (updates or {})
    for key, value in meta.items():
        model.set_rt_info(json.dumps(value), ["edgeclf", key])
    stage = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", dir=out.parent))
    try:
        staged = stage / out.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        for final, tmp in reversed(list(zip(ir_files(out), ir_files(staged), strict=True))):
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def onnx_to_openvino(src: Path, out: Path) -> None:
    """Convert the ONNX model ``src`` to the IR ``out`` (.xml, with its .bin), atomically."""
    _save(_convert(src), src, out)


def _ops_of(model, src: Path, nodes: Sequence[str]) -> list[str]:
    """The friendly names of the OpenVINO operations that the ONNX nodes ``nodes`` of
    ``src`` became in ``model``.

    Matched by name (a convolution ``X`` with a bias becomes ``X/WithoutBiases`` and an Add
    ``X``) and by output tensor: an operation that fused a node keeps its output's
    name, though not its own (a depthwise convolution followed by a batch-norm Mul becomes one
    GroupConvolution named after the Mul). Without the second, the ignored scope missed
    every depthwise convolution of MobileNet.
    """
    import onnx

    if not nodes:
        return []
    wanted = set(nodes)
    graph = onnx.load(str(src), load_external_data=False).graph
    tensors = {name for node in graph.node if node.name in wanted for name in node.output}
    names = wanted | {f"{node}/WithoutBiases" for node in wanted}
    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_friendly_name() in names or any(o.get_names() & tensors for o in op.outputs())]


def onnx_to_openvino_int8(src: Path, out: Path, calibration: np.ndarray, reduce_range: bool = True,
                          keep_fp32: Sequence[str] = (), bias_correction: bool = True) -> None:
    """Quantize the FP32 ONNX model ``src`` with NNCF into the INT8 IR ``out``.

    Args:
        calibration: NHWC float32 images (0..255) NNCF collects activation ranges on;
            all of them are used (``subset_size``).
        reduce_range: quantize every layer's weights to 7 bits (NNCF's overflow fix on
            all layers), for CPUs without VNNI: they sum pairs of u8 x s8 products in int16
            (VPMADDUBSW), which saturates with 8-bit weights. Otherwise NNCF's default, the
            fix on the first layer only (its inputs are the unscaled pixels), for VNNI, AMX
            and ARM dot-product CPUs, where 7-bit weights only cost accuracy.
        keep_fp32: ONNX node names to leave in FP32 (the accuracy-aware search picks
            them); :func:`_ops_of` finds the OpenVINO operations they became.
        bias_correction: NNCF's full bias correction (the search tries both; see
            :func:`edgeclf.export.int8_search.nncf_quantizer`).
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    # Its progress bars stay; its INFO lines (each ignored node, per search trial) repeat what our log says.
    nncf.set_log_level(logging.WARNING)
    model = _convert(src)
    ignored = _ops_of(model, src, keep_fp32)
    # Activation ranges from the global min and max of the calibration images, as ONNX Runtime's
    # min-max takes them: NNCF's default (the mean of each image's min and max) clips the images
    # with the largest activations. On the main job's model it moved their logits by up to 58.6
    # (Keras logits up to 93; 99th percentile of the top-1 margin shift 103), against 1.9 (2.6).
    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.ENABLE if reduce_range else OverflowFix.FIRST_LAYER,
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
        disable_bias_correction=not bias_correction)
    try:
        # Full bias correction, not NNCF's default fast one: on the main job's model (AMD Zen 5, 500
        # tuning images) fast bias correction left agreement with Keras at 0.964 (0.985 on decided
        # images), the full one 0.996 (1.000); the mixed preset was no better than performance.
        quantized = nncf.quantize(
            model, nncf.Dataset(calibration, lambda image: image[None]), subset_size=len(calibration),
            fast_bias_correction=False,
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False), advanced_parameters=advanced)
    except Exception as exc:
        raise ConversionError(f"NNCF could not quantize {src.name} for OpenVINO: {exc}") from exc
    _save(quantized, src, out, {
        "precision": "int8",
        "calibration": {"images": int(len(calibration)), "method": "nncf (global min-max activation ranges, "
                        f"{'bias correction' if bias_correction else 'no bias correction'})"},
        "quantization": {"tool": "nncf", "weights": f"int8 per-channel{', 7-bit range' if reduce_range else ''}",
                         "kept_fp32": list(keep_fp32)}})
