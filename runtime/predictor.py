"""``Predictor``: load an artifact, feed it images, get integers. No TensorFlow.

    >>> from edgeclf.runtime import Predictor
    >>> with Predictor.load("runs/demo/bundle") as predictor:
    ...     predictor.predict("meter.jpg").label
    7
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import IncompatibleArtifactError, InvalidInputError
from edgeclf import limits
from edgeclf.bundle import Bundle, artifact_files
from edgeclf.runtime.backends import BackendOptions, create_backend
from edgeclf.decoding import check_decoding, decode_indices
from edgeclf.runtime.hardware import detect
from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS
from edgeclf.runtime.inputs import is_batch, to_batch
from edgeclf.runtime.metadata import check_artifact_metadata, check_model_path
from edgeclf.runtime.selection import Choice, choose, needs_int8_dot_product


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the integer ``label`` = labels[``index``], with its probability."""

    label: int
    index: int
    confidence: float
    #: The k most probable (label, probability) pairs, best first, when top_k > 1.
    top_k: tuple[tuple[int, float], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "index": self.index, "confidence": self.confidence}
        if self.top_k:
            out["top_k"] = [{"label": label, "confidence": p} for label, p in self.top_k]
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Predictor:
    """Runs one artifact and decodes its logits to integer labels.

    Thread-safe: one Predictor may serve many threads (each backend makes its own
    inference call safe). Use :meth:`load` to make one.
    """

    def __init__(self, backend, choice: Choice, labels: list[int], image_size: tuple[int, int],
                 batch_size: int, reason: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 decoding: str = "argmax") -> None:
        self.backend = backend
        self.choice = choice
        self.labels = list(labels)
        self.image_size = image_size
        self.batch_size = min(batch_size, backend.max_batch or batch_size)
        self._table = np.asarray(self.labels, dtype=np.int64)
        self._reason = reason
        #: The pixel budget of each image file, bytes or PIL image, checked before it is decoded.
        self.max_image_pixels = max_image_pixels
        #: "argmax" (the graphs' own ``label`` output) or "median" (see edgeclf.decoding).
        self.decoding = check_decoding(decoding)

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", *, precision: str | None = None,
             batch_size: int = 32, threads: int | None = None, verify: bool = True,
             allow_unvalidated: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
             decoding: str = "argmax") -> Predictor:
        """Load a bundle directory or one artifact file.

        Args:
            backend: "auto", a backend ("onnxruntime", "openvino", "tflite", "tensorrt") or an
                artifact format of the bundle ("onnx-int8").
            precision: pick the artifact of this precision ("fp32", "fp16", "int8"; "bf16"
                runs the FP32 OpenVINO IR in BF16).
            batch_size: the most images sent to the backend in one call.
            threads: CPU threads per inference (None: the library's default).
            verify: check the artifact's sha256 against bundle.json.
            allow_unvalidated: also run artifacts that export did not validate.
            max_image_pixels: refuse an image file (or bytes, or PIL image) declaring more pixels
                than this, before decoding it (default 25 M; at most Pillow's 89,478,485).
            decoding: "argmax" (default: the most probable label, as the graphs' ``label`` output)
                or "median" (the median of the predicted distribution over the ordered labels,
                which minimises the expected absolute error).

        Raises:
            BundleError: the path, the bundle or the artifact is missing, corrupt or altered.
            IncompatibleArtifactError: built for another GPU/TensorRT, or labels disagree.
            BackendUnavailableError: the backend's library is not installed (names the extra).
            InvalidInputError: an unknown backend, precision or a bad option value.
        """
        path = Path(path)
        check_decoding(decoding)
        limits.check("batch", batch_size, "batch_size")
        if threads is not None:
            limits.check("threads", threads, "threads")
        if precision not in (None, "fp32", "fp16", "bf16", "int8"):
            raise InvalidInputError(f"precision must be fp32, fp16, bf16 or int8. Received: {precision!r}")
        limits.check("image_pixels", max_image_pixels, "max_image_pixels")
        check_model_path(path)
        hardware = detect()
        choice = choose(path, backend, precision, hardware, allow_unvalidated)
        if choice.record is not None and needs_int8_dot_product(choice.record) and not hardware.vnni:
            warnings.warn(f"{choice.format} has full-range 8-bit INT8 weights, made for CPUs with VNNI, AMX or ARM "
                          f"dot product; this CPU has none, so its answers may differ from the model's. "
                          f"`edgeclf verify {path} --backend {choice.format}` measures by how much here",
                          stacklevel=2)
        bundle = Bundle.load(path) if choice.record is not None else None
        weights = None
        if bundle is not None:
            # The files bundle.json names, inside the bundle, of the recorded size and sha256.
            files = artifact_files(bundle, choice.record, verify=verify)
            choice, weights = replace(choice, path=files.entry), files.weights
        runner = create_backend(choice.backend)
        runner.load(choice.path, BackendOptions(threads=threads, precision=choice.precision_hint, weights=weights))
        try:
            labels, size = check_artifact_metadata(runner, choice.path)
            if bundle is not None and labels != bundle.labels:
                raise IncompatibleArtifactError(f"{choice.path.name} decodes to labels {labels}, but the bundle's "
                                                f"labels are {bundle.labels}: the artifact belongs to another model")
            limits.check_batch_memory(batch_size, size, "batch_size")
        except BaseException:
            runner.close()
            raise
        return cls(runner, choice, labels, size, batch_size, choice.reason, max_image_pixels, decoding)

    # -- inference -------------------------------------------------------------------------

    def logits(self, images: Any) -> np.ndarray:
        """Logits [N, K] for one input or many (see :func:`edgeclf.runtime.inputs.to_batch`)."""
        return self.infer(to_batch(images, self.image_size, self.max_image_pixels))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a uint8 NHWC batch already at the model's size, in chunks of ``batch_size``."""
        if self.backend is None:
            raise InvalidInputError("this Predictor is closed")
        if len(batch) <= self.batch_size:
            return self.backend.infer(batch)
        return np.concatenate([self.backend.infer(batch[i:i + self.batch_size])
                               for i in range(0, len(batch), self.batch_size)])

    def probabilities(self, images: Any) -> np.ndarray:
        """Softmax of the logits, [N, K]; column i is the probability of ``labels[i]``."""
        return softmax(self.logits(images).astype(np.float64))

    def decode(self, logits: np.ndarray, top_k: int = 1) -> list[Prediction]:
        """Predictions from logits: index by the Predictor's decoding (argmax or median), label =
        labels[index], confidence = the probability of that label; ``top_k`` ranks by probability."""
        if top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1. Received: {top_k}")
        probs = softmax(logits.astype(np.float64))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :min(top_k, len(self.labels))]
        chosen = decode_indices(probs, self.decoding)
        out = []
        for row, ranked, index in zip(probs, order, chosen.tolist()):
            top = tuple((int(self._table[i]), float(row[i])) for i in ranked) if top_k > 1 else ()
            out.append(Prediction(int(self._table[index]), index, float(row[index]), top))
        return out

    def predict(self, images: Any, top_k: int = 1) -> Prediction | list[Prediction]:
        """A :class:`Prediction` for one input, a list of them for a list or an NHWC array."""
        predictions = self.decode(self.logits(images), top_k)
        return predictions if is_batch(images) else predictions[0]

    def predict_batch(self, images: Any, top_k: int = 1) -> list[Prediction]:
        """Always a list, one :class:`Prediction` per image."""
        return self.decode(self.logits(images), top_k)

    # -- description and lifetime ---------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What runs, on what, and why it was chosen."""
        return {
            "artifact": str(self.choice.path), "format": self.choice.format,
            "precision": (self.backend.metadata or {}).get("precision"),
            "precision_hint": self.choice.precision_hint, "labels": self.labels,
            "input": {"height": self.image_size[0], "width": self.image_size[1], "dtype": "uint8"},
            "batch_size": self.batch_size, "decoding": self.decoding, "reason": self._reason,
            "hardware": detect().summary(), **(self.backend.describe() if self.backend else {}),
        }

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
