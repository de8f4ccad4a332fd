"""Accuracy-aware INT8: keep the fewest, most harmful layers in FP32.

One search drives each INT8 tool: ONNX Runtime's static QDQ quantizer for ``onnx-int8``,
NNCF for the OpenVINO IR ``openvino-int8`` and LiteRT's converter for ``tflite-int8``.
Plain INT8 is tried first, with each calibration the tool offers. When it misses the
gate (:mod:`edgeclf.runtime.fidelity`: agreement with Keras on the images it has decided,
a paired test of the accuracy drop) on *tuning* images from the training side, the model
is quantized again with the top 1, 2, 4, ... layers of a per-layer error ranking kept in
FP32 until the gate is met, then the count is narrowed by bisection. Each candidate is
judged by the runtime backend that will run it; the search is bounded in trials and
seconds, and never keeps more than ``max_fp32_share`` of the quantizable layers in FP32:
beyond that the artifact is not INT8. The held-out verification set never reaches the
search: it judges the final artifact once, in export's validation.

The ranking (:mod:`edgeclf.export.int8_layers`) measures on *calibration* images, never
on the images the candidates are judged on, how much error each node's quantization adds
in a QDQ model run by ONNX Runtime. It is computed once per export and shared by the ONNX
Runtime and NNCF searches (both name layers by their ONNX nodes; which layers are fragile
is a property of the model's activations more than of the tool). LiteRT names its layers
by their output tensors and ranks them with its own debugger
(:mod:`edgeclf.export.tflite_int8`).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeclf.errors import InvalidInputError
from edgeclf.export.int8_layers import LayerError, layer_errors
from edgeclf.export.onnx_int8 import CALIBRATION_METHODS, never_quantized, onnx_to_int8
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

    min_agreement: float = 0.99  # on the images the Keras model has decided
    max_accuracy_drop: float = 0.005  # failed only when a paired test finds the drop significantly larger
    max_trials: int = 12  # quantizations with layers in FP32, after plain INT8's calibrations
    max_seconds: float = 900.0
    max_fp32_share: float = 0.1  # of the quantizable layers; more is not an INT8 model
    paired_alpha: float = 0.05  # level of the paired accuracy test

    def __post_init__(self) -> None:
        if not 0.0 < self.min_agreement <= 1.0:
            raise InvalidInputError(f"INT8 minimum agreement must be in (0, 1]. Received: {self.min_agreement}")
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise InvalidInputError(f"INT8 maximum accuracy drop must be in [0, 1). Received: "
                                    f"{self.max_accuracy_drop}")
        if self.max_trials < 0 or not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise InvalidInputError(f"the INT8 search needs max_trials >= 0 and a finite max_seconds > 0. Received: "
                                    f"{self.max_trials}, {self.max_seconds}")
        if not 0.0 <= self.max_fp32_share <= 1.0 or not 0.0 < self.paired_alpha < 1.0:
            raise InvalidInputError(f"the INT8 gate needs 0 <= max_fp32_share <= 1 and 0 < paired_alpha < 1. "
                                    f"Received: {self.max_fp32_share}, {self.paired_alpha}")

    def images_to_judge(self) -> int:
        """Held-out images needed for the agreement target to be measurable: with N images one
        disagreement costs 1/N, so 0.99 takes at least 100 (and 1.0 any number)."""
        return 1 if self.min_agreement >= 1.0 else math.ceil(round(1.0 / (1.0 - self.min_agreement), 6))

    def tolerance(self, decided_margin: float | None = None) -> Tolerance:
        """The gate's limits; ``decided_margin`` (logits) restricts the agreement to decided images."""
        return Tolerance(rtol=None, atol=0.0, min_agreement=self.min_agreement,
                         max_accuracy_drop=self.max_accuracy_drop, decided_margin=decided_margin,
                         paired_alpha=self.paired_alpha)

    def most_fp32_layers(self, quantizable: int) -> int:
        """The most layers of ``quantizable`` a candidate may keep in FP32 and still count as INT8."""
        return math.floor(self.max_fp32_share * quantizable + 1e-9)


