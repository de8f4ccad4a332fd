"""LiteRT INT8 with chosen layers left in float: selective quantization through LiteRT's
quantization debugger.

The converter calibrates the model once (``calibrate only``); the debugger then quantizes
that calibrated model as often as the accuracy-aware search asks, each time with another
list of layers denylisted (kept in float, with quantize/dequantize around them). It also
ranks the layers: in its debug model every quantized op runs beside its float twin fed
the same INT8 inputs, so the error an op's own quantization adds is measured directly,
``||float - int8||^2 / ||float||^2`` at its output, on calibration images.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeclf.bundle import Bundle
from edgeclf.errors import ConversionError
from edgeclf.export.int8_layers import LayerError
from edgeclf.export.tflite import ServingSavedModel, representative_dataset, serving_savedmodel, write_tflite


def _noise(float_out: np.ndarray, quantized: np.ndarray, scale: float, zero_point: int) -> float:
    error = float_out.astype(np.float64) - (quantized.astype(np.float64) - zero_point) * scale
    return float(np.sum(error * error))


def _signal(float_out: np.ndarray, quantized: np.ndarray, scale: float, zero_point: int) -> float:
    return float(np.sum(float_out.astype(np.float64) ** 2))


class LiteRTInt8:
    """One calibration of a Keras model for LiteRT INT8, quantized with any layers in float."""

    def __init__(self, model, bundle: Bundle, calibration: np.ndarray, ranking_images: int = 16,
                 source: ServingSavedModel | None = None):
        """``source``: the export run's shared serving SavedModel (by default a temporary one)."""
        self._model, self._bundle, self._calibration = model, bundle, calibration
        self._source = source
        self._ranking = calibration[:ranking_images]
        self._debugger = None
        self._layers: list[LayerError] | None = None

    def _options(self, keep: Sequence[str] = ()):
        import tensorflow as tf

        return tf.lite.experimental.QuantizationDebugOptions(fully_quantize=True, denylisted_nodes=list(keep) or None)

    def _debugger_for(self, out_dir: Path):
        """The debugger, made (and the model calibrated) on first use."""
        if self._debugger is None:
            import tensorflow as tf

            try:
                with serving_savedmodel(self._model, self._bundle, out_dir, self._source) as serving:
                    converter = serving.converter()
                    converter.optimizations = [tf.lite.Optimize.DEFAULT]
                    converter.representative_dataset = representative_dataset(self._calibration)
                    # Denylisted layers run as float builtins; every other op must take INT8.
                    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                                           tf.lite.OpsSet.TFLITE_BUILTINS]
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
                        self._debugger = tf.lite.experimental.QuantizationDebugger(
                            converter=converter, debug_options=self._options())
            except Exception as exc:
                raise ConversionError(f"the TFLite converter failed (int8, calibration): {exc}") from exc
        return self._debugger

    def quantize(self, src: Path | None, out: Path, keep: Sequence[str], calibration: str = "minmax") -> None:
        """Write the INT8 model with the layers (output tensor names) in ``keep`` in float to ``out``."""
        debugger = self._debugger_for(out.parent)
        try:
            # Not the public ``options`` setter: it also rebuilds the instrumented debug model,
            # which costs another quantization and fails once no op is left in INT8. The plain
            # model reads only these options.
            debugger._debug_options = self._options(keep)
            flatbuffer = debugger.get_nondebug_quantized_model()
        except Exception as exc:
            raise ConversionError(f"LiteRT could not quantize with {len(keep)} layers in float: {exc}") from exc
        write_tflite(flatbuffer, self._bundle, out, "int8", self._calibration, kept_float=list(keep))

    def layers(self, plain: Path | None = None) -> list[LayerError]:
        """Every quantized op, the one whose INT8 adds the most error first."""
        if self._layers is None:
            import tensorflow as tf

            debugger = self._debugger_for(Path(tempfile.gettempdir()))
            debugger._debug_options = self._options()  # the plain model, instrumented (see quantize)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
                # Keeping every tensor is what this needs (and says so in a warning).
                warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
                # A debugger made from the instrumented model keeps every tensor readable after a
                # run (one made from a converter does not), which comparing float and INT8 needs.
                measured = tf.lite.experimental.QuantizationDebugger(
                    quant_debug_model_content=debugger.get_debug_quantized_model(),
                    debug_dataset=lambda: ([image[None]] for image in self._ranking),
                    debug_options=tf.lite.experimental.QuantizationDebugOptions(
                        layer_direct_compare_metrics={"noise": _noise, "signal": _signal}))
                measured.run()
            table = io.StringIO()
            measured.layer_statistics_dump(table)
            table.seek(0)
            # The debugger drops a trailing digit from the names it reports ("...:0" -> "...:"); a
            # name the model does not have cannot be denylisted, so it is not offered.
            from ai_edge_litert.interpreter import Interpreter

            names = {t["name"] for t in Interpreter(model_content=debugger.get_nondebug_quantized_model())
                     .get_tensor_details()}
            layers = []
            for row in csv.DictReader(table):
                noise, signal = float(row["noise"]), float(row["signal"])
                if row["tensor_name"] not in names or not (math.isfinite(noise) and math.isfinite(signal)):
                    continue
                nsr = noise / signal if signal > 0 else 0.0
                layers.append(LayerError(row["tensor_name"], row["op_name"], (), nsr,
                                         float(10 * np.log10(1 / max(nsr, 1e-12)))))
            self._layers = sorted(layers, key=lambda e: -e.added_nsr)
        return self._layers

    @property
    def description(self) -> str:
        return (f"error each op's own INT8 adds at its output, its float twin fed the same INT8 inputs "
                f"(LiteRT quantization debugger), on {len(self._ranking)} calibration images")
