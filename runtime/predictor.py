"""``Predictor``: load an artifact, feed it images, get integers. No TensorFlow.

    >>> from edgeclf.runtime import Predictor
    >>> with Predictor.load("runs/demo/bundle") as predictor:
    ...     predictor.predict("meter.jpg").label
    7
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import EdgeclfError, IncompatibleArtifactError, InvalidInputError
from edgeclf import limits
from edgeclf.bundle import Bundle, artifact_files
from edgeclf.runtime.backends import BackendOptions, create_backend
from edgeclf.runtime.backends.base import run_in_chunks
from edgeclf.decoding import check_decoding, decode_indices, probabilities_of
from edgeclf.runtime.hardware import detect
from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS
from edgeclf.runtime.decode_ahead import check_decode_threads, decode_ahead
from edgeclf.runtime.inputs import image_frames, is_batch, to_batch
from edgeclf.runtime.metadata import check_artifact_metadata, check_model_path
from edgeclf.runtime.selection import Choice, choose, needs_int8_dot_product
from edgeclf.trust import (DEFAULT_ALPHA, DEFAULT_COVERAGE, conformal_quantile, intervals,
                           scaled_probabilities)
from edgeclf.trust_file import Trust, embedding_offset, load_trust


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the integer ``label`` = labels[``index``], with its probability.

    Where the bundle carries a trust file (:mod:`edgeclf.trust`), ``confidence`` and ``top_k`` are
    calibrated (temperature-scaled), ``familiar`` says whether the image looks like the training
    data (``p_value``: the share of held-out images at least as strange; unfamiliar at or below the
    Predictor's ``alpha``), and ``interval`` is the (lowest, highest) label that holds the true one
    with probability ``coverage`` on data like the held-out images. None where not available.
    """

    label: int
    index: int
    confidence: float
    #: The k most probable (label, probability) pairs, best first, when top_k > 1.
    top_k: tuple[tuple[int, float], ...] = field(default=())
    familiar: bool | None = None
    p_value: float | None = None
    interval: tuple[int, int] | None = None
    coverage: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "index": self.index, "confidence": self.confidence}
        if self.top_k:
            out["top_k"] = [{"label": label, "confidence": p} for label, p in self.top_k]
        if self.familiar is not None:
            out["familiar"], out["p_value"] = self.familiar, self.p_value
        if self.interval is not None:
            out["interval"], out["coverage"] = list(self.interval), self.coverage
        return out

    def describe(self) -> str:
        """``7 (6-8 at 90%), confidence 0.83, familiar (p 0.41)``: the reading as a meter reader prints it."""
        text = str(self.label)
        if self.interval is not None:
            low, high = self.interval
            span = str(low) if low == high else f"{low}-{high}"
            text += f" ({span} at {self.coverage:.0%})"
        text += f", confidence {self.confidence:.3f}"
        if self.familiar is not None:
            text += f", {'familiar' if self.familiar else 'UNFAMILIAR'} (p {self.p_value:.3g})"
        return text


