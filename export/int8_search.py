"""Accuracy-aware INT8 for the QDQ ONNX: keep the fewest, most harmful layers in FP32.

Plain INT8 is tried first. When it misses the target (top-1 agreement with Keras,
accuracy drop) on the held-out verification set, the compute nodes are ranked by the
error they add (:mod:`edgeclf.export.int8_layers`, measured on *calibration* images:
the ranking never sees the images it is judged on), and the model is quantized again
with the top 1, 2, 4, ... of them kept in FP32 until the target is met, then the count
is narrowed by bisection. Calibration runs once (its ranges are cached); the search is
bounded in trials and seconds. The OpenVINO INT8 IR is converted from this ONNX, so it
keeps the same layers in FP32; when it is exported too, each candidate is judged on
both runtimes (their INT8 kernels round differently).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import InvalidInputError
from edgeclf.export.int8_layers import layer_errors
from edgeclf.export.onnx_int8 import never_quantized, onnx_to_int8
from edgeclf.progress import log
from edgeclf.runtime.checks import Tolerance
from edgeclf.runtime.verifier import check_entry
from edgeclf.verification import VerificationSet

#: Calibration images the per-layer ranking runs on (two model runs each).
RANKING_IMAGES = 16
#: Layers listed in the report.
REPORTED_LAYERS = 30


@dataclass(frozen=True)
class Int8Target:
    """What an INT8 artifact must reach, and how long the search for it may take."""

    min_agreement: float = 0.99
    max_accuracy_drop: float = 0.005
    max_trials: int = 12  # quantizations after the plain one
    max_seconds: float = 900.0

    def __post_init__(self) -> None:
        if not 0.0 < self.min_agreement <= 1.0:
            raise InvalidInputError(f"INT8 minimum agreement must be in (0, 1]. Received: {self.min_agreement}")
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise InvalidInputError(f"INT8 maximum accuracy drop must be in [0, 1). Received: "
                                    f"{self.max_accuracy_drop}")
        if self.max_trials < 0 or self.max_seconds <= 0:
            raise InvalidInputError(f"the INT8 search needs max_trials >= 0 and max_seconds > 0. Received: "
                                    f"{self.max_trials}, {self.max_seconds}")

    def tolerance(self) -> Tolerance:
        return Tolerance(rtol=None, atol=0.0, min_agreement=self.min_agreement,
                         max_accuracy_drop=self.max_accuracy_drop)


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    return {"agreement": report.get("top1_agreement"), "accuracy_drop":
            None if "accuracy" not in report else report["accuracy_keras"] - report["accuracy"],
            "passed": report["passed"]}


def quantize_to_target(src: Path, out: Path, calibration: np.ndarray, reference: VerificationSet,
                       labels: list[int], target: Int8Target, method: str = "minmax",
                       reduce_range: bool = True, also_openvino: bool = False) -> dict[str, Any]:
    """Write to ``out`` the INT8 model with the fewest FP32 layers that meets ``target``
    (or, if none does within the bounds, the best one tried).

    Returns:
        The search report for bundle.json: the target, each trial's kept layers and
        figures, the layers kept in FP32, and the per-layer error ranking.
    """
    started = time.perf_counter()
    work = out.parent / f".{out.stem}.search"
    work.mkdir(exist_ok=True)
    cache = work / "calibration.json"
    tolerance = target.tolerance()

    def trial(keep: list[str], layers: int) -> dict[str, Any]:
        candidate = work / f"keep{len(keep)}.onnx"
        onnx_to_int8(src, candidate, calibration, method, reduce_range, keep_fp32=keep, cache=cache)
        figures = _figures(check_entry(candidate, "onnxruntime", None, reference, labels, tolerance))
        if also_openvino:
            from edgeclf.export.openvino_ir import onnx_to_openvino

            ir = work / f"keep{len(keep)}.xml"
            onnx_to_openvino(candidate, ir)
            openvino = _figures(check_entry(ir, "openvino", None, reference, labels, tolerance))
            figures = {"agreement": min(figures["agreement"], openvino["agreement"]),
                       "accuracy_drop": max(figures["accuracy_drop"], openvino["accuracy_drop"]),
                       "passed": figures["passed"] and openvino["passed"], "onnxruntime": figures,
                       "openvino": openvino}
        figures.update(layers=layers, seconds=round(time.perf_counter() - started, 1))
        log(f"  onnx-int8     {layers:>3} layers in FP32: agreement {figures['agreement']:.4f}, "
            f"accuracy drop {figures['accuracy_drop']:+.4f}{'  meets the target' if figures['passed'] else ''}")
        return figures

    try:
        trials = [trial([], 0)]
        ranked = layer_errors(src, work / "keep0.onnx", calibration[:RANKING_IMAGES], skip=set(never_quantized(src)))
        units = [[e.node, *e.companions] for e in ranked]  # keeping a Conv in FP32 keeps its Relu too
        best = 0
        if not trials[0]["passed"]:
            best = _search(trials, units, trial, target, started)
        shutil.copyfile(work / f"keep{sum(len(u) for u in units[:best])}.onnx", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kept = [name for unit in units[:best] for name in unit]
    return {
        "target": asdict(target), "method": method, "plain": trials[0], "trials": trials[1:],
        "kept_fp32": kept, "kept_fp32_layers": best, "met": any(t["passed"] for t in trials),
        "seconds": round(time.perf_counter() - started, 1),
        "ranked_on": f"{min(RANKING_IMAGES, len(calibration))} calibration images",
        "judged_on": f"{len(reference)} held-out verification images"
                     + (" with onnxruntime and openvino" if also_openvino else " with onnxruntime"),
        "layers": [e.to_dict() | {"kept_fp32": i < best} for i, e in enumerate(ranked[:max(REPORTED_LAYERS, best)])],
    }


def _search(trials: list[dict], units: list[list[str]], trial, target: Int8Target, started: float) -> int:
    """How many of the ranked layers to keep in FP32: doubling until the target is met, then
    bisection; returns the smallest count that met it, or the best tried when none did."""
    def budget_left() -> bool:
        return len(trials) - 1 < target.max_trials and time.perf_counter() - started < target.max_seconds

    def run(count: int) -> bool:
        trials.append(trial([name for unit in units[:count] for name in unit], count))
        return trials[-1]["passed"]

    low, high, count = 0, None, 1
    while budget_left() and count <= len(units):
        if run(count):
            high = count
            break
        low, count = count, min(count * 2, len(units)) if count < len(units) else len(units) + 1
    while high is not None and high - low > 1 and budget_left():
        middle = (low + high) // 2
        if run(middle):
            high = middle
        else:
            low = middle
    if high is not None:
        return high
    log(f"  onnx-int8     no trial met the target within {target.max_trials} trials / {target.max_seconds:.0f} s; "
        f"keeping the best one found")
    best = max(trials, key=lambda t: (t["agreement"], -t["accuracy_drop"]))
    return best.get("layers", 0)