def fp32_share_check(report: dict[str, Any], target: Int8Target) -> dict[str, Any]:
    """The check of an INT8 search's result that refuses a candidate keeping too many layers in FP32."""
    kept, total = report["kept_fp32_layers"], report["quantizable_layers"]
    share = kept / total if total else 0.0
    return {"check": f"layers kept in FP32 ({kept} of {total})", "value": share, "limit": target.max_fp32_share,
            "passed": share <= target.max_fp32_share + 1e-12}


def figures_of(report: dict[str, Any]) -> dict[str, Any]:
    """Agreement (all images and decided ones), accuracy drop and verdict of a check_entry report."""
    figures = {"agreement": report.get("top1_agreement"), "accuracy_drop":
               None if "accuracy" not in report else report["accuracy_keras"] - report["accuracy"],
               "passed": report["passed"]}
    if "decided" in report:
        figures["decided_agreement"] = report["decided"]["agreement"]
    if "paired" in report:
        figures["paired_p_value"] = report["paired"]["p_value"]
    if "margin_shift_q99" in report:
        figures["margin_shift_q99"] = report["margin_shift_q99"]
    return figures


@dataclass(frozen=True)
class Quantizer:
    """One INT8 tool the search drives."""

    format: str  # the artifact it makes ("onnx-int8"), for the log
    backend: str  # the runtime backend that judges its candidates
    suffix: str  # of a candidate's entry file
    #: (FP32 ONNX, out, ONNX node names kept in FP32, calibration) -> the INT8 model written to out.
    quantize: Callable[[Path, Path, Sequence[str], str], None]
    #: Calibrations plain INT8 tries, in order, before any layer is kept in FP32.
    calibrations: tuple[str, ...]
    #: A candidate's files (an OpenVINO IR has its weights beside it).
    files: Callable[[Path], list[Path]] = lambda entry: [entry]
    description: str = ""
    #: Try every calibration and keep, of those that meet the target, the one that moves the
    #: logits least (99th-percentile margin shift on the tuning images), not the first that does.
    compare_all: bool = False
    #: The calibration chosen -> how the artifact's record names it.
    calibration_record: Callable[[str], dict[str, Any]] = lambda chosen: {"method": chosen}


def qdq_quantizer(calibration: np.ndarray, method: str | None, reduce_range: bool) -> Quantizer:
    """ONNX Runtime's static QDQ quantization (``nodes_to_exclude`` keeps nodes in FP32).

    ``method``: the calibrator, or None for min-max first, then onnxruntime's other
    calibrators while plain INT8 misses the target (on the main job's model, entropy
    ranges agreed with Keras on one more image in 256 than min-max).
    The search writes its candidates into one folder, where each calibration's ranges are
    cached, so a fallback trial does not calibrate again.
    """
    def quantize(src: Path, out: Path, keep: Sequence[str], method: str) -> None:
        onnx_to_int8(src, out, calibration, method, reduce_range, keep_fp32=keep,
                     cache=out.parent / f"calibration.{method}.json")

    return Quantizer("onnx-int8", "onnxruntime", ".onnx", quantize, (method,) if method else CALIBRATION_METHODS,
                     description="onnxruntime quantize_static (QDQ)",
                     calibration_record=lambda chosen: {"method": chosen, "reduce_range": reduce_range})


def nncf_quantizer(calibration: np.ndarray, reduce_range: bool) -> Quantizer:
    """NNCF's post-training quantization of the FP32 OpenVINO model (an ignored scope keeps nodes in FP32)."""
    from edgeclf.export.openvino_ir import ir_files, onnx_to_openvino_int8

    # Bias correction helps some models and hurts others (measured with global min-max ranges, 8-bit
    # weights, Zen 5): the main job's model moved its logits less with it (99th-percentile margin
    # shift 2.7 against 5.2 on 500 tuning images); the tests' 3-class InceptionV3 flipped 2 of 86
    # decided held-out images with it and none without. Both are tried; the search keeps the one
    # that meets the gate and moves the logits least on the tuning images.
    return Quantizer("openvino-int8", "openvino", ".xml",
                     lambda src, out, keep, method: onnx_to_openvino_int8(
                         src, out, calibration, reduce_range, keep, bias_correction=method == "nncf"),
                     ("nncf", "nncf-no-bias-correction"), files=ir_files, description="nncf.quantize (OpenVINO)",
                     compare_all=True,
                     calibration_record=lambda chosen: {
                         "method": "nncf (global min-max activation ranges, "
                                   f"{'bias correction' if chosen == 'nncf' else 'no bias correction'})",
                         "reduce_range": reduce_range})


