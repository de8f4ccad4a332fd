"""The bundle: the directory contract between train, export and runtime.

``bundle.json`` describes one trained model: its labels (class index -> integer), the
input it takes, the preprocessing, the backbone, how it was trained, its metrics and
(after export) its artifacts. This module reads and writes it and imports nothing
heavy, so the device runtime can use it too.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from edgeclf.errors import BundleError
from edgeclf.limits import is_int
from edgeclf.fsio import atomic_write_json, read_json, remove_stale_temporaries, sha256_file, storage_errors

BUNDLE_FORMAT = "edgeclf-bundle/1"
BUNDLE_FILE = "bundle.json"
#: bundle.json holds records of kilobytes each (artifacts, per-machine checks, benchmarks); far more is not one
#: edgeclf wrote, and is refused before it is read.
MAX_BUNDLE_JSON_BYTES = 16 << 20
MODEL_FILE = "model.keras"
CONFUSION_PNG = "confusion_matrix.png"

_REQUIRED_KEYS = ("format", "labels", "input", "preprocessing", "backbone")
#: Held while bundle.json is read-modified-written (fcntl/flock: released if the holder dies).
LOCK_FILE = ".bundle.lock"
LOCK_TIMEOUT_S = 300
ARTIFACT_STATUSES = ("validated", "failed-validation", "unvalidated")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PENDING = re.compile(r"^\.(?P<stem>.+)\.(?P<sha>[0-9a-f]{16})\.pending(?P<suffix>\.[^.]*)?$")


@dataclass
class Bundle:
    """A bundle directory and its parsed ``bundle.json``."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[int]:
        """Class index -> integer; decoding is ``labels[argmax(logits)]``."""
        return list(self.meta["labels"])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the model takes."""
        return int(self.meta["input"]["height"]), int(self.meta["input"]["width"])

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        """Read and check a bundle directory.

        Raises:
            BundleError: the directory or its ``bundle.json`` is missing, not JSON, of
                another format version, or lacks a required key.
        """
        path = Path(path)
        meta_path = path / BUNDLE_FILE
        if not path.is_dir():
            raise BundleError(f"bundle directory not found. Received: {path}")
        if not meta_path.is_file():
            raise BundleError(
                f"not an edgeclf bundle: the directory has no {BUNDLE_FILE} "
                f"(create one with `edgeclf train DATA --out DIR`). Received: {path}"
            )
        try:
            meta = read_json(meta_path, MAX_BUNDLE_JSON_BYTES)
        except ValueError as exc:  # too large, too many values, not JSON: not a record edgeclf wrote
            raise BundleError(f"bundle.json is corrupt: {exc}. Received: {meta_path}") from None
        except OSError as exc:  # a directory named bundle.json, no permission, a symlink loop
            raise BundleError(f"cannot read {meta_path}: {exc.strerror or exc}") from None
        if not isinstance(meta, dict):
            raise BundleError(f"{meta_path} must hold a JSON object. Received: {type(meta).__name__}")
        if meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(
                f"{meta_path} has format {meta.get('format')!r}; this edgeclf reads "
                f"{BUNDLE_FORMAT!r}. Re-create the bundle with this version of edgeclf."
            )
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
        if missing:
            raise BundleError(f"{meta_path} lacks required keys {missing}. Received keys: {sorted(meta)}")
        labels = meta["labels"]
        if (
            not isinstance(labels, list)
            or len(labels) < 2
            or not all(is_int(v) for v in labels)
            or labels != sorted(set(labels))
        ):
            raise BundleError(
                f"{meta_path}: 'labels' must be a sorted list of at least two distinct integers. "
                f"Received: {labels!r}"
            )
        spec = meta["input"]
        if not isinstance(spec, dict) or not all(
            isinstance(spec.get(k), int) and spec[k] > 0 for k in ("height", "width", "channels")
        ):
            raise BundleError(
                f"{meta_path}: 'input' must give positive integer height, width and channels. "
                f"Received: {spec!r}"
            )
        check_schema(meta, meta_path)
        return cls(path=path, meta=meta)

    def save(self) -> None:
        """Write ``bundle.json`` atomically. Writers that read first use :func:`update_bundle`."""
        atomic_write_json(self.path / BUNDLE_FILE, self.meta)

    def inside(self, name: Any, field_name: str = "file") -> Path:
        """``self.path / name``, refused unless it stays inside the bundle.

        Raises:
            BundleError: ``name`` is absolute, climbs out with ``..``, or resolves (through a
                symlink) outside the bundle directory, or through a symlink loop.
        """
        if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
            raise BundleError(f"bundle.json: {field_name} must be a file name inside the bundle. Received: {name!r}")
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise BundleError(f"bundle.json: {field_name} must be a file name inside the bundle, not a path "
                              f"out of it. Received: {name!r}")
        full = self.path / relative
        try:
            resolved, root = full.resolve(), self.path.resolve()
        except (RuntimeError, OSError) as exc:  # 3.11 raises RuntimeError on a loop, later versions ELOOP
            raise BundleError(f"{full}: symlink loop ({exc}); bundle.json's {field_name} must name a file") from None
        if not resolved.is_relative_to(root):
            raise BundleError(f"bundle.json: {field_name} {name!r} resolves to {resolved}, outside the bundle "
                              f"{root}; artifacts must be files inside their bundle")
        return full


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expect(ok: bool, meta_path: Path, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise BundleError(f"{meta_path}: field {name!r} must be {expected}. Received: {_short(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_schema(meta: dict[str, Any], meta_path: Path) -> None:
    """Every field a reader relies on has the type it expects, or one BundleError names the field.

    Hand-written rather than jsonschema: bundle.json is read on the device, where the
    runtime installs only numpy and Pillow, and these few rules fit in this function.
    """
    model = meta.get("model")
    if model is not None:
        _expect(isinstance(model, dict), meta_path, "model", "an object", model)
        if "sha256" in model:
            _expect(isinstance(model["sha256"], str) and bool(_SHA256.match(model["sha256"])), meta_path,
                    "model.sha256", "a sha256 (64 lower-case hex digits)", model["sha256"])
    artifacts = meta.get("artifacts", {})
    _expect(isinstance(artifacts, dict), meta_path, "artifacts", "an object of format -> record", artifacts)
    for fmt, record in artifacts.items():
        where = f"artifacts.{fmt}"
        _expect(isinstance(record, dict), meta_path, where, "an object (the artifact record)", record)
        for key in ("file", "sha256", "size_bytes"):
            _expect(key in record, meta_path, f"{where}.{key}", "present", "nothing")
        for key in ("file", "weights_file"):
            if key in record:
                _expect(isinstance(record[key], str) and bool(record[key]), meta_path, f"{where}.{key}",
                        "a file name", record[key])
        for key in ("sha256", "weights_sha256"):
            if key in record:
                _expect(isinstance(record[key], str) and bool(_SHA256.match(record[key])), meta_path,
                        f"{where}.{key}", "a sha256 (64 lower-case hex digits)", record[key])
        for key in ("size_bytes", "weights_size_bytes"):
            if key in record:
                _expect(is_int(record[key]) and record[key] >= 0, meta_path, f"{where}.{key}",
                        "a non-negative integer", record[key])
        _expect(("weights_file" in record) == ("weights_sha256" in record), meta_path, f"{where}.weights_sha256",
                "given together with weights_file", record.get("weights_sha256"))
        if "status" in record:
            _expect(record["status"] in ARTIFACT_STATUSES, meta_path, f"{where}.status",
                    f"one of {list(ARTIFACT_STATUSES)}", record["status"])
        for key in ("format", "precision"):
            if key in record:
                _expect(isinstance(record[key], str), meta_path, f"{where}.{key}", "a string", record[key])
        for key in ("validation", "tensorrt", "target", "profile", "calibration"):
            if key in record:
                _expect(isinstance(record[key], dict), meta_path, f"{where}.{key}", "an object", record[key])
    benchmarks = meta.get("benchmarks")
    if benchmarks is not None:
        _expect(isinstance(benchmarks, dict), meta_path, "benchmarks", "an object", benchmarks)
        runs = {"benchmarks": benchmarks}  # a bundle from before machine keys: one run, no key
        machines = benchmarks.get("machines", {})
        _expect(isinstance(machines, dict), meta_path, "benchmarks.machines", "an object of machine -> run",
                machines)
        for key, run in machines.items():
            _expect(isinstance(run, dict), meta_path, f"benchmarks.machines.{key}", "an object", run)
            runs[f"benchmarks.machines.{key}"] = run
        for where, run in runs.items():
            _check_rows(run.get("rows", []), meta_path, f"{where}.rows")
    _check_verification(meta, meta_path)


def _check_verification(meta: dict[str, Any], meta_path: Path) -> None:
    """The verification set's record and the per-machine check results ``auto`` reads."""
    vset = meta.get("verification_set")
    if vset is not None:
        _expect(isinstance(vset, dict), meta_path, "verification_set", "an object", vset)
        _expect(isinstance(vset.get("file"), str) and bool(vset["file"]), meta_path, "verification_set.file",
                "a file name", vset.get("file"))
        _expect(isinstance(vset.get("sha256"), str) and bool(_SHA256.match(vset["sha256"])), meta_path,
                "verification_set.sha256", "a sha256 (64 lower-case hex digits)", vset.get("sha256"))
        _expect(is_int(vset.get("size_bytes")) and vset["size_bytes"] >= 0, meta_path,
                "verification_set.size_bytes", "a non-negative integer", vset.get("size_bytes"))
    verified = meta.get("verified")
    if verified is None:
        return
    _expect(isinstance(verified, dict), meta_path, "verified", "an object", verified)
    machines = verified.get("machines", {})
    _expect(isinstance(machines, dict), meta_path, "verified.machines", "an object of machine -> results", machines)
    for key, here in machines.items():
        _expect(isinstance(here, dict) and isinstance(here.get("results", {}), dict), meta_path,
                f"verified.machines.{key}", "an object with results", here)
        for entry, result in here.get("results", {}).items():
            where = f"verified.machines.{key}.results.{entry}"
            _expect(isinstance(result, dict), meta_path, where, "an object", result)
            _expect(isinstance(result.get("passed"), bool), meta_path, f"{where}.passed", "true or false",
                    result.get("passed"))
            _expect(isinstance(result.get("artifact_sha256"), str), meta_path, f"{where}.artifact_sha256",
                    "a sha256", result.get("artifact_sha256"))


