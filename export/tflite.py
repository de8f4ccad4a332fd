"""Keras -> TFLite (LiteRT) for ARM devices: FP32, FP16 weights, and full-integer INT8.

INT8 is calibrated on a representative dataset of real training images: every compute
op (convolutions, pooling, concatenation, the dense layers) runs in INT8; only the
graph's edges stay as they are for every edgeclf artifact: uint8 pixels are cast and
quantized on the way in, logits dequantized to float32 on the way out, and the integer
label gathered from their argmax.

The serving function is written as a SavedModel with ``keras.export.ExportArchive``
first: converting the concrete function directly loses the Keras 3 variables (the
converter then emits a 350 kB graph without weights that returns NaN; checked).
edgeclf's metadata is one JSON entry named ``edgeclf`` in the flatbuffer's metadata
table, which interpreters ignore and :func:`read_tflite_metadata` reads back.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from pathlib import Path

import json
from typing import Any

import numpy as np

from edgeclf.bundle import Bundle
from edgeclf.errors import ConversionError, InvalidInputError
from edgeclf.export.metadata import artifact_metadata
from edgeclf.export.serving import serving_function
from edgeclf.fsio import atomic_write_bytes
from edgeclf.runtime.metadata import TFLITE_METADATA_NAME, read_tflite_metadata  # noqa: F401  (re-exported)



def embed_tflite_metadata(flatbuffer: bytes, meta: dict[str, Any]) -> bytes:
    """Return ``flatbuffer`` with ``meta`` (as JSON) added to its metadata table."""
    import flatbuffers
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = TFLITE_METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != TFLITE_METADATA_NAME.encode()] + [entry]
    builder = flatbuffers.Builder(len(flatbuffer) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


class ServingSavedModel:
    """The bundle's serving function (uint8 pixels in, logits and label out) as a SavedModel,
    written on first use under ``workdir`` and shared by every TFLite conversion of one export:
    writing it is most of a conversion's time (8 of 12 s for the fast tests' MobileNetV3-Small),
    and the FP32, FP16 and INT8 converters all start from the same graph.

    Use it as a context manager (or call :meth:`close`): that removes the SavedModel.
    """

    def __init__(self, model, bundle: Bundle, workdir: Path):
        self._model, self._bundle, self._workdir = model, bundle, Path(workdir)
        self._dir: Path | None = None

    def converter(self):
        """A fresh ``TFLiteConverter`` of the serving function (converters keep their settings)."""
        import tensorflow as tf

        if self._dir is None:
            import keras

            serve, spec = serving_function(self._model, self._bundle)
            archive = keras.export.ExportArchive()
            archive.track(self._model)
            archive.add_endpoint(name="serving_default", fn=serve, input_signature=[spec])
            written = Path(tempfile.mkdtemp(prefix=".tflite.", dir=self._workdir))
            try:
                archive.write_out(str(written / "saved_model"), verbose=False)
            except BaseException:
                shutil.rmtree(written, ignore_errors=True)  # the next call writes it again
                raise
            self._dir = written
        return tf.lite.TFLiteConverter.from_saved_model(str(self._dir / "saved_model"))

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "ServingSavedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serving_savedmodel(model, bundle: Bundle, workdir: Path, shared: ServingSavedModel | None = None):
    """A context giving ``shared`` as it is (its owner removes it), or else a SavedModel of its own
    under ``workdir``, removed when the block ends."""
    return contextlib.nullcontext(shared) if shared is not None else ServingSavedModel(model, bundle, workdir)


def representative_dataset(images: np.ndarray):
    """The converter's calibration feed: one image per step (the signature's batch is dynamic)."""
    return lambda: ({"pixels": images[i:i + 1]} for i in range(len(images)))


def write_tflite(flatbuffer: bytes, bundle: Bundle, out: Path, precision: str,
                 calibration_images: np.ndarray | None = None, kept_float: list[str] | None = None) -> None:
    """Write ``flatbuffer`` to ``out`` (atomically) with edgeclf's metadata embedded."""
    meta = artifact_metadata(bundle, precision)
    if precision == "int8":
        meta["calibration"] = {"images": len(calibration_images), "method": "minmax (TFLite converter)"}
        meta["quantization"] = {"activations": "int8", "weights": "int8 per-channel",
                                "edges": "uint8 pixels in; logits out in float32, or in INT8 with their scale and "
                                         "zero point where the converter quantized them (the runtime "
                                         "dequantizes them)", "kept_float": kept_float or []}
    atomic_write_bytes(out, embed_tflite_metadata(flatbuffer, meta))


def keras_to_tflite(model, bundle: Bundle, out: Path, precision: str = "fp32",
                    calibration_images: np.ndarray | None = None, source: ServingSavedModel | None = None) -> None:
    """Convert the bundle's Keras ``model`` to a ``.tflite`` file.

    Args:
        precision: "fp32", "fp16" (FP16 weights) or "int8" (full-integer).
        calibration_images: uint8 NHWC images for INT8's activation ranges.
        source: the serving SavedModel to convert from, shared with the run's other conversions;
            by default one is written next to ``out`` and removed.
    """
    import tensorflow as tf

    if precision == "int8" and (calibration_images is None or len(calibration_images) == 0):
        raise InvalidInputError("TFLite INT8 needs calibration images (uint8 NHWC); received none")

    try:
        with serving_savedmodel(model, bundle, out.parent, source) as serving:
            converter = serving.converter()
            if precision == "fp16":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            elif precision == "int8":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = representative_dataset(calibration_images)
                # Fail rather than silently keep a float op: "full-integer" must mean it.
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            with warnings.catch_warnings():
                # INT8 calibration runs the deprecated tf.lite.Interpreter internally.
                warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
                flatbuffer = converter.convert()
    except Exception as exc:
        raise ConversionError(f"the TFLite converter failed ({precision}): {exc}") from exc
    write_tflite(flatbuffer, bundle, out, precision, calibration_images)