def litert_quantizer(litert) -> Quantizer:
    """LiteRT's full-integer converter; its quantization debugger's denylist keeps layers in float.

    ``litert``: an :class:`edgeclf.export.tflite_int8.LiteRTInt8` (calibrated once, also the ranking).
    """
    return Quantizer("tflite-int8", "tflite", ".tflite", litert.quantize, ("minmax",),
                     description="LiteRT converter, full-integer (float layers by the quantization debugger)",
                     calibration_record=lambda _: {"method": "minmax (TFLite converter)"})  # its own weight range


class LayerRanking:
    """The per-layer INT8 error ranking of one FP32 ONNX model, computed on first use."""

    def __init__(self, src: Path, calibration: np.ndarray, method: str = "minmax", reduce_range: bool = True):
        self.src, self.images = src, calibration[:RANKING_IMAGES]
        self._calibration, self._method, self._reduce_range = calibration, method, reduce_range
        self._layers: list[LayerError] | None = None

    def layers(self, plain_qdq: Path | None = None) -> list[LayerError]:
        """The ranking; ``plain_qdq`` is a plain QDQ model of ``src`` to measure (one is made otherwise)."""
        if self._layers is None:
            with tempfile.TemporaryDirectory(prefix=".ranking.", dir=self.src.parent) as tmp:
                if plain_qdq is None:
                    plain_qdq = Path(tmp) / "plain.onnx"
                    onnx_to_int8(self.src, plain_qdq, self._calibration, self._method, self._reduce_range)
                self._layers = layer_errors(self.src, plain_qdq, self.images, skip=set(never_quantized(self.src)))
        return self._layers

    @property
    def description(self) -> str:
        return (f"error each node's QDQ quantization adds (onnxruntime, {self._method}), "
                f"on {len(self.images)} calibration images")


