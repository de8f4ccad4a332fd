"""Each format's builder for ``export_bundle``: one method per format, sharing what one export run
has drawn (the model, calibration and tuning images, the LiteRT serving model, the staging folder).

A builder takes (output path, path of the artifact it is converted from, or None) and returns
None or the :class:`RecordFields` that join its artifact's record (the INT8 search's report).
Adding a format: its :class:`edgeclf.formats.Format` entry, a method here named after it, its
runtime backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from edgeclf.bundle import Bundle
from edgeclf.export.int8_gate import MarginRule
from edgeclf.progress import log
from edgeclf.runtime.hardware import detect
from edgeclf.runtime.verifier import check_entry
from edgeclf.verification import VerificationSet

if TYPE_CHECKING:
    from edgeclf.export.exporter import ExportOptions
    from edgeclf.export.tflite import ServingSavedModel


#: Calibration images an INT8 artifact's embedding offset is the mean over. On the 299 px bench model
#: what INT8 leaves after the offset is 0.035 of a channel's spread, so 100 pin the offset to 0.004
#: of it: its familiarity decisions agreed with Keras' on 99.77% of 432 held-out images from 50, 100
#: or 300 images alike.
OFFSET_IMAGES = 100


class RecordFields(dict):
    """Fields a builder adds to its artifact's bundle.json record."""


@dataclass
class TrainingSide:
    """The training-side images INT8 is made with, kept apart from the verification set:
    ``calibration`` (uint8 images the activation ranges come from) and ``tuning`` (other
    training images with their Keras logits, which the searches judge candidates on and the
    gate's decided margin is derived on)."""

    calibration: np.ndarray | None
    tuning: VerificationSet | None
    margin: dict[str, Any] | None = None  # the decided-margin record, derived on first use
    #: Keras' embedding of :attr:`offset_images`, made on first use (:meth:`keras_embedding`).
    offset_embedding: np.ndarray | None = None

    @property
    def offset_images(self) -> np.ndarray:
        """The calibration images an INT8 artifact's embedding offset is measured on (OFFSET_IMAGES)."""
        return self.calibration[:OFFSET_IMAGES]

    def keras_embedding(self, model) -> np.ndarray:
        """The embedding ``model`` ([logits, embedding]) gives :attr:`offset_images`, computed once."""
        if self.offset_embedding is None:
            from edgeclf.export.trust_fit import keras_outputs

            self.offset_embedding = keras_outputs(model, self.offset_images)[1]
        return self.offset_embedding

    def decided_margin(self, onnx_fp32: Path, rule: MarginRule) -> dict[str, Any]:
        """The gate's decided margin, derived once (from the FP32 ONNX ``onnx_fp32``) and recorded."""
        from edgeclf.export.int8_gate import derive_margin

        if self.margin is None:
            self.margin = derive_margin(onnx_fp32, self.tuning.images, self.tuning.logits, rule)
            how = (f"the floor; {rule.scale:g} x emulated BF16's shift gave {self.margin['from_bf16']:.3g}"
                   if self.margin.get("floored") else self.margin["derived_from"].split(" (")[0])
            log(f"INT8 gate: decided images have a Keras logit margin >= {self.margin['margin']:.3g} "
                f"({self.margin['decided_share']:.0%} of {len(self.tuning)} tuning images; {how})")
        return self.margin


