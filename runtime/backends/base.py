"""The interface every runtime backend implements, and the options they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class BackendOptions:
    #: CPU threads for one inference; None: the library's default (all cores).
    threads: int | None = None
    #: Run-time precision hint: "bf16" asks OpenVINO for BF16 (AMX or AVX512_BF16 CPUs); None: the artifact's own.
    precision: str | None = None
    #: onnxruntime execution providers, in order; None: the best installed (TensorRT, CUDA, CPU).
    providers: tuple[str, ...] | None = None
    #: OpenVINO: the IR's weights file, when it is not the .bin beside the .xml (a bundle
    #: names it in bundle.json, checked to lie inside the bundle).
    weights: Path | None = None


class Backend(Protocol):
    """Runs one artifact. ``infer`` takes uint8 NHWC pixels and returns float32 logits [N, K];
    ``run`` returns any named outputs (export validation and ``verify`` check ``label`` too).

    ``infer`` must be safe to call from several threads at once (a backend whose library
    is not serialises calls itself). ``max_batch`` is the largest batch one call takes
    (None: any).
    """

    name: str
    metadata: dict[str, Any]
    max_batch: int | None

    def load(self, path: Path, options: BackendOptions) -> None: ...

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def run(self, batch: np.ndarray, outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]:
        """The named graph outputs: validation also reads ``label``, the graph's own decoding."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def run_in_chunks(backend: Backend, images: np.ndarray, step: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named outputs of ``backend`` for uint8 ``images``, ``step`` images a call, joined.

    The ``embedding`` comes back as [N, D] whatever shape a backend gives it; an empty batch is
    one call, as :meth:`Backend.infer` takes it.
    """
    parts = [backend.run(images[i:i + step], names) for i in range(0, len(images), step)] or [backend.run(images, names)]
    out = {name: np.concatenate([p[name] for p in parts]) for name in names}
    if "embedding" in out:
        out["embedding"] = out["embedding"].reshape(len(out["embedding"]), -1)
    return out
