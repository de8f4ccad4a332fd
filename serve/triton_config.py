"""Triton ``config.pbtxt`` for an edgeclf model, built and checked with Triton's protobuf.

Configs are built as ``ModelConfig`` messages of Triton's own model-config schema (the
``model_config_pb2`` that tritonclient ships) and written with protobuf's text format,
so every field name and enum is one Triton knows; :func:`parse_config` reads a file
back through the same schema.

Every exported edgeclf graph has the same interface, which the configs describe:

    input  pixels  uint8   [N, H, W, 3]  RGB, NHWC, 0..255 (cast and scaling are in the graph)
    output logits  float32 [N, K]        class scores; labels.txt maps index -> integer
    output label   int64   [N]           labels[argmax(logits)], the integer itself
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeclf.errors import BackendUnavailableError, BundleError, InvalidInputError

LABELS_FILE = "labels.txt"

# Where each Triton backend looks for the model in a version directory, and how the
# config names the backend.
PLATFORMS = {
    "onnxruntime": {"platform": "onnxruntime_onnx", "files": ("model.onnx",), "kind": "KIND_CPU"},
    "openvino": {"backend": "openvino", "files": ("model.xml", "model.bin"), "kind": "KIND_CPU"},
    "tensorrt": {"platform": "tensorrt_plan", "files": ("model.plan",), "kind": "KIND_GPU"},
}


def model_config_pb2():
    """Triton's model-config protobuf module (from tritonclient)."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb2
    except ImportError as exc:
        raise BackendUnavailableError(
            f"Triton model configs need tritonclient ({exc}); install it with: pip install 'edgeclf[serve]'"
        ) from None
    return pb2


@dataclass(frozen=True)
class Batching:
    """Dynamic batching settings shared by every model of a repository or server."""

    max_batch: int = 32
    preferred: tuple[int, ...] = ()
    queue_delay_us: int = 2000
    instances: int = 1

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise InvalidInputError(f"max batch must be >= 1. Received: {self.max_batch}")
        if self.queue_delay_us < 0:
            raise InvalidInputError(f"queue delay must be >= 0 microseconds. Received: {self.queue_delay_us}")
        if self.instances < 1:
            raise InvalidInputError(f"instances must be >= 1. Received: {self.instances}")
        bad = [p for p in self.preferred if not 1 <= p <= self.max_batch]
        if bad:
            raise InvalidInputError(f"preferred batch sizes must lie in 1..{self.max_batch} (the max batch). "
                                    f"Received: {list(self.preferred)}")

    def preferred_sizes(self) -> list[int]:
        """The preferred sizes, or by default 8 (when smaller) and the max batch."""
        sizes = self.preferred or (8, self.max_batch)
        return sorted({s for s in sizes if s <= self.max_batch})


def check_model_name(name: str) -> str:
    """Triton model names: letters, digits, '_', '-' and '.', not starting with '.'."""
    if not name or name.startswith(".") or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise InvalidInputError(f"a Triton model name takes letters, digits, '_', '-' and '.'. Received: {name!r}")
    return name


def build_config(name: str, runtime: str, height: int, width: int, classes: int,
                 batching: Batching, embedding: int | None = None) -> Any:
    """A ``ModelConfig`` message for one edgeclf graph served by ``runtime``.

    Args:
        runtime: a key of :data:`PLATFORMS` (``onnxruntime``, ``openvino``, ``tensorrt``).
    """
    if runtime not in PLATFORMS:
        raise InvalidInputError(f"unknown Triton runtime {runtime!r}; expected one of {sorted(PLATFORMS)}")
    pb2 = model_config_pb2()
    spec = PLATFORMS[runtime]
    config = pb2.ModelConfig(name=name, max_batch_size=batching.max_batch)
    if "platform" in spec:
        config.platform = spec["platform"]
    else:
        config.backend = spec["backend"]
    config.input.append(pb2.ModelInput(
        name="pixels", data_type=pb2.TYPE_UINT8, format=pb2.ModelInput.FORMAT_NHWC, dims=[height, width, 3]))
    config.output.append(pb2.ModelOutput(
        name="logits", data_type=pb2.TYPE_FP32, dims=[classes], label_filename=LABELS_FILE))
    # The graph's label is [N]: with batching Triton needs a non-empty shape per item, so
    # clients see [N, 1] and the model's [N] is declared through reshape.
    config.output.append(pb2.ModelOutput(
        name="label", data_type=pb2.TYPE_INT64, dims=[1], reshape=pb2.ModelTensorReshape(shape=[])))
    if embedding is not None:  # graphs exported with a trust file: the pooled features familiarity is scored on
        config.output.append(pb2.ModelOutput(name="embedding", data_type=pb2.TYPE_FP32, dims=[embedding]))
    config.dynamic_batching.CopyFrom(pb2.ModelDynamicBatching(
        preferred_batch_size=batching.preferred_sizes(),
        max_queue_delay_microseconds=batching.queue_delay_us))
    config.instance_group.append(pb2.ModelInstanceGroup(
        count=batching.instances, kind=pb2.ModelInstanceGroup.Kind.Value(spec["kind"])))
    return config


def config_text(config: Any) -> str:
    """The protobuf text format Triton reads from ``config.pbtxt``."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(source: str | Path) -> Any:
    """Parse a ``config.pbtxt`` (path or text) with Triton's model-config schema.

    Raises:
        BundleError: the text is not a valid Triton model config.
    """
    from google.protobuf import text_format

    text = Path(source).read_text() if isinstance(source, Path) else source
    try:
        return text_format.Parse(text, model_config_pb2().ModelConfig())
    except text_format.ParseError as exc:
        where = f" ({source})" if isinstance(source, Path) else ""
        raise BundleError(f"not a valid Triton model config{where}: {exc}") from None


def labels_text(labels: list[int]) -> str:
    """labels.txt: line i is the integer of class index i (Triton's classification labels)."""
    return "".join(f"{label}\n" for label in labels)