def _check_rows(rows: Any, meta_path: Path, where_rows: str) -> None:
    """The benchmark row fields ``auto`` reads."""
    _expect(isinstance(rows, list), meta_path, where_rows, "a list", rows)
    fields = (("artifact", lambda v: v is None or isinstance(v, str), "a string or null"),
              ("batch", is_int, "an integer"),
              ("p50_ms", lambda v: v is None or _is_number(v), "a number or null"),
              ("agreement", lambda v: v is None or _is_number(v), "a number or null"),
              ("status", lambda v: isinstance(v, str), "a string"),
              ("precision_hint", lambda v: v is None or isinstance(v, str), "a string or null"))
    for i, row in enumerate(rows):
        where = f"{where_rows}[{i}]"
        _expect(isinstance(row, dict), meta_path, where, "an object", row)
        for key, ok, expected in fields:
            if key in row:
                _expect(ok(row[key]), meta_path, f"{where}.{key}", expected, row[key])


@contextlib.contextmanager
def bundle_lock(path: str | Path) -> Iterator[None]:
    """Hold the bundle's lock: one read-modify-write of bundle.json at a time, across processes.

    Raises:
        BundleError: another process has held it for LOCK_TIMEOUT_S seconds.
        StorageError: the lock file cannot be created (a read-only bundle).
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(Path(path) / LOCK_FILE), timeout=LOCK_TIMEOUT_S)
    try:
        with storage_errors(Path(path) / LOCK_FILE):
            lock.acquire()
    except Timeout:
        raise BundleError(f"{path} is locked by another edgeclf process (export, bench) for over "
                          f"{LOCK_TIMEOUT_S} s; wait for it to finish, then run again") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def update_bundle(path: str | Path) -> Iterator[Bundle]:
    """Read-modify-write bundle.json under the lock: yields the bundle as it is now on disk,
    and saves it when the block succeeds. Concurrent writers each keep their changes."""
    with bundle_lock(path):
        bundle = Bundle.load(path)
        yield bundle
        bundle.save()


@dataclass(frozen=True)
class ArtifactFiles:
    """The files that hold an artifact now: its entry file, and an OpenVINO IR's weights."""

    entry: Path
    weights: Path | None = None


