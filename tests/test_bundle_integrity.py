"""bundle.json under hostile and concurrent use: schema, paths, locking, commit and recovery.

These need no model: artifact files here are plain bytes, which is all the integrity
checks look at (their sha256 and size).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys

import pytest

from edgeclf.bundle import (Bundle, artifact_files, commit_artifact, pending_path, recover_bundle, update_bundle,
                            verify_model_file)
from edgeclf.errors import BundleError
from tests.conftest import HANG_S


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def bundle_dir(tmp_path):
    """A bundle whose one artifact, model.onnx, is 1 kB of known bytes."""
    path = tmp_path / "bundle"
    path.mkdir()
    data = os.urandom(1024)
    (path / "model.onnx").write_bytes(data)
    (path / "model.keras").write_bytes(b"keras")
    meta = {"format": "edgeclf-bundle/1", "labels": [3, 4, 5], "backbone": "inception_v3",
            "input": {"height": 75, "width": 75, "channels": 3}, "preprocessing": {},
            "model": {"file": "model.keras", "sha256": _sha(b"keras")},
            "artifacts": {"onnx": {"file": "model.onnx", "sha256": _sha(data), "size_bytes": len(data),
                                   "status": "validated", "precision": "fp32"}}}
    (path / "bundle.json").write_text(json.dumps(meta))
    return path


def _edit(path, change) -> None:
    meta = json.loads((path / "bundle.json").read_text())
    change(meta)
    (path / "bundle.json").write_text(json.dumps(meta))


MALFORMED = {
    "record not an object": (lambda m: m["artifacts"].update(onnx="model.onnx"), "artifacts.onnx"),
    "record without file": (lambda m: m["artifacts"]["onnx"].pop("file"), "artifacts.onnx.file"),
    "record without sha256": (lambda m: m["artifacts"]["onnx"].pop("sha256"), "artifacts.onnx.sha256"),
    "file not a string": (lambda m: m["artifacts"]["onnx"].update(file=7), "artifacts.onnx.file"),
    "sha256 not hex": (lambda m: m["artifacts"]["onnx"].update(sha256="abc"), "artifacts.onnx.sha256"),
    "size negative": (lambda m: m["artifacts"]["onnx"].update(size_bytes=-1), "artifacts.onnx.size_bytes"),
    "size a string": (lambda m: m["artifacts"]["onnx"].update(size_bytes="1"), "artifacts.onnx.size_bytes"),
    "unknown status": (lambda m: m["artifacts"]["onnx"].update(status="trusted"), "artifacts.onnx.status"),
    "weights without sha": (lambda m: m["artifacts"]["onnx"].update(weights_file="w.bin"),
                            "artifacts.onnx.weights_sha256"),
    "artifacts a list": (lambda m: m.update(artifacts=[]), "artifacts"),
    "rows not a list": (lambda m: m.update(benchmarks={"rows": "fast"}), "benchmarks.rows"),
    "row p50 a string": (lambda m: m.update(benchmarks={"rows": [{"p50_ms": "1", "batch": 1}]}),
                         "benchmarks.rows[0].p50_ms"),
    "a machine's rows not a list": (lambda m: m.update(benchmarks={"machines": {"ab12": {"rows": {}}}}),
                                    "benchmarks.machines.ab12.rows"),
    "model sha not hex": (lambda m: m["model"].update(sha256=None), "model.sha256"),
    "tensorrt not an object": (lambda m: m["artifacts"]["onnx"].update(tensorrt="rtx"), "artifacts.onnx.tensorrt"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_malformed_field_is_one_bundle_error_naming_it(bundle_dir, case):
    change, field = MALFORMED[case]
    _edit(bundle_dir, change)
    with pytest.raises(BundleError, match=re.escape(f"field '{field}'")):
        Bundle.load(bundle_dir)


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "sub/../../x", "..", "a\\b"])
def test_artifact_paths_out_of_the_bundle_are_refused(bundle_dir, name):
    _edit(bundle_dir, lambda m: m["artifacts"]["onnx"].update(file=name))
    bundle = Bundle.load(bundle_dir)
    with pytest.raises(BundleError, match="inside the bundle"):
        artifact_files(bundle, bundle.meta["artifacts"]["onnx"])


def test_a_symlink_out_of_the_bundle_is_refused_even_with_the_right_sha256(bundle_dir, tmp_path):
    outside = tmp_path / "other.onnx"
    outside.write_bytes(b"another model")
    (bundle_dir / "model.onnx").unlink()
    (bundle_dir / "model.onnx").symlink_to(outside)
    _edit(bundle_dir, lambda m: m["artifacts"]["onnx"].update(sha256=_sha(b"another model"), size_bytes=13))
    bundle = Bundle.load(bundle_dir)
    with pytest.raises(BundleError, match="outside the bundle"):
        artifact_files(bundle, bundle.meta["artifacts"]["onnx"])
    (bundle_dir / "model.onnx").unlink()
    (bundle_dir / "model.onnx").symlink_to("model.onnx")  # a loop
    with pytest.raises(BundleError, match="symlink loop"):
        artifact_files(bundle, bundle.meta["artifacts"]["onnx"])


def test_weights_file_is_checked_like_file(bundle_dir):
    _edit(bundle_dir, lambda m: m["artifacts"]["onnx"].update(weights_file="../../w.bin", weights_sha256="0" * 64))
    bundle = Bundle.load(bundle_dir)
    with pytest.raises(BundleError, match="weights_file"):
        artifact_files(bundle, bundle.meta["artifacts"]["onnx"])


def test_size_is_compared_before_hashing_a_huge_sparse_file(bundle_dir):
    with open(bundle_dir / "model.onnx", "r+b") as fh:
        fh.truncate(1 << 40)  # 1 TB, sparse: hashing it would take hours
    bundle = Bundle.load(bundle_dir)
    with pytest.raises(BundleError, match=r"1099511627776 bytes, bundle.json records 1024"):
        artifact_files(bundle, bundle.meta["artifacts"]["onnx"])


def test_model_keras_is_checked_against_its_sha256(bundle_dir):
    assert verify_model_file(Bundle.load(bundle_dir)).name == "model.keras"
    (bundle_dir / "model.keras").write_bytes(b"another model")
    with pytest.raises(BundleError, match="differs from the model training wrote"):
        verify_model_file(Bundle.load(bundle_dir))


def _add_records(path: str, prefix: str, count: int) -> None:
    for i in range(count):
        with update_bundle(path) as bundle:
            bundle.meta.setdefault("notes", {})[f"{prefix}{i}"] = i


def test_concurrent_writers_keep_every_change(bundle_dir):
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_add_records, args=(str(bundle_dir), p, 25)) for p in "abc"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(HANG_S)
        assert w.exitcode == 0
    notes = Bundle.load(bundle_dir).meta["notes"]
    assert sorted(notes) == sorted(f"{p}{i}" for p in "abc" for i in range(25))


def _commit(bundle_dir, data: bytes, staged_name: str = "built.onnx"):
    staged = bundle_dir.parent / staged_name
    staged.write_bytes(data)
    record = {"file": "model.onnx", "sha256": _sha(data), "size_bytes": len(data), "status": "validated"}
    commit_artifact(bundle_dir, "onnx", record, [(staged, "model.onnx", record["sha256"])])
    return record


def test_commit_replaces_file_and_record_together(bundle_dir):
    record = _commit(bundle_dir, b"new model")
    bundle = Bundle.load(bundle_dir)
    assert bundle.meta["artifacts"]["onnx"] == record
    assert artifact_files(bundle, record).entry.read_bytes() == b"new model"
    assert not list(bundle_dir.glob(".*pending*"))


# What a writer killed inside commit_artifact leaves, and what readers and the next writer make of it.
_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from edgeclf import bundle as B
stage, real_replace = sys.argv[2], os.replace
def replace(src, dst):
    if sys.argv[3] == "before-save" and ".pending" in str(dst):
        os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[3] == "after-save" and ".pending" in str(src):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
data = b"new model"
Path(stage).write_bytes(data)
import hashlib
sha = hashlib.sha256(data).hexdigest()
B.commit_artifact(sys.argv[1], "onnx", {"file": "model.onnx", "sha256": sha, "size_bytes": len(data),
                                        "status": "validated"}, [(Path(stage), "model.onnx", sha)])
"""


