"""``edgeclf bench``: every backend side by side, with accuracy, in one run.

For each batch size, every contestant is timed *interleaved* (one call each, in turn):
each artifact's raw backend call and its whole ``Predictor`` call, decoding an image file,
scoring familiarity (:mod:`edgeclf.trust`) on a batch's embeddings, and, where TensorFlow
is installed, the Keras baselines (``model.predict`` per call, as the seed article
predicts, and the model under ``tf.function``). Interleaving keeps the ratios honest on a
noisy machine. Then the whole path from a camera's picture (benchmarks/end_to_end.py).
Accuracy and top-1 agreement with Keras come from the bundle's
verification set (held-out real images with the Keras logits), so bench runs on a
device without TensorFlow. A contestant that fails is recorded as a failed row; the
others carry on.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from edgeclf import limits
from edgeclf.benchmarks.end_to_end import end_to_end
from edgeclf.benchmarks.environment import environment
from edgeclf.benchmarks.timing import time_interleaved
from edgeclf.bundle import Bundle, artifact_files
from edgeclf.errors import BackendUnavailableError, BundleError, InvalidInputError
from edgeclf.images import IMAGE_EXTENSIONS, load_image
from edgeclf.pack import check_package
from edgeclf.progress import log
from edgeclf.runtime import Predictor
from edgeclf.runtime.backends import BACKENDS, runs_here
from edgeclf.runtime.hardware import detect
from edgeclf.runtime.selection import trusted_here
from edgeclf.verification import VerificationSet, load_verification_set

PREDICT = "keras model.predict"
TF_FUNCTION = "keras tf.function"
#: Rows that time a step beside the model rather than a model: decoding an image file with Pillow, and
#: scoring the familiarity of a batch's embeddings (numpy). Each model row gives the latter as a share of itself.
DECODE, FAMILIARITY = "decode", "familiarity"
AUXILIARY = (DECODE, FAMILIARITY)


@dataclass(frozen=True)
class BenchConfig:
    #: Artifact names (bundle.json); None: every validated artifact a backend here can run.
    artifacts: tuple[str, ...] | None = None
    batches: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 10.0  # timed seconds per batch size, all contestants together
    warmup_s: float = 2.0
    min_runs: int = 5
    threads: int | None = None
    #: Time the Keras model too; None: where TensorFlow is installed.
    baselines: bool | None = None
    #: Add OpenVINO BF16 (the FP32 IR with a BF16 hint); None: only on CPUs with AMX or AVX512_BF16.
    bf16: bool | None = None
    #: Time the whole path from a camera picture too (benchmarks/end_to_end.py).
    end_to_end: bool = True
    #: Camera JPEGs for it; None: pictures made there.
    images: Path | None = None
    #: Pictures predicted as one list (the folder row).
    folder_images: int = 200

    def __post_init__(self) -> None:
        if not self.batches:
            raise InvalidInputError(f"at least one batch size is needed. Received: {self.batches}")
        for batch in self.batches:
            limits.check("batch", batch, "batch size")
        limits.check("duration", self.duration_s, "duration")
        limits.check("warmup", self.warmup_s, "warm-up")
        if self.threads is not None:
            limits.check("threads", self.threads, "threads")
        if isinstance(self.min_runs, bool) or not isinstance(self.min_runs, int) or not 1 <= self.min_runs <= 10_000:
            raise InvalidInputError(f"min_runs must be an integer in 1..10000. Received: {self.min_runs!r}")
        limits.check("images", self.folder_images, "folder images")


def _rss_mb() -> float:
    """Resident memory of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def contestants(bundle: Bundle, config: BenchConfig) -> list[tuple[str, str, str | None]]:
    """(row name, artifact, precision hint) for every artifact to benchmark.

    Raises:
        InvalidInputError: an artifact the bundle lacks, or a batch size that would not fit in memory.
    """
    for batch in config.batches:
        limits.check_batch_memory(batch, bundle.image_size, "batch size")
    artifacts = bundle.meta.get("artifacts", {})
    if config.artifacts is not None:
        unknown = [a for a in config.artifacts if a not in artifacts]
        if unknown:
            raise InvalidInputError(f"the bundle has no artifact {unknown}; it has {list(artifacts)}")
        names = list(config.artifacts)
    else:
        names = [f for name, info in BACKENDS.items() if runs_here(name, detect()) for f in info.formats
                 if trusted_here(bundle, f, detect())]
    rows = [(name, name, None) for name in names]
    if "openvino" in names and (config.bf16 if config.bf16 is not None else detect().bf16):
        rows.append(("openvino-bf16", "openvino", "bf16"))
    return rows