def pending_path(final: Path, sha256: str) -> Path:
    """Where a committed artifact file waits until it is renamed onto ``final``.

    Named by content, so a reader finds it from the record alone: see :func:`commit_artifact`.
    """
    return final.with_name(f".{final.stem}.{sha256[:16]}.pending{final.suffix}")


def _record_parts(bundle: Bundle, record: dict[str, Any]) -> list[tuple[Path, str, int | None]]:
    """(final path, sha256, size) of each file of an artifact record; paths checked to stay inside.

    The size is None for the two files of an IR recorded before ``weights_size_bytes`` was
    (only their total is known)."""
    weights_size = record.get("weights_size_bytes")
    entry_size = record["size_bytes"] - weights_size if weights_size is not None else None
    parts = [(bundle.inside(record["file"], "file"), record["sha256"],
              record["size_bytes"] if "weights_file" not in record else entry_size)]
    if "weights_file" in record:
        parts.append((bundle.inside(record["weights_file"], "weights_file"), record["weights_sha256"], weights_size))
    return parts


def _matches(path: Path, sha256: str, size: int | None, total: int) -> str | None:
    """Why ``path`` is not the recorded file, or None. The size is compared before hashing:
    a file of the wrong size (a 1 TB sparse file) is refused without being read."""
    if not path.is_file():
        return f"{path} is missing (or not a regular file); bundle.json records it as an artifact"
    actual_size = path.stat().st_size
    if (size is not None and actual_size != size) or actual_size > total:
        return (f"{path.name} is {actual_size} bytes, bundle.json records {size if size is not None else total}"
                f"{'' if size is not None else ' for the whole artifact'}: it was truncated or altered; export again")
    actual = sha256_file(path)
    if actual != sha256:
        return (f"{path.name} differs from the file export validated (sha256 {actual[:12]}..., bundle.json says "
                f"{sha256[:12]}...): it was truncated or altered; export again")
    return None


