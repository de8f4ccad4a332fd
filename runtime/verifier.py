"""``edgeclf verify``: check a bundle's artifacts on the machine that runs them, without TensorFlow.

Numerics depend on the CPU (an INT8 artifact exact on a VNNI workstation can saturate on
an AVX2 device), so an artifact validated at export is checked again where it runs: each
chosen entry is loaded by the Predictor, run on the bundle's verification set and
compared with the Keras reference logits, against the tolerances export used. Results
are stored in bundle.json under this machine's fingerprint; ``auto`` reads them (BF16
runs only once it has passed here).

    >>> from edgeclf.runtime import verify
    >>> report = verify("runs/demo/bundle", "all")
    >>> report.passed
    True
"""

from __future__ import annotations

import datetime as _dt
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.bundle import BUNDLE_FILE, Bundle, update_bundle
from edgeclf.decoding import check_decoding
from edgeclf.pack import check_package
from edgeclf.errors import BackendUnavailableError, BundleError, EdgeclfError, InvalidInputError
from edgeclf.formats import FORMATS, entries, entry_name
from edgeclf.limits import is_int
from edgeclf.progress import log
from edgeclf.runtime.backends import BACKENDS, runs_here
from edgeclf.runtime.trust_checks import trust_checks
from edgeclf.trust_file import Trust
from edgeclf.runtime.checks import TOLERANCES, Tolerance, artifact_outputs, compare, measurable_check, tolerance_for
from edgeclf.runtime.fidelity import clopper_pearson_lower
from edgeclf.runtime.fingerprint import fingerprint, machine_key
from edgeclf.runtime.hardware import Hardware, detect
from edgeclf.verification import VerificationSet, load_verification_set


@dataclass(frozen=True)
class Entry:
    """One way to run an artifact: its format and, for run-time precisions, the hint."""

    format: str
    hint: str | None = None

    @property
    def name(self) -> str:
        return entry_name(self.format, self.hint)

    @property
    def precision(self) -> str:
        return self.hint or FORMATS[self.format].precision


@dataclass
class VerifyReport:
    bundle: Path
    machine: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # entry name -> result
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r["passed"] for r in self.results.values())

    def failures(self) -> list[str]:
        """"onnx-int8: top-1 agreement 0.7812 < 0.95" for each failed check (or error)."""
        out = []
        for name, result in self.results.items():
            if "error" in result:
                out.append(f"{name}: {result['error']}")
            for check in result.get("checks", []):
                if not check["passed"]:
                    out.append(f"{name}: {check['check']} {_figure(check['value'])} "
                               f"(limit {_figure(check['limit'])})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle), "machine": self.machine, "passed": self.passed,
                "seconds": round(self.seconds, 2), "results": self.results}