def sample_image_file(bundle: Bundle) -> Path | None:
    """One of the bundle's training image files (to time decoding from disk), if it has any."""
    source = Path(str(bundle.meta["training"]["data"].get("source", "")))
    if source.is_dir():
        return next((p for p in sorted(source.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS), None)
    return None


#: The two calls timed per artifact: its backend's own call on a ready batch, and the whole Predictor call.
RAW, PREDICTOR = "raw", "predictor"


class _Call(NamedTuple):
    """One timed callable: the row it belongs to and its role there (RAW or PREDICTOR)."""

    name: str
    role: str


@dataclass
class _Lineup:
    """Everything timed: the loaded artifacts' predictors, the Keras baselines, each row's facts that do
    not depend on the batch size, and the artifacts that failed to load (their rows say why)."""

    predictors: dict[str, Predictor] = field(default_factory=dict)
    baselines: dict[str, Callable[[np.ndarray], Any]] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # row name -> artifact


def run_bench(bundle_path: str | Path, config: BenchConfig | None = None) -> dict[str, Any]:
    """Benchmark the bundle's artifacts; returns {"environment", "config", "rows", "created"}."""
    config = config or BenchConfig()
    bundle = Bundle.load(bundle_path)
    check_package(bundle)  # a device package: every file as packed, as verify checks it
    entries = contestants(bundle, config)
    baselines_wanted = _baselines_wanted(bundle, config)
    heldout = _reference(bundle)
    env = environment()
    machine = env["machine"]["key"]  # every row says which machine measured it
    keras_labels = np.asarray(bundle.labels)[heldout.logits.argmax(axis=1)]
    accuracy_keras = float(np.mean(keras_labels == heldout.values))
    log(f"{len(heldout)} verification images; Keras accuracy {accuracy_keras:.4f}"
        + ("" if baselines_wanted else " (from the stored reference: no TensorFlow baselines)"))
    lineup = _load(bundle, entries, heldout, keras_labels, config.threads)
    if baselines_wanted:
        _add_baselines(lineup, bundle, accuracy_keras)
    sample = sample_image_file(bundle)
    rows = [row for batch_size in config.batches
            for row in _time_batch(lineup, heldout, batch_size, bundle.image_size, sample, config, machine)]
    whole_path = end_to_end(lineup.predictors, config, machine) if config.end_to_end and lineup.predictors else None
    for predictor in lineup.predictors.values():
        predictor.close()
    _speedups(rows)
    _familiarity_shares(rows)
    return {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": env, "bundle": str(bundle.path), "macs_per_image": _macs(bundle),
            "image_size": list(bundle.image_size), "heldout_images": len(heldout),
            "config": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                       for k, v in config.__dict__.items()},
            "rows": rows, "end_to_end": whole_path}


def _baselines_wanted(bundle: Bundle, config: BenchConfig) -> bool:
    """Whether to time Keras: by default where TensorFlow is installed and the model is there (a device
    package has no model.keras).

    Raises:
        BackendUnavailableError: baselines asked for where TensorFlow is not installed.
    """
    if config.baselines is None:
        return _tensorflow_here() and bundle.model_path.is_file()
    if config.baselines and not _tensorflow_here():
        raise BackendUnavailableError("the Keras baselines need TensorFlow, which is not installed here: "
                                      "pip install 'edgeclf[train]', or bench without them (--no-baselines)")
    return config.baselines