class Predictor:
    """Runs one artifact and decodes its logits to integer labels.

    Thread-safe: one Predictor may serve many threads (each backend makes its own
    inference call safe). Use :meth:`load` to make one.
    """

    def __init__(self, backend, choice: Choice, labels: list[int], image_size: tuple[int, int],
                 batch_size: int, reason: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 decoding: str = "argmax", trust: Trust | None = None, alpha: float = DEFAULT_ALPHA,
                 coverage: float | None = DEFAULT_COVERAGE, decode_threads: int | None = None,
                 embedding_offset: np.ndarray | None = None) -> None:
        self.backend = backend
        self.choice = choice
        self.labels = list(labels)
        self.image_size = image_size
        self.batch_size = min(batch_size, backend.max_batch or batch_size)
        self._table = np.asarray(self.labels, dtype=np.int64)
        self._reason = reason
        #: The pixel budget of each image file, bytes or PIL image, checked before it is decoded.
        self.max_image_pixels = max_image_pixels
        #: Threads decoding and resizing images while the backend runs (lists, streams, predict's files).
        self.decode_threads = check_decode_threads(decode_threads)
        #: "argmax" (the graphs' own ``label`` output) or "median" (see edgeclf.decoding).
        self.decoding = check_decoding(decoding)
        #: The bundle's calibration (None: exported before edgeclf fitted one) and how it is applied.
        self.trust = trust
        self.alpha, self.coverage = alpha, coverage
        outputs = (getattr(backend, "graph", None) or {}).get("outputs") or ()
        #: Whether familiarity is scored: a trust file, and an artifact with an ``embedding`` output.
        self.scores_familiarity = trust is not None and "embedding" in outputs
        self._threshold = (conformal_quantile(trust.interval_calibration, coverage)
                           if trust is not None and coverage is not None else None)
        #: What export measured this artifact's embedding to sit off Keras' (INT8 moves every channel by
        #: a bias of its own), removed before familiarity is scored; None: nothing to remove.
        self.embedding_offset = embedding_offset

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", *, precision: str | None = None,
             batch_size: int = 32, threads: int | None = None, verify: bool = True,
             allow_unvalidated: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
             decoding: str = "argmax", alpha: float = DEFAULT_ALPHA,
             coverage: float | None = DEFAULT_COVERAGE, decode_threads: int | None = None) -> Predictor:
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
            alpha: an image is unfamiliar when at most this share of held-out images look as strange
                (its conformal p-value; default 0.01, the false-alarm rate on images like the training data).
            coverage: the probability the reading's interval holds the true label (default 0.9); None: no
                interval.
            decode_threads: threads that decode and resize images while the backend runs the ones
                before (default: one per core, at most 4).

        Raises:
            BundleError: the path, the bundle or the artifact is missing, corrupt or altered.
            IncompatibleArtifactError: built for another GPU/TensorRT, or labels disagree.
            BackendUnavailableError: the backend's library is not installed (names the extra).
            InvalidInputError: an unknown backend, precision or a bad option value.
        """
        path = Path(path)
        check_decoding(decoding)
        limits.check("batch", batch_size, "batch_size")
        check_decode_threads(decode_threads)  # checked before anything loads
        if threads is not None:
            limits.check("threads", threads, "threads")
        if precision not in (None, "fp32", "fp16", "bf16", "int8"):
            raise InvalidInputError(f"precision must be fp32, fp16, bf16 or int8. Received: {precision!r}")
        limits.check("image_pixels", max_image_pixels, "max_image_pixels")
        limits.check("alpha", alpha, "alpha")
        if coverage is not None:
            limits.check("coverage", coverage, "coverage")
        check_model_path(path)
        hardware = detect()
        choice = choose(path, backend, precision, hardware, allow_unvalidated)
        if choice.record is not None and needs_int8_dot_product(choice.record) and hardware.int8_saturates:
            warnings.warn(f"{choice.format} has full-range 8-bit INT8 weights, which saturate on x86 CPUs without "
                          f"VNNI or AMX, as this one; its answers may differ from the model's. "
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
            trust = load_trust(bundle) if bundle is not None else None
            offset = embedding_offset(choice.record, trust)
        except BaseException:
            runner.close()
            raise
        return cls(runner, choice, labels, size, batch_size, choice.reason, max_image_pixels, decoding,
                   trust, alpha, coverage, decode_threads, offset)

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

    def infer_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, embedding) for a uint8 NHWC batch; the embedding is None unless familiarity is scored."""
        if not self.scores_familiarity:
            return self.infer(batch), None
        if self.backend is None:
            raise InvalidInputError("this Predictor is closed")
        out = run_in_chunks(self.backend, batch, self.batch_size, ("logits", "embedding"))
        return out["logits"], self.aligned(out["embedding"])

    def embeddings(self, batch: np.ndarray) -> np.ndarray:
        """The artifact's embedding [N, D] of a uint8 NHWC batch, in Keras' space (:meth:`aligned`)."""
        if self.backend is None:
            raise InvalidInputError("this Predictor is closed")
        return self.aligned(run_in_chunks(self.backend, batch, self.batch_size, ("embedding",))["embedding"])

    def aligned(self, embedding: np.ndarray) -> np.ndarray:
        """``embedding`` (the graph's own output) less :attr:`embedding_offset`: what familiarity scores."""
        return embedding if self.embedding_offset is None else embedding - self.embedding_offset

    def probabilities(self, images: Any) -> np.ndarray:
        """Class probabilities [N, K] (temperature-calibrated where the bundle has a trust file);
        column i is the probability of ``labels[i]``."""
        return self._probabilities(self.logits(images))

    def _probabilities(self, logits: np.ndarray) -> np.ndarray:
        return scaled_probabilities(logits, self.trust.temperature if self.trust is not None else 1.0)

    def decode(self, logits: np.ndarray, top_k: int = 1, embedding: np.ndarray | None = None) -> list[Prediction]:
        """Predictions from logits: index by the Predictor's decoding (argmax or median), label =
        labels[index], confidence = the (calibrated) probability of that label; ``top_k`` ranks by
        probability. With the trust file: the interval, and from ``embedding`` the familiarity."""
        if top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1. Received: {top_k}")
        probs = self._probabilities(logits)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :min(top_k, len(self.labels))]
        # Decoded from the raw logits, as export validated and verify checks it (argmax is the same either way).
        chosen = decode_indices(probabilities_of(logits), self.decoding)
        spans = intervals(probs, self._threshold, chosen).tolist() if self._threshold is not None else [None] * len(probs)
        p_values = (self.trust.familiarity.p_values(embedding).tolist()
                    if embedding is not None and self.trust is not None else [None] * len(probs))
        out = []
        for row, ranked, index, span, p in zip(probs, order, chosen.tolist(), spans, p_values, strict=True):
            top = tuple((int(self._table[i]), float(row[i])) for i in ranked) if top_k > 1 else ()
            out.append(Prediction(
                int(self._table[index]), index, float(row[index]), top,
                familiar=None if p is None else bool(p > self.alpha), p_value=p,
                interval=None if span is None else (int(self._table[span[0]]), int(self._table[span[1]])),
                coverage=None if span is None else self.coverage))
        return out

    def predict(self, images: Any, top_k: int = 1) -> Prediction | list[Prediction]:
        """A :class:`Prediction` for one input, a list of them for a list or an NHWC array."""
        predictions = self.predict_batch(images, top_k)
        return predictions if is_batch(images) else predictions[0]

    def predict_batch(self, images: Any, top_k: int = 1) -> list[Prediction]:
        """Always a list, one :class:`Prediction` per image. A list is decoded on the decode
        threads, the next ``batch_size`` images while the backend runs the last ones."""
        if not isinstance(images, (list, tuple)) or len(images) <= 1:
            logits, embedding = self.infer_outputs(to_batch(images, self.image_size, self.max_image_pixels))
            return self.decode(logits, top_k, embedding)
        out: list[Prediction] = []
        for batch in self._decoded_batches(images):
            logits, embedding = self.infer_outputs(batch)
            out.extend(self.decode(logits, top_k, embedding))
        return out

    def _decoded_batches(self, images: list | tuple) -> Iterator[np.ndarray]:
        """``images`` as uint8 batches of about ``batch_size``, decoded ahead; the first input that
        cannot be decoded raises, as :func:`to_batch` would."""
        def frames(i: int) -> np.ndarray:
            return image_frames(images[i], self.image_size, f"input {i}", self.max_image_pixels)

        ready: list[np.ndarray] = []
        with closing(decode_ahead(range(len(images)), frames, self.decode_threads, 2 * self.batch_size)) as decoded:
            for _, frame in decoded:
                if isinstance(frame, EdgeclfError):
                    raise frame
                ready.append(frame)
                if sum(len(f) for f in ready) >= self.batch_size:
                    yield np.concatenate(ready)
                    ready = []
        if ready:
            yield np.concatenate(ready)

    def stream(self, frames: Iterable[Any], top_k: int = 1) -> Iterator[tuple[Any, Prediction | EdgeclfError]]:
        """(input, its :class:`Prediction` or the error that replaced it) for each of ``frames``
        (one image each), in order, as they come: a camera loop. Each is decoded and resized on
        the decode threads while the backend runs the one before, at most ``decode_threads`` + 1
        ahead (memory stays flat, whatever the stream's length), and inferred alone: batch 1, a
        reading's latency. A frame that fails is handed back with its error and the rest go on.
        """
        def one(x: Any) -> np.ndarray:
            frame = image_frames(x, self.image_size, "frame", self.max_image_pixels)
            if len(frame) != 1:
                raise InvalidInputError(f"a stream takes one image per item. Received: {len(frame)} images")
            return frame

        with closing(decode_ahead(frames, one, self.decode_threads, self.decode_threads + 1)) as decoded:
            for item, frame in decoded:
                if isinstance(frame, EdgeclfError):
                    yield item, frame
                    continue
                logits, embedding = self.infer_outputs(frame)
                yield item, self.decode(logits, top_k, embedding)[0]

    # -- description and lifetime ---------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What runs, on what, and why it was chosen."""
        return {
            "artifact": str(self.choice.path), "format": self.choice.format,
            "precision": (self.backend.metadata or {}).get("precision"),
            "precision_hint": self.choice.precision_hint, "labels": self.labels,
            "input": {"height": self.image_size[0], "width": self.image_size[1], "dtype": "uint8"},
            "batch_size": self.batch_size, "decoding": self.decoding, "reason": self._reason,
            "trust": self.trust_summary(),
            "hardware": detect().summary(), **(self.backend.describe() if self.backend else {}),
        }

    def trust_summary(self) -> str:
        """One line: what the readings carry beyond the label, and why not more."""
        if self.trust is None:
            return ("no trust file (exported before edgeclf fitted one, or a lone artifact): raw confidence, no "
                    "familiarity or interval; re-export the bundle to add them")
        text = f"confidence calibrated (temperature {self.trust.temperature:.3g})"
        if self.coverage is not None:
            text += f", intervals at {self.coverage:.0%} coverage"
        if self.scores_familiarity:
            return text + f", familiarity (unfamiliar at p <= {self.alpha:g})"
        return text + "; no familiarity: this artifact has no embedding output (exported before it had one)"

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
