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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def run_bench(bundle_path: str | Path, config: BenchConfig | None = None) -> dict[str, Any]:
    """Benchmark the bundle's artifacts; returns {"environment", "config", "rows", "created"}."""
    config = config or BenchConfig()
    bundle = Bundle.load(bundle_path)
    check_package(bundle)  # a device package: every file as packed, as verify checks it
    entries = contestants(bundle, config)
    # By default where TensorFlow is installed and the model is there (a device package has no model.keras).
    baselines_wanted = _tensorflow_here() and bundle.model_path.is_file() if config.baselines is None \
        else config.baselines
    if baselines_wanted and not _tensorflow_here():
        raise BackendUnavailableError("the Keras baselines need TensorFlow, which is not installed here: "
                                      "pip install 'edgeclf[train]', or bench without them (--no-baselines)")
    heldout = _reference(bundle)
    env = environment()
    machine = env["machine"]["key"]  # every row says which machine measured it
    table = np.asarray(bundle.labels)
    keras_labels = table[heldout.logits.argmax(axis=1)]
    accuracy_keras = float(np.mean(keras_labels == heldout.values))
    log(f"{len(heldout)} verification images; Keras accuracy {accuracy_keras:.4f}"
        + ("" if baselines_wanted else " (from the stored reference: no TensorFlow baselines)"))

    predictors: dict[str, Predictor] = {}
    info: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for name, artifact, hint in entries:
        log(f"loading {name}")
        before = _rss_mb()
        try:
            started = time.perf_counter()
            predictor = Predictor.load(bundle.path, artifact, precision=hint, threads=config.threads)
            load_s = time.perf_counter() - started
            labels = np.asarray([p.label for p in predictor.predict_batch(heldout.images)])
        except Exception as exc:  # one backend that cannot start must not stop the others
            failed[name] = f"{type(exc).__name__}: {exc}"
            log(f"  {name} failed: {failed[name]}")
            continue
        predictors[name] = predictor
        record = bundle.meta["artifacts"][artifact]
        info[name] = {
            "artifact": artifact, "backend": predictor.describe()["backend"],
            "precision": hint or record["precision"], "precision_hint": hint, "load_s": load_s,
            "memory_mb": max(0.0, _rss_mb() - before), "size_mb": record["size_bytes"] / 1e6,
            "accuracy": float(np.mean(labels == heldout.values)), "agreement": float(np.mean(labels == keras_labels)),
            **_fp32_layers(record),
        }

    baselines: dict[str, Any] = {}
    if baselines_wanted:
        import tensorflow as tf

        from edgeclf.train.evaluate import load_keras_model

        model = load_keras_model(bundle)

        serve = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        baselines = {PREDICT: lambda x: model.predict(x, verbose=0),
                     TF_FUNCTION: lambda x: serve(tf.constant(x)).numpy()}
        for name in baselines:
            info[name] = {"artifact": None, "backend": "keras", "precision": "fp32", "precision_hint": None,
                          "accuracy": accuracy_keras, "agreement": 1.0,
                          "size_mb": bundle.model_path.stat().st_size / 1e6}

    sample = sample_image_file(bundle)
    rows: list[dict[str, Any]] = []
    for batch_size in config.batches:
        batch = heldout.images[np.arange(batch_size) % len(heldout)]
        floats = batch.astype(np.float32)
        fns: dict[str, Any] = {}
        for name, predictor in predictors.items():
            fns[f"{name}|raw"] = lambda p=predictor: p.backend.infer(batch)
            fns[f"{name}|predictor"] = lambda p=predictor: p.predict_batch(batch)
        for name, fn in baselines.items():
            fns[f"{name}|raw"] = lambda f=fn: f(floats)
        if sample is not None:
            size = bundle.image_size
            fns[f"{DECODE}|raw"] = lambda: [load_image(sample, size) for _ in range(batch_size)]
        scorer = next((p for p in predictors.values() if p.scores_familiarity), None)
        if scorer is not None:  # the same numpy work whichever artifact gave the embeddings
            embedding = scorer.infer_outputs(batch)[1]
            fns[f"{FAMILIARITY}|raw"] = lambda: scorer.trust.familiarity.p_values(embedding)
        log(f"timing batch {batch_size}: {len(fns)} calls interleaved for {config.duration_s:.0f} s")
        errors: dict[str, str] = {}
        timings = time_interleaved(fns, config.warmup_s, config.duration_s, config.min_runs, errors=errors,
                                   group=lambda key: key.split("|")[0])
        auxiliary = {DECODE: "Pillow", FAMILIARITY: "numpy"}
        for name in [*predictors, *baselines, *(n for n in AUXILIARY if f"{n}|raw" in fns)]:
            row: dict[str, Any] = {"name": name, "batch": batch_size, "machine": machine,
                                   **info.get(name, {"backend": auxiliary.get(name), "artifact": None})}
            error = errors.get(f"{name}|raw") or errors.get(f"{name}|predictor")
            if error:
                rows.append({**row, "status": "failed", "error": error})
                continue
            stats = timings[f"{name}|raw"].stats()
            row.update(status="ok", **stats, throughput_ips=timings[f"{name}|raw"].throughput(batch_size))
            if f"{name}|predictor" in timings:
                pstats = timings[f"{name}|predictor"].stats()
                row.update(predictor_p50_ms=pstats["p50_ms"], predictor_p99_ms=pstats["p99_ms"],
                           overhead_pct=100.0 * (pstats["p50_ms"] - stats["p50_ms"]) / stats["p50_ms"])
            rows.append(row)
        for name, error in failed.items():
            rows.append({"name": name, "batch": batch_size, "machine": machine, "status": "failed", "error": error,
                         "artifact": dict((n, a) for n, a, _ in entries)[name]})
    whole_path = end_to_end(predictors, config, machine) if config.end_to_end and predictors else None
    for predictor in predictors.values():
        predictor.close()
    _speedups(rows)
    _familiarity_shares(rows)
    macs = None
    onnx_record = bundle.meta.get("artifacts", {}).get("onnx")
    if onnx_record is not None:
        from edgeclf.benchmarks.macs import count_macs

        try:
            macs = count_macs(artifact_files(bundle, onnx_record).entry)  # the recorded file, inside the bundle
        except (BundleError, ImportError) as exc:  # the onnx package is not part of a device install
            log(f"no MAC count ({exc}): counting reads the ONNX graph with the onnx package")
    return {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": env, "bundle": str(bundle.path), "macs_per_image": macs,
            "image_size": list(bundle.image_size), "heldout_images": len(heldout),
            "config": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                       for k, v in config.__dict__.items()},
            "rows": rows, "end_to_end": whole_path}


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