def _figure(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def check_entry(path: Path, backend: str, hint: str | None, reference: VerificationSet,
                labels: list[int], tolerance: Tolerance, decoding: str = "argmax",
                trust: Trust | None = None, embedding_offset: np.ndarray | None = None) -> dict[str, Any]:
    """Load ``path`` (a bundle entry or a lone artifact file) exactly as the Predictor runs it,
    run it on the verification set and compare with the Keras logits (``decoding`` "median":
    the answers decoded by median too). With a trust file (``trust``, else the bundle's), the
    artifact's familiarity is checked too (:mod:`edgeclf.runtime.trust_checks`); an artifact
    without an ``embedding`` output (exported before it had one) is reported so, not failed.
    ``embedding_offset``: the artifact's, where ``path`` is a lone file (export's staged artifact).

    Raises:
        EdgeclfError: the artifact cannot be loaded (altered, built for another machine,
            its backend missing).
    """
    from edgeclf.runtime.predictor import Predictor

    with Predictor.load(path, backend, precision=hint, allow_unvalidated=True) as predictor:
        trust = trust or predictor.trust
        if embedding_offset is not None:
            predictor.embedding_offset = np.asarray(embedding_offset, dtype=np.float32)
        with_embedding = trust is not None and "embedding" in (getattr(predictor.backend, "graph", None) or {}).get(
            "outputs", ())
        logits, label_out, embedding = artifact_outputs(predictor, reference.images, with_embedding)
        report = compare(hint or "fp32", logits, label_out, reference.logits, reference.values, labels, tolerance,
                         decoding)
        if with_embedding:
            index = np.searchsorted(np.asarray(labels), reference.values)
            checks, figures = trust_checks(predictor, trust, reference.images,
                                           logits, index, embedding)
            report["checks"].extend(checks)
            report["trust"] = figures
            report["passed"] = all(c["passed"] for c in report["checks"])
        elif trust is not None:
            report["trust"] = {"skipped": "the artifact has no embedding output (exported before it had one): "
                                          "no familiarity here; re-export to add it"}
        described = predictor.describe()
    report["run_by"] = {k: v for k, v in described.items()
                        if k not in ("labels", "input", "reason", "hardware", "trust")}
    return report


def _no_backend_here(bundle: Bundle, formats: list[str]) -> BackendUnavailableError:
    extras = sorted({BACKENDS[FORMATS[f].backend].extra for f in formats})
    return BackendUnavailableError(
        f"no backend installed here can run the artifacts of {bundle.path} ({', '.join(formats) or 'none'}); "
        f"install one: " + ", ".join(f"pip install 'edgeclf[{e}]'" for e in extras))


def select_entries(bundle: Bundle, backend: str, precision: str | None, hardware: Hardware) -> list[Entry]:
    """The entries ``backend`` ("auto", "all", a backend or a format name) stands for here.

    Raises:
        InvalidInputError: an unknown name or precision, or nothing of that precision.
        BackendUnavailableError: no backend installed here runs any chosen artifact.
        BundleError: "auto" finds nothing it would run.
    """
    if precision not in (None, *TOLERANCES):
        raise InvalidInputError(f"precision must be one of {list(TOLERANCES)}. Received: {precision!r}")
    artifacts = bundle.meta.get("artifacts", {})
    if backend == "auto":
        from edgeclf.runtime.predictor import Predictor

        with Predictor.load(bundle.path, "auto", precision=precision) as predictor:
            return [Entry(predictor.choice.format, predictor.choice.precision_hint)]
    if backend == "all":
        formats = list(FORMATS)
    elif backend in BACKENDS:
        formats = list(BACKENDS[backend].formats)
    elif backend in FORMATS:
        formats = [backend]
    else:
        raise InvalidInputError(f"--backend must be 'auto', 'all', a backend {list(BACKENDS)} or a format "
                                f"{list(FORMATS)}. Received: {backend!r}")
    # Failed artifacts are kept beside the bundle for inspection, never run: nothing to verify.
    present = [f for f in formats if f in artifacts and artifacts[f].get("status") != "failed-validation"]
    if not present:
        raise BundleError(f"{bundle.path} has no artifact for {backend!r} to verify (it has "
                          f"{ {f: r.get('status') for f, r in artifacts.items()} or 'none'}); export one with "
                          f"`edgeclf export {bundle.path}`")
    runnable = [f for f in present if runs_here(FORMATS[f].backend, hardware)]
    if not runnable:
        raise _no_backend_here(bundle, present)
    chosen = []
    for fmt in runnable:
        for name, hint in entries(fmt):
            # A run-time precision is tried where it is native (BF16: AMX or AVX512_BF16) or when asked for.
            wanted = (hint is None and precision in (None, FORMATS[fmt].precision)) or \
                (hint is not None and (precision == hint or (precision is None and hint == "bf16" and hardware.bf16)))
            if wanted:
                chosen.append(Entry(fmt, hint))
    if not chosen:
        raise InvalidInputError(f"no artifact of {bundle.path} runnable here is in {precision}; it has "
                                f"{ {f: artifacts[f].get('precision') for f in runnable} }")
    return chosen


def keras_accuracy(reference: VerificationSet, labels: list[int]) -> float:
    """The Keras model's accuracy on the verification set: its stored logits against its stored
    labels, computed as :func:`~edgeclf.runtime.checks.compare` computes ``accuracy_keras``."""
    table = np.asarray(labels, dtype=np.int64)
    return float(np.mean(table[reference.logits.argmax(axis=1)] == reference.values))


def check_labels_against_export(bundle: Bundle, reference: VerificationSet) -> None:
    """Refuse a verification set whose labels cannot give the Keras accuracy export measured on it.

    Every artifact export validated records ``accuracy_keras`` on the ``images`` it was validated
    on: the stored logits' accuracy against the stored labels. Shifted labels make Keras and the
    artifact equally wrong, so the accuracy checks would pass with "drop 0" while meaning nothing.
    Export draws the set as a prefix of one seeded permutation of the held-out split
    (:func:`~edgeclf.verification.sample_indices`), so sets of two sizes are nested, and the number
    the Keras model gets right on one bounds it on the other: on a set of that size it is the same
    number; on a subset of n of N images with R right, between n - (N - R) and R (and the other way
    round for a superset). With no record to compare, the set's Keras accuracy is compared with
    training's held-out accuracy and an implausible gap (outside the 99.9% Clopper-Pearson
    interval) is warned about: that comparison can only be statistical.

    Raises:
        BundleError: the set's Keras accuracy lies outside what a record of export allows.
    """
    n, here = len(reference), keras_accuracy(reference, bundle.labels)
    right = int(round(here * n))
    file = (bundle.meta.get("verification_set") or {}).get("file", "the verification set")
    recorded = 0
    for fmt, artifact in (bundle.meta.get("artifacts") or {}).items():
        validation = artifact.get("validation") if isinstance(artifact, dict) else None
        value = validation.get("accuracy_keras") if isinstance(validation, dict) else None
        size = validation.get("images") if isinstance(validation, dict) else None
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and is_int(size) and size >= 1):
            continue
        recorded += 1
        low, high = nested_right_bounds(int(round(value * size)), size, n)
        if not low <= right <= high:
            allowed = f"exactly {low}" if low == high else f"{low}..{high}"
            raise BundleError(f"{file}'s labels disagree with export: the Keras logits stored with them are right on "
                              f"{right} of its {n} images, but export measured {value:.4f} on {size} images drawn the "
                              f"same way (artifacts.{fmt}.validation.accuracy_keras), which allows {allowed} here: "
                              f"the labels or logits were changed after export, and accuracy checks against them "
                              f"would mean nothing; re-export the bundle. Received: Keras accuracy {here:.4f} on "
                              f"{n} images")
    if recorded:
        return
    heldout = ((bundle.meta.get("metrics") or {}).get("validation") or {}).get("accuracy")
    drawn = (bundle.meta.get("verification_set") or {}).get("drawn") or {}
    if isinstance(heldout, (int, float)) and str(drawn.get("from", "")).startswith("the held-out split"):
        low, high = clopper_pearson_lower(right, n, 0.9995), 1.0 - clopper_pearson_lower(n - right, n, 0.9995)
        if not low <= heldout <= high:
            warnings.warn(f"{file}'s labels give the Keras model {here:.4f} accuracy on its {n} images, but training "
                          f"measured {heldout:.4f} on the held-out split they were drawn from (99.9% interval of "
                          f"this set: {low:.4f}..{high:.4f}): its labels may have been changed; re-export the "
                          f"bundle if so", stacklevel=3)