@pytest.mark.parametrize("point, in_force", [("before-save", "old"), ("after-save", "new")])
def test_a_writer_killed_in_a_commit_leaves_old_or_new_in_force(bundle_dir, point, in_force):
    old = (bundle_dir / "model.onnx").read_bytes()
    out = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(bundle_dir), str(bundle_dir / "staged.onnx"),
                          point], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == -9, out.stderr
    expected = old if in_force == "old" else b"new model"
    bundle = Bundle.load(bundle_dir)
    record = bundle.meta["artifacts"]["onnx"]
    # Readers: the record in force and its bytes, without writing anything.
    assert artifact_files(bundle, record).entry.read_bytes() == expected
    # The next writer finishes (or drops) the interrupted commit and cleans up.
    recover_bundle(bundle_dir)
    assert (bundle_dir / "model.onnx").read_bytes() == expected
    assert artifact_files(Bundle.load(bundle_dir), record).entry == bundle_dir / "model.onnx"
    assert not list(bundle_dir.glob(".*pending*"))


def test_recovery_removes_what_dead_writers_left_and_spares_live_ones(bundle_dir):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale_dir = bundle_dir / f".export.{dead}.abc123.tmp"
    (stale_dir / ".tflite.xyz").mkdir(parents=True)  # an interrupted TFLite conversion inside it
    stale_file = bundle_dir / f".bundle.json.{dead}.q1w2e3.tmp"
    stale_file.write_text("{")
    live = bundle_dir / f".export.{os.getpid()}.def456.tmp"
    live.mkdir()
    orphan = pending_path(bundle_dir / "model.onnx", "f" * 64)  # no record names it
    orphan.write_bytes(b"x")
    recover_bundle(bundle_dir)
    assert not stale_dir.exists() and not stale_file.exists() and not orphan.exists()
    assert live.is_dir()
    Bundle.load(bundle_dir)