class Builders:
    """The builders of one export run; ``builders["onnx-int8"]`` is the one for that format.

    ``model`` gives [logits, embedding] (:func:`edgeclf.train.model.embedding_model`).
    """

    def __init__(self, model, bundle: Bundle, options: ExportOptions, side: TrainingSide,
                 reference: VerificationSet, serving: ServingSavedModel, stage: Path) -> None:
        self.model, self.bundle, self.options, self.side = model, bundle, options, side
        self.reference, self.serving, self.stage = reference, serving, stage
        self._rankings: dict[Path | None, Any] = {}  # one LayerRanking per FP32 ONNX: both INT8 searches share it
        self._first_method = options.calibration_method or "minmax"  # the ranking's and TensorRT QDQ's calibrator
        self._cpu_class = options.int8_class(detect())
        self._reduce_range = self._cpu_class == "avx2"

    def __getitem__(self, name: str) -> Callable[[Path, Path | None], RecordFields | None]:
        return getattr(self, name.replace("-", "_"))

    # -- FP32 and FP16 ----------------------------------------------------------------------

    def onnx(self, out: Path, src: None) -> None:
        from edgeclf.export.onnx_fp32 import keras_to_onnx

        keras_to_onnx(self.model, self.bundle, out, self.options.opset)

    def onnx_fp16(self, out: Path, src: Path) -> None:
        from edgeclf.export.onnx_fp16 import onnx_to_fp16

        onnx_to_fp16(src, out)

    def openvino(self, out: Path, src: Path) -> None:
        from edgeclf.export.openvino_ir import onnx_to_openvino

        onnx_to_openvino(src, out)

    def tensorrt(self, out: Path, src: Path) -> None:
        from edgeclf.export.metadata import artifact_metadata
        from edgeclf.export.tensorrt_engine import onnx_to_engine

        onnx_to_engine(src, out, artifact_metadata(self.bundle, "fp16"), self.options.engine)

    def tflite(self, out: Path, src: None) -> None:
        from edgeclf.export.tflite import keras_to_tflite

        keras_to_tflite(self.model, self.bundle, out, "fp32", source=self.serving)

    def tflite_fp16(self, out: Path, src: None) -> None:
        from edgeclf.export.tflite import keras_to_tflite

        keras_to_tflite(self.model, self.bundle, out, "fp16", source=self.serving)

    # -- INT8 -------------------------------------------------------------------------------

    def onnx_int8(self, out: Path, src: Path) -> RecordFields:
        from edgeclf.export.int8_search import qdq_quantizer

        quantizer = qdq_quantizer(self.side.calibration, self.options.calibration_method, self._reduce_range)
        return self._searched(quantizer, out, src)

    def openvino_int8(self, out: Path, src: Path) -> RecordFields:
        from edgeclf.export.int8_search import nncf_quantizer

        return self._searched(nncf_quantizer(self.side.calibration, self._reduce_range), out, src)

    def tflite_int8(self, out: Path, src: None) -> RecordFields:
        from edgeclf.export.int8_search import litert_quantizer
        from edgeclf.export.tflite_int8 import LiteRTInt8

        # Calibrates once; also ranks LiteRT's layers.
        litert = LiteRTInt8(self.model, self.bundle, self.side.calibration, source=self.serving)
        return self._searched(litert_quantizer(litert), out, None, litert)

    def tensorrt_int8(self, out: Path, src: Path) -> RecordFields:
        from edgeclf.export.int8_search import figures_of
        from edgeclf.export.metadata import artifact_metadata
        from edgeclf.export.tensorrt_engine import onnx_to_int8_engine

        calibration = self.side.calibration
        _, qdq = onnx_to_int8_engine(src, out, calibration, self._first_method,
                                     artifact_metadata(self.bundle, "int8"), self.options.engine)
        try:  # what the engine's quantization costs, as far as a CPU can tell: its QDQ graph on ONNX Runtime
            on_cpu = figures_of(check_entry(qdq, "onnxruntime", None, self.reference, self.bundle.labels,
                                            self.options.int8_target.tolerance()))
        finally:
            qdq.unlink(missing_ok=True)
        note = ("the QDQ graph the engine was built from, run by ONNX Runtime on the CPU; the engine itself "
                "is validated only by a run on an NVIDIA GPU")
        if detect().int8_saturates:
            # Measured on the main job's model: 0.56 agreement here, where the 7-bit CPU artifact reaches 0.98.
            note += ("; this CPU has no VNNI, so ONNX Runtime sums pairs of 8-bit products in 16 bits and "
                     "saturates on these full-range weights: a lower bound, not what a GPU computes")
        return RecordFields(
            calibration={"images": len(calibration), "method": self._first_method, "reduce_range": False},
            quantization={"layout": "QDQ, int8 symmetric activations, int8 per-channel weights, float biases",
                          "qdq_graph_on_onnxruntime": on_cpu, "note": note})

    def _searched(self, quantizer, out: Path, src: Path | None, ranking=None) -> RecordFields:
        """The accuracy-aware INT8 search's artifact, judged on the tuning images against the decided margin."""
        from edgeclf.export.int8_search import LayerRanking, quantize_to_target

        side, options = self.side, self.options
        ranking = ranking or self._rankings.setdefault(
            src, LayerRanking(src, side.calibration, self._first_method, self._reduce_range))
        margin = side.decided_margin(self._fp32_onnx(src), options.decided)
        report = quantize_to_target(quantizer, src, out, ranking, side.tuning, self.bundle.labels,
                                    options.int8_target, margin["margin"])
        report["decided"] = margin
        fields = RecordFields(quantization=report, calibration={
            "images": len(side.calibration), **quantizer.calibration_record(report["calibration"])})
        if quantizer.backend != "tflite":  # LiteRT picks its own weight range, whatever the CPU
            fields["int8_cpu_class"] = self._cpu_class
        return fields

    def _fp32_onnx(self, src: Path | None) -> Path:
        """An FP32 ONNX to derive the margin from: ``src``, else one made in the staging folder."""
        if src is not None:
            return src
        made = self.stage / "margin.fp32.onnx"
        if not made.exists():
            self.onnx(made, None)
        return made