def artifact_files(bundle: Bundle, record: dict[str, Any], verify: bool = True) -> ArtifactFiles:
    """The files to run for an artifact record, checked against it.

    Each file is the one under its recorded name or, when a re-export was interrupted
    after its record was committed, the pending copy that record names (see
    :func:`commit_artifact`).

    Raises:
        BundleError: a path leaves the bundle; a file is missing, of another size or sha256.
    """
    chosen: list[Path] = []
    for final, sha256, size in _record_parts(bundle, record):
        pending = pending_path(final, sha256)
        if not verify:
            chosen.append(pending if not final.is_file() and pending.is_file() else final)
            continue
        problem = _matches(final, sha256, size, record["size_bytes"])
        if problem is not None and pending.is_file() and _matches(pending, sha256, size, record["size_bytes"]) is None:
            problem, final = None, pending
        if problem is not None:
            raise BundleError(problem)
        chosen.append(final)
    return ArtifactFiles(chosen[0], chosen[1] if len(chosen) > 1 else None)


def artifact_present(bundle: Bundle, record: dict[str, Any]) -> bool:
    """Whether an artifact's entry file is there (under its name or pending); paths are checked."""
    final, sha256, _ = _record_parts(bundle, record)[0]
    return final.is_file() or pending_path(final, sha256).is_file()