def test_benchmark_runs_of_several_machines_coexist(bundle_dir):
    from edgeclf.benchmarks.report import store_run

    def run(key: str, p50: float) -> dict:
        return {"created": "now", "config": {}, "environment": {"machine": {"key": key}},
                "rows": [{"artifact": "onnx", "batch": 1, "p50_ms": p50, "agreement": 1.0, "status": "ok"}]}

    for key, p50 in (("amx", 1.0), ("avx2", 9.0), ("amx", 2.0)):
        with update_bundle(bundle_dir) as bundle:
            store_run(bundle.meta, run(key, p50))
    benchmarks = Bundle.load(bundle_dir).meta["benchmarks"]
    assert benchmarks["latest"] == "amx" and sorted(benchmarks["machines"]) == ["amx", "avx2"]
    assert benchmarks["machines"]["amx"]["rows"][0]["p50_ms"] == 2.0  # a machine's newest run replaces its older one
    assert benchmarks["machines"]["avx2"]["rows"][0]["p50_ms"] == 9.0


def test_commit_never_trades_a_validated_artifact_for_one_that_is_not(bundle_dir):
    before = (bundle_dir / "model.onnx").read_bytes()
    record_before = Bundle.load(bundle_dir).meta["artifacts"]["onnx"]
    staged = bundle_dir.parent / "built.onnx"
    staged.write_bytes(b"failed build")
    record = {"file": "model.onnx", "sha256": _sha(b"failed build"), "size_bytes": 12, "status": "failed-validation"}
    kept = commit_artifact(bundle_dir, "onnx", record, [(staged, "model.onnx", record["sha256"])])
    assert kept == record_before and staged.read_bytes() == b"failed build"  # left for the caller to keep aside
    assert Bundle.load(bundle_dir).meta["artifacts"]["onnx"] == record_before
    assert (bundle_dir / "model.onnx").read_bytes() == before