def quantize_to_target(quantizer: Quantizer, src: Path | None, out: Path, ranking: LayerRanking,
                       tuning: VerificationSet, labels: list[int], target: Int8Target,
                       decided_margin: float | None = None) -> dict[str, Any]:
    """Write to ``out`` the INT8 model with the fewest FP32 layers that meets ``target`` on the
    ``tuning`` images (or, if none does within the bounds, the best one tried).

    Args:
        src: the FP32 ONNX quantized (None for LiteRT, which quantizes the Keras model).
        ranking: the per-layer error ranking (:class:`LayerRanking`, or LiteRT's own).
        tuning: images from the training side with their Keras logits; never the
            verification set, which judges only the artifact this returns.
        decided_margin: the gate's margin (:mod:`edgeclf.export.int8_gate`); None judges
            agreement on every image.

    Returns:
        The search report for bundle.json: the target, each trial's kept layers and
        figures, the layers kept in FP32, and the per-layer error ranking.
    """
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}.search.", dir=out.parent))
    tolerance = target.tolerance(decided_margin)

    def candidate(keep: Sequence[str], calibration: str) -> Path:
        return work / f"{calibration}.keep{len(keep)}{quantizer.suffix}"

    def trial(keep: list[str], layers: int, calibration: str) -> dict[str, Any]:
        quantizer.quantize(src, candidate(keep, calibration), keep, calibration)
        figures = figures_of(check_entry(candidate(keep, calibration), quantizer.backend, None, tuning, labels,
                                       tolerance))
        figures.update(layers=layers, calibration=calibration, seconds=round(time.perf_counter() - started, 1))
        decided = f" (decided images {figures['decided_agreement']:.4f})" if "decided_agreement" in figures else ""
        log(f"  {quantizer.format:<14}{layers:>3} layers in FP32 ({calibration}): agreement "
            f"{figures['agreement']:.4f}{decided}, accuracy drop {figures['accuracy_drop']:+.4f}"
            f"{'  meets the target' if figures['passed'] else ''}")
        return figures

    try:
        plain: list[dict[str, Any]] = []
        for calibration in quantizer.calibrations:  # better calibration before any layer leaves INT8
            plain.append(trial([], 0, calibration))
            if (plain[-1]["passed"] and not quantizer.compare_all) or time.perf_counter() - started > target.max_seconds:
                break
        first = quantizer.calibrations[0]
        ranked = ranking.layers(candidate([], first) if quantizer.backend == "onnxruntime" else None)
        units = [[e.node, *e.companions] for e in ranked]  # keeping a Conv in FP32 keeps its Relu too
        passing = [t for t in plain if t["passed"]]
        chosen = min(passing, key=lambda t: t.get("margin_shift_q99", 0.0)) if passing else max(plain, key=_closeness)
        trials, best = [chosen], 0
        most = target.most_fp32_layers(len(units))
        if not chosen["passed"]:
            best = _search(quantizer.format, trials, units[:most],
                           lambda keep, layers: trial(keep, layers, chosen["calibration"]), target, started)
        keep = [name for unit in units[:best] for name in unit]
        made = candidate(keep, chosen["calibration"])
        for final, tmp in reversed(list(zip(quantizer.files(out), quantizer.files(made), strict=True))):
            shutil.copyfile(tmp, final)  # weights first: the entry file never names missing weights
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "target": asdict(target), "quantizer": quantizer.description, "calibration": chosen["calibration"],
        "plain": chosen, "calibrations": plain, "trials": trials[1:],
        "kept_fp32": keep, "kept_fp32_layers": best, "quantizable_layers": len(units),
        "most_fp32_layers": most, "met": any(t["passed"] for t in trials),
        "seconds": round(time.perf_counter() - started, 1),
        "ranked_by": ranking.description,
        "judged_on": f"{len(tuning)} tuning images from the training side with {quantizer.backend}",
        "tuning_images": len(tuning),
        "tuning_sha256": hashlib.sha256(np.ascontiguousarray(tuning.images).tobytes()).hexdigest(),
        "layers": [e.to_dict() | {"kept_fp32": i < best} for i, e in enumerate(ranked[:max(REPORTED_LAYERS, best)])],
    }


def _closeness(trial: dict[str, Any]) -> tuple[float, float, float]:
    """Order of trials that miss the target: what the gate judges first (agreement on decided
    images, then the paired test's p-value), then all-image agreement."""
    return (trial.get("decided_agreement", trial["agreement"]), trial.get("paired_p_value", 0.0),
            trial["agreement"])


def _search(fmt: str, trials: list[dict], units: list[list[str]], trial, target: Int8Target,
            started: float) -> int:
    """How many of the ranked layers to keep in FP32: doubling until the target is met, then
    bisection; returns the smallest count that met it, or the best tried when none did."""
    def budget_left() -> bool:
        return len(trials) - 1 < target.max_trials and time.perf_counter() - started < target.max_seconds

    def run(count: int) -> bool:
        trials.append(trial([name for unit in units[:count] for name in unit], count))
        return trials[-1]["passed"]

    if not units:  # the cap allows no layer in FP32
        log(f"  {fmt:<14}no layer may be kept in FP32 (max_fp32_share); keeping plain INT8")
        return 0
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
    log(f"  {fmt:<14}no trial met the target within {target.max_trials} trials / {target.max_seconds:.0f} s "
        f"/ {len(units)} layers in FP32 ({target.max_fp32_share:.0%} of the quantizable ones); keeping the best "
        f"one found")
    best = max(trials, key=_closeness)
    return best.get("layers", 0)