def verify_model_file(bundle: Bundle) -> Path:
    """``model.keras``, checked against the sha256 bundle.json records for it.

    Raises:
        BundleError: the file is missing, or differs from the one training wrote.
    """
    model = bundle.meta.get("model") or {}
    path = bundle.inside(model.get("file", MODEL_FILE), "model.file")
    if not path.is_file():
        raise BundleError(f"bundle {bundle.path} has no {path.name}.")
    if "sha256" in model:
        actual = sha256_file(path)
        if actual != model["sha256"]:
            raise BundleError(f"{path.name} differs from the model training wrote (sha256 {actual[:12]}..., "
                              f"bundle.json says {model['sha256'][:12]}...): it was replaced or altered")
    return path


def commit_artifact(bundle_path: str | Path, fmt: str, record: dict[str, Any],
                    staged: list[tuple[Path, str, str]]) -> dict[str, Any] | None:
    """Put an artifact's new files and its record in force together.

    ``staged`` lists (built file, final name, sha256). Under the bundle's lock: each file
    becomes ``pending_path(final, sha256)``; bundle.json is saved with ``record`` (the
    commit point); then each pending file is renamed onto its final name. Killed before
    the save, the old record and files stay in force (the pending files are removed by
    the next :func:`recover_bundle`); killed after it, readers find the new files under
    their pending names until the next writer finishes the renames.

    A validated artifact is only replaced by a validated one, decided under the same lock:
    returns None when ``record`` was committed, or the validated record kept in force
    instead (the built files are then left where they are).
    """
    bundle_path = Path(bundle_path)
    with bundle_lock(bundle_path):
        bundle = Bundle.load(bundle_path)
        previous = bundle.meta.get("artifacts", {}).get(fmt) or {}
        if previous.get("status") == "validated" and record.get("status") != "validated":
            return previous
        moves = []
        for built, name, sha256 in staged:
            final = bundle.inside(name)
            pending = pending_path(final, sha256)
            with storage_errors(pending):
                os.replace(built, pending)
            moves.append((pending, final))
        bundle.meta.setdefault("artifacts", {})[fmt] = record
        bundle.save()
        for pending, final in moves:
            with storage_errors(final):
                os.replace(pending, final)
    return None


def recover_bundle(bundle_path: str | Path) -> list[str]:
    """Finish or undo what an interrupted writer left in the bundle (under its lock).

    Pending files a committed record names are renamed into place; pending files no
    record names, and temporaries of dead processes, are removed. Returns what was done.
    """
    bundle_path = Path(bundle_path)
    done: list[str] = []
    with bundle_lock(bundle_path):
        bundle = Bundle.load(bundle_path)
        wanted: set[str] = set()
        for record in (bundle.meta.get("artifacts") or {}).values():
            for final, sha256, _ in _record_parts(bundle, record):
                pending = pending_path(final, sha256)
                if pending.is_file():
                    with storage_errors(final):
                        os.replace(pending, final)
                    done.append(f"finished {final.name}")
                wanted.add(pending.name)
        for entry in bundle.path.iterdir():
            if _PENDING.match(entry.name) and entry.name not in wanted and entry.is_file():
                entry.unlink()
                done.append(f"removed {entry.name}")
        done += [f"removed {p.name}" for p in remove_stale_temporaries(bundle.path)]
    return done