def _load(bundle: Bundle, entries: list[tuple[str, str, str | None]], heldout: VerificationSet,
          keras_labels: np.ndarray, threads: int | None) -> _Lineup:
    """Each artifact's predictor, with its load time, memory, size and accuracy on the verification set;
    one that cannot start is recorded as failed and the others carry on."""
    lineup = _Lineup(artifacts={name: artifact for name, artifact, _ in entries})
    for name, artifact, hint in entries:
        log(f"loading {name}")
        before = _rss_mb()
        try:
            started = time.perf_counter()
            predictor = Predictor.load(bundle.path, artifact, precision=hint, threads=threads)
            load_s = time.perf_counter() - started
            labels = np.asarray([p.label for p in predictor.predict_batch(heldout.images)])
        except Exception as exc:  # one backend that cannot start must not stop the others
            lineup.failed[name] = f"{type(exc).__name__}: {exc}"
            log(f"  {name} failed: {lineup.failed[name]}")
            continue
        lineup.predictors[name] = predictor
        record = bundle.meta["artifacts"][artifact]
        lineup.info[name] = {
            "artifact": artifact, "backend": predictor.describe()["backend"],
            "precision": hint or record["precision"], "precision_hint": hint, "load_s": load_s,
            "memory_mb": max(0.0, _rss_mb() - before), "size_mb": record["size_bytes"] / 1e6,
            "accuracy": float(np.mean(labels == heldout.values)), "agreement": float(np.mean(labels == keras_labels)),
            **_fp32_layers(record),
        }
    return lineup


def _add_baselines(lineup: _Lineup, bundle: Bundle, accuracy_keras: float) -> None:
    """The Keras model as the seed article runs it (``model.predict`` per call) and under ``tf.function``."""
    import tensorflow as tf

    from edgeclf.train.evaluate import load_keras_model

    model = load_keras_model(bundle)
    serve = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    lineup.baselines = {PREDICT: lambda x: model.predict(x, verbose=0),
                        TF_FUNCTION: lambda x: serve(tf.constant(x)).numpy()}
    for name in lineup.baselines:
        lineup.info[name] = {"artifact": None, "backend": "keras", "precision": "fp32", "precision_hint": None,
                             "accuracy": accuracy_keras, "agreement": 1.0,
                             "size_mb": bundle.model_path.stat().st_size / 1e6}


def _calls(lineup: _Lineup, batch: np.ndarray, image_size: tuple[int, int],
           sample: Path | None) -> dict[_Call, Callable[[], Any]]:
    """Every callable timed at this batch: each artifact's RAW and PREDICTOR call, each baseline, decoding
    the sample image file, and scoring familiarity on the batch's embeddings."""
    floats = batch.astype(np.float32)
    calls: dict[_Call, Callable[[], Any]] = {}
    for name, predictor in lineup.predictors.items():
        calls[_Call(name, RAW)] = lambda p=predictor: p.backend.infer(batch)
        calls[_Call(name, PREDICTOR)] = lambda p=predictor: p.predict_batch(batch)
    for name, fn in lineup.baselines.items():
        calls[_Call(name, RAW)] = lambda f=fn: f(floats)
    if sample is not None:
        calls[_Call(DECODE, RAW)] = lambda: [load_image(sample, image_size) for _ in range(len(batch))]
    scorer = next((p for p in lineup.predictors.values() if p.scores_familiarity), None)
    if scorer is not None:  # the same numpy work whichever artifact gave the embeddings
        embedding = scorer.infer_outputs(batch)[1]
        calls[_Call(FAMILIARITY, RAW)] = lambda: scorer.trust.familiarity.p_values(embedding)
    return calls


def _time_batch(lineup: _Lineup, heldout: VerificationSet, batch_size: int, image_size: tuple[int, int],
                sample: Path | None, config: BenchConfig, machine: str) -> list[dict[str, Any]]:
    """The rows of one batch size: every call timed interleaved, a row per contestant."""
    batch = heldout.images[np.arange(batch_size) % len(heldout)]
    calls = _calls(lineup, batch, image_size, sample)
    log(f"timing batch {batch_size}: {len(calls)} calls interleaved for {config.duration_s:.0f} s")
    errors: dict[_Call, str] = {}
    timings = time_interleaved(calls, config.warmup_s, config.duration_s, config.min_runs, errors=errors,
                               group=lambda call: call.name)
    auxiliary = {DECODE: "Pillow", FAMILIARITY: "numpy"}
    rows: list[dict[str, Any]] = []
    for name in [*lineup.predictors, *lineup.baselines, *(n for n in AUXILIARY if _Call(n, RAW) in calls)]:
        raw, whole = _Call(name, RAW), _Call(name, PREDICTOR)
        row: dict[str, Any] = {"name": name, "batch": batch_size, "machine": machine,
                               **lineup.info.get(name, {"backend": auxiliary.get(name), "artifact": None})}
        error = errors.get(raw) or errors.get(whole)
        if error:
            rows.append({**row, "status": "failed", "error": error})
            continue
        stats = timings[raw].stats()
        row.update(status="ok", **stats, throughput_ips=timings[raw].throughput(batch_size))
        if whole in timings:
            pstats = timings[whole].stats()
            row.update(predictor_p50_ms=pstats["p50_ms"], predictor_p99_ms=pstats["p99_ms"],
                       overhead_pct=100.0 * (pstats["p50_ms"] - stats["p50_ms"]) / stats["p50_ms"])
        rows.append(row)
    rows += [{"name": name, "batch": batch_size, "machine": machine, "status": "failed", "error": error,
              "artifact": lineup.artifacts[name]} for name, error in lineup.failed.items()]
    return rows