def nested_right_bounds(right: int, size: int, n: int) -> tuple[int, int]:
    """How many of ``n`` images can be right when ``right`` of ``size`` nested with them are:
    a subset (n <= size) loses at most the size - n images it leaves out; a superset adds n - size."""
    if n <= size:
        return max(0, n - (size - right)), min(n, right)
    return right, right + (n - size)


def verify(path: str | Path, backend: str = "all", precision: str | None = None, *,
           record: bool = True, hardware: Hardware | None = None, allow_small_set: bool = False,
           decoding: str = "argmax") -> VerifyReport:
    """Check the bundle's artifacts here against its verification set; store the results.

    Args:
        backend: "all" (every artifact a backend here runs), "auto" (what the Predictor
            would pick), a backend name or an artifact format.
        precision: only entries of this precision ("fp32", "fp16", "int8", "bf16").
        record: store the results in bundle.json under this machine's fingerprint.
        allow_small_set: judge entries whose agreement target the set is too small to show
            (see below) instead of failing them; the check is kept, marked waived, with a warning.
        decoding: "median" checks the answers decoded by median as well (agreement with Keras's
            median, its accuracy kept); such results are stored as ``<entry>+median``, apart
            from the argmax results ``auto`` reads.

    An entry fails when the verification set cannot show its agreement target at all: if even
    every image (every decided image, for the INT8 and BF16 gate) agreeing leaves the one-sided
    95% lower bound of agreement below the target (0.99 needs 299 images), a pass would mean
    nothing; a 1-image set passed every check before.

    Raises:
        BundleError: not a bundle, no verification set (exported by an older edgeclf), or
            the set was altered (its labels no longer give the Keras accuracy export recorded).
        BackendUnavailableError: no backend installed here runs any chosen artifact.
    """
    started = time.perf_counter()
    path = Path(path)
    if not (path / BUNDLE_FILE).is_file():
        raise InvalidInputError(f"verify needs a bundle directory (it holds the verification set). Received: {path}")
    check_decoding(decoding)
    hw = hardware or detect()
    bundle = Bundle.load(path)
    check_package(bundle)  # a device package: every file as packed
    reference = load_verification_set(bundle)
    check_labels_against_export(bundle, reference)
    chosen = select_entries(bundle, backend, precision, hw)
    log(f"verifying {', '.join(e.name for e in chosen)} on {len(reference)} images ({hw.summary()})")
    report = VerifyReport(bundle.path, fingerprint(hw))
    waived: list[str] = []
    for entry in chosen:
        artifact = bundle.meta["artifacts"][entry.format]
        # The limits export checked this artifact against; a run-time precision has its own.
        tolerance = tolerance_for(entry.precision, artifact, entry.hint)
        result: dict[str, Any] = {"format": entry.format, "precision_hint": entry.hint,
                                  "artifact_sha256": artifact["sha256"], "by": "verify", "decoding": decoding}
        try:
            result.update(check_entry(bundle.path, entry.format, entry.hint, reference, bundle.labels, tolerance,
                                      decoding))
        except EdgeclfError as exc:  # one artifact that cannot run must not hide the others' results
            result.update(passed=False, error=f"{type(exc).__name__}: {exc}")
        if "checks" in result:  # whether these images can show the agreement target at all
            shown = measurable_check(tolerance, reference.logits, waive=allow_small_set)
            result["checks"].append(shown)
            result["passed"] = all(c["passed"] for c in result["checks"])
            if shown.get("waived"):
                waived.append(f"{entry.name} ({shown['limit']:g} on {shown['images']}, needs "
                              f"{shown['images_needed'] or 'infinitely many'})")
        name = entry.name if decoding == "argmax" else f"{entry.name}+{decoding}"
        report.results[name] = result
        log(f"  {name:<14} {'passed' if result['passed'] else 'FAILED'}")
    if waived:
        count = f"{len(reference)} image{'s' if len(reference) != 1 else ''}"
        warnings.warn(f"the verification set ({count}) is too small to show the agreement target of "
                      f"{', '.join(waived)} even if all agree (one-sided 95% bound); judged anyway "
                      f"(allow_small_set, --allow-small-set): a pass shows less than its target", stacklevel=2)
    report.seconds = time.perf_counter() - started
    if record:
        store_results(bundle.path, report.results, hw)
    return report


def store_results(bundle_path: str | Path, results: dict[str, dict[str, Any]], hardware: Hardware) -> None:
    """Merge ``results`` (entry name -> result) into bundle.json under this machine's key, under
    the lock: concurrent verify, bench and export runs keep each other's records."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with update_bundle(bundle_path) as bundle:
        machines = bundle.meta.setdefault("verified", {}).setdefault("machines", {})
        here = machines.setdefault(machine_key(hardware), {})
        here["machine"] = fingerprint(hardware)
        stored = here.setdefault("results", {})
        for name, result in results.items():
            stored[name] = {**result, "created": created}


def passed_here(bundle: Bundle, entry: str, hardware: Hardware) -> bool:
    """Whether ``entry`` passed its checks on this kind of machine, for the artifact now in force."""
    fmt = next((f for f in FORMATS for name, _ in entries(f) if name == entry), None)
    artifact = bundle.meta.get("artifacts", {}).get(fmt) if fmt else None
    here = ((bundle.meta.get("verified") or {}).get("machines") or {}).get(machine_key(hardware)) or {}
    result = (here.get("results") or {}).get(entry) or {}
    return bool(artifact and result.get("passed") is True and result.get("artifact_sha256") == artifact["sha256"])