def _macs(bundle: Bundle) -> int | None:
    """Multiply-accumulates per image, counted on the ONNX graph (None without it or the onnx package)."""
    onnx_record = bundle.meta.get("artifacts", {}).get("onnx")
    if onnx_record is None:
        return None
    from edgeclf.benchmarks.macs import count_macs

    try:
        return count_macs(artifact_files(bundle, onnx_record).entry)  # the recorded file, inside the bundle
    except (BundleError, ImportError) as exc:  # the onnx package is not part of a device install
        log(f"no MAC count ({exc}): counting reads the ONNX graph with the onnx package")
        return None


def _tensorflow_here() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def _reference(bundle: Bundle) -> VerificationSet:
    """The images accuracy and agreement are measured on, with the Keras logits: the bundle's
    verification set; for a bundle exported before it existed, the held-out images run
    through Keras (needs TensorFlow)."""
    if "verification_set" in bundle.meta or not _tensorflow_here():
        return load_verification_set(bundle)
    from edgeclf.export.reference import reference_sets
    from edgeclf.train.evaluate import load_keras_model, predict_logits

    log("no verification set in this bundle (exported by an older edgeclf): running Keras on the held-out images")
    _, heldout = reference_sets(bundle)
    logits = predict_logits(load_keras_model(bundle), heldout.images)
    return VerificationSet(heldout.images, np.asarray(heldout.values), logits)


def _fp32_layers(record: dict[str, Any]) -> dict[str, Any]:
    """How many of an INT8 artifact's quantizable layers its search kept in FP32 (none for others)."""
    q = record.get("quantization") or {}
    if "quantizable_layers" not in q:
        return {}
    return {"fp32_layers": q["kept_fp32_layers"], "quantizable_layers": q["quantizable_layers"]}


def _speedups(rows: list[dict[str, Any]]) -> None:
    """Each row's speed-up against the baselines of the same batch size (p50 against p50), and an
    INT8 or FP16 artifact's against the FP32 artifact of its backend (onnx-int8 against onnx)."""
    for batch_size in {r["batch"] for r in rows}:
        same = [r for r in rows if r["batch"] == batch_size and r["status"] == "ok"]
        refs = {r["name"]: r["p50_ms"] for r in same if r["name"] in (PREDICT, TF_FUNCTION, "onnx")}
        fp32 = {r["backend"]: r["p50_ms"] for r in same
                if r.get("precision") == "fp32" and r.get("artifact") == r["name"]}
        for row in same:
            if row["name"] in AUXILIARY:
                continue
            if row.get("precision") in ("int8", "fp16", "bf16") and row.get("backend") in fp32:
                row["speedup_vs_backend_fp32"] = fp32[row["backend"]] / row["p50_ms"]
            for ref, key in ((PREDICT, "speedup_vs_predict"), (TF_FUNCTION, "speedup_vs_tf_function"),
                             ("onnx", "speedup_vs_onnx_fp32")):
                if ref in refs:
                    row[key] = refs[ref] / row["p50_ms"]


def _familiarity_shares(rows: list[dict[str, Any]]) -> None:
    """Each artifact row's cost of scoring familiarity as a share of its own backend call (p50 against
    p50, same batch size): what a reading's trust adds to the model."""
    for batch_size in {r["batch"] for r in rows}:
        same = [r for r in rows if r["batch"] == batch_size and r["status"] == "ok"]
        score = next((r["p50_ms"] for r in same if r["name"] == FAMILIARITY), None)
        for row in same:
            if score is not None and row.get("artifact"):
                row["familiarity_pct"] = 100.0 * score / row["p50_ms"]
