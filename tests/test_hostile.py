"""A hostile corpus against the real CLI and API: tampered bundles, malformed lone artifacts,
paths out of the bundle, concurrent and interrupted exports, a full disk.

Every case is generated at test time from the exported test bundle (no binary blobs in
the repository) and must end in a typed, one-line error with the expected exit status,
write nothing outside its target and leave bundle.json valid with every record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeclf.bundle import Bundle, artifact_files, recover_bundle
from edgeclf.errors import BundleError
from edgeclf.runtime import Predictor
from tests.conftest import NONCONTIGUOUS, TINY_SIZE, run_cli

#: Files a case's bundle holds (hard links: a case replaces a file, never edits it in place).
LIGHT_FILES = ("bundle.json", "model.keras", "model.onnx", "model.int8.onnx", "model.openvino.xml",
               "model.openvino.bin", "verification.npz", "trust.npz")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _light_copy(exported, dest: Path) -> Path:
    """Hard links to the files of an exported (bundle, records) pair that these tests need."""
    dest.mkdir(parents=True)
    for name in LIGHT_FILES:
        os.link(exported[0].path / name, dest / name)
    return dest


def _edit(bundle: Path, change) -> None:
    meta = json.loads((bundle / "bundle.json").read_text())
    change(meta)
    (bundle / "bundle.json").unlink()
    (bundle / "bundle.json").write_text(json.dumps(meta))


def _replace(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _onnx_variant(source: Path, dest: Path, change) -> Path:
    import onnx

    model = onnx.load(str(source))
    change(model)
    onnx.save(model, str(dest))
    return dest


def _set_prop(key: str, value: str):
    def change(model):
        for prop in model.metadata_props:
            if prop.key == key:
                prop.value = value
    return change


def _rename_logits(model) -> None:
    for node in model.graph.node:
        node.input[:] = ["scores" if i == "logits" else i for i in node.input]
        node.output[:] = ["scores" if o == "logits" else o for o in node.output]
    for out in model.graph.output:
        if out.name == "logits":
            out.name = "scores"


def _engine(path: Path, header_text: bytes) -> Path:
    from edgeclf.engine_file import MAGIC

    path.write_bytes(MAGIC + struct.pack("<Q", len(header_text)) + header_text + b"plan")
    return path


# Each case: (setup(bundle dir, scratch dir) -> argv after "edgeclf", exit status, fragment of the error).
def _predict(target, image, *extra):
    return ["predict", str(target), str(image), *extra]


CASES = {
    "file climbs out of the bundle": (
        lambda b, s, img: (_edit(b, lambda m: m["artifacts"]["onnx"].update(file="../../../etc/passwd")),
                           _predict(b, img, "--backend", "onnx"))[1], 1, "inside the bundle"),
    "file is an absolute path": (
        lambda b, s, img: (_edit(b, lambda m: m["artifacts"]["onnx"].update(file="/etc/passwd")),
                           _predict(b, img, "--backend", "onnx"))[1], 1, "inside the bundle"),
    "file is a symlink to another model, sha256 updated": (
        lambda b, s, img: _symlinked_model(b, s, img), 1, "outside the bundle"),
    "openvino weights_file climbs out": (
        lambda b, s, img: (_edit(b, lambda m: m["artifacts"]["openvino"].update(weights_file="../../w.bin")),
                           _predict(b, img, "--backend", "openvino"))[1], 1, "weights_file"),
    "record is a string": (
        lambda b, s, img: (_edit(b, lambda m: m["artifacts"].update(onnx="model.onnx")),
                           _predict(b, img))[1], 1, "field 'artifacts.onnx'"),
    "record without sha256": (
        lambda b, s, img: (_edit(b, lambda m: m["artifacts"]["onnx"].pop("sha256")),
                           _predict(b, img))[1], 1, "artifacts.onnx.sha256"),
    "record without file": (
        lambda b, s, img: (_edit(b, lambda m: m["artifacts"]["onnx"].pop("file")),
                           _predict(b, img))[1], 1, "artifacts.onnx.file"),
    "benchmark rows of the wrong type": (
        lambda b, s, img: (_edit(b, lambda m: m.update(benchmarks={"rows": [{"p50_ms": "fast", "batch": 1}]})),
                           _predict(b, img))[1], 1, "benchmarks.rows[0].p50_ms"),
    "bundle.json nested 100000 deep": (
        lambda b, s, img: (_replace(b / "bundle.json", b"[" * 100000 + b"]" * 100000),
                           _predict(b, img))[1], 1, "nested too deeply"),
    "bundle.json is a list": (
        lambda b, s, img: (_replace(b / "bundle.json", b"[]"), _predict(b, img))[1], 1, "JSON object"),
    "model.onnx truncated": (
        lambda b, s, img: (_replace(b / "model.onnx", (b / "model.int8.onnx").read_bytes()[:1000]),
                           _predict(b, img, "--backend", "onnx"))[1], 1, "truncated or altered"),
    "model.onnx a 1 TB sparse file": (
        lambda b, s, img: (_sparse(b / "model.onnx"), _predict(b, img, "--backend", "onnx"))[1], 1,
        "1099511627776 bytes"),
    "model path is a symlink loop": (
        lambda b, s, img: (os.symlink(s / "loop", s / "loop"), _predict(s / "loop", img))[1], 1,
        "Too many levels of symbolic links"),
    "lone onnx: labels not JSON": (
        lambda b, s, img: _predict(_onnx_variant(b / "model.onnx", s / "m.onnx", _set_prop("edgeclf.labels", "[1,")),
                                   img), 1, "not valid JSON"),
    "lone onnx: labels a dict": (
        lambda b, s, img: _predict(_onnx_variant(b / "model.onnx", s / "m.onnx",
                                                 _set_prop("edgeclf.labels", '{"a": 1}')), img), 1,
        "'labels' must be a list"),
    "lone onnx: fewer labels than logits": (
        lambda b, s, img: _predict(_onnx_variant(b / "model.onnx", s / "m.onnx",
                                                 _set_prop("edgeclf.labels", "[1, 2]")), img), 1,
        "names 2 labels, but the model has 3 logits"),
    "lone onnx: an input size the model does not have": (
        lambda b, s, img: _predict(_onnx_variant(b / "model.onnx", s / "m.onnx", _set_prop(
            "edgeclf.input", '{"height": 224, "width": 224, "channels": 3}')), img), 1, f"the model takes {TINY_SIZE}x{TINY_SIZE}"),
    "lone onnx: no logits output": (
        lambda b, s, img: _predict(_onnx_variant(b / "model.onnx", s / "m.onnx", _rename_logits), img), 1,
        "no 'logits' output"),
    "engine header without its keys": (
        lambda b, s, img: _predict(_engine(s / "m.engine", json.dumps({"format": "edgeclf-engine/1"}).encode()),
                                   img), 1, "engine header field"),
    "engine header nested 100000 deep": (
        lambda b, s, img: _predict(_engine(s / "m.engine", b"[" * 100000 + b"]" * 100000), img), 1,
        "nested too deeply"),
    "triton repository from a file outside the bundle": (
        lambda b, s, img: (_edit(b, lambda m: m["artifacts"]["onnx"].update(file="/etc/passwd")),
                           ["export", str(b), "--format", "triton", "--out", str(s / "repo")])[1], 1,
        "inside the bundle"),
}


def _symlinked_model(bundle: Path, scratch: Path, image) -> list[str]:
    other = scratch / "other.onnx"
    shutil.copyfile(bundle / "model.int8.onnx", other)
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").symlink_to(other)
    _edit(bundle, lambda m: m["artifacts"]["onnx"].update(sha256=_sha(other), size_bytes=other.stat().st_size))
    return _predict(bundle, image, "--backend", "onnx")


def _sparse(path: Path) -> None:
    path.unlink()
    with open(path, "wb") as fh:
        fh.truncate(1 << 40)


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in root.rglob("*")}


@pytest.fixture(scope="module")
def image(digits_dir) -> Path:
    return next((digits_dir / "test" / str(NONCONTIGUOUS[3])).glob("*.png"))


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_case_gets_one_typed_line(tiny_exported, image, tmp_path, case):
    setup, status, fragment = CASES[case]
    bundle = _light_copy(tiny_exported, tmp_path / "bundle")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = setup(bundle, scratch, image)
    before = _snapshot(tmp_path)
    meta_before = (bundle / "bundle.json").read_bytes()
    out = run_cli(*argv)
    assert out.returncode == status, out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], out.stderr
    assert _snapshot(tmp_path) == before  # nothing written: not in the bundle, not beside it
    assert (bundle / "bundle.json").read_bytes() == meta_before


def test_api_refuses_paths_out_of_the_bundle_for_predict_bench_and_triton(tiny_exported, tmp_path):
    from edgeclf.benchmarks.harness import BenchConfig, run_bench
    from edgeclf.serve.repository import write_repository

    bundle = _light_copy(tiny_exported, tmp_path / "bundle")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"weights from elsewhere")
    _edit(bundle, lambda m: (m["artifacts"]["onnx"].update(file="../outside.bin"),
                             m["artifacts"]["openvino"].update(weights_file="../outside.bin")))
    for backend in ("onnx", "openvino"):
        with pytest.raises(BundleError, match="inside the bundle"):
            Predictor.load(bundle, backend)
    with pytest.raises(BundleError, match="inside the bundle"):
        write_repository(bundle, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    result = run_bench(bundle, BenchConfig(artifacts=("onnx", "openvino"), batches=(1,), duration_s=0.1,
                                           warmup_s=0.0, min_runs=1, baselines=False))
    failed = {r["name"]: r for r in result["rows"] if r["status"] != "ok"}
    assert set(failed) >= {"onnx", "openvino"}
    assert all("inside the bundle" in r["error"] for n, r in failed.items() if n in ("onnx", "openvino"))


def test_export_refuses_a_replaced_model_keras(tiny_exported, tmp_path):
    bundle = _light_copy(tiny_exported, tmp_path / "bundle")
    _replace(bundle / "model.keras", (bundle / "model.keras").read_bytes() + b"\0")  # a zip still loads
    out = run_cli("export", str(bundle), "--format", "onnx")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "model.keras differs from the model training wrote" in out.stderr


@pytest.mark.slow  # exports
def test_two_concurrent_exports_keep_both_records(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, bundle)
    procs = [subprocess.Popen([sys.executable, "-m", "edgeclf", "export", str(bundle), "--format", fmt,
                               "--calibration-images", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
             for fmt in ("onnx", "tflite")]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
    loaded = Bundle.load(bundle)
    assert set(loaded.meta["artifacts"]) == {"onnx", "tflite"}
    for record in loaded.meta["artifacts"].values():
        assert record["status"] == "validated"
        artifact_files(loaded, record)  # each file is the one its record describes
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith(".")) == [".bundle.lock"]


# Re-export the OpenVINO IR (and the ONNX model it is made from) with another opset, and
# SIGKILL the exporter between the two renames that put the new .xml and .bin in place:
# the record is the new one, the .xml is in place, the .bin still under its pending name.
_KILLED_REEXPORT = """
import os, signal, sys
real_replace = os.replace
def replace(src, dst):
    if ".pending" in str(src) and str(dst).endswith("model.openvino.bin"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
from edgeclf.export import ExportOptions, export_bundle
export_bundle(sys.argv[1], "openvino", ExportOptions(opset=16))
"""


@pytest.mark.slow  # exports
def test_a_reexport_killed_between_its_renames_leaves_a_usable_artifact(tiny_exported, image, tmp_path):
    bundle = _light_copy(tiny_exported, tmp_path / "bundle")
    with Predictor.load(bundle, "openvino") as predictor:
        before = predictor.predict(str(image)).label
    out = subprocess.run([sys.executable, "-c", _KILLED_REEXPORT, str(bundle)], capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == -9, out.stderr[-2000:]
    loaded = Bundle.load(bundle)
    record = loaded.meta["artifacts"]["openvino"]
    assert record["opset"] == 16 and record["status"] == "validated"
    assert list(bundle.glob(".model.openvino.*.pending.bin"))
    with Predictor.load(bundle, "openvino") as predictor:  # read-only: the pending weights are used
        assert predictor.predict(str(image)).label == before
    recover_bundle(bundle)
    files = artifact_files(Bundle.load(bundle), record)
    assert (files.entry.name, files.weights.name) == ("model.openvino.xml", "model.openvino.bin")
    assert not list(bundle.glob(".*pending*")) and not list(bundle.glob(".export.*"))


def _mount_tmpfs(path: Path, size_bytes: int) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.slow  # exports
def test_export_on_a_full_disk_is_one_line_and_keeps_the_bundle(tiny_bundle, tmp_path):
    keras_size = (tiny_bundle.path / "model.keras").stat().st_size
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, keras_size + (4 << 20)):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        bundle = disk / "bundle"
        bundle.mkdir()
        for name in ("bundle.json", "model.keras"):
            shutil.copyfile(tiny_bundle.path / name, bundle / name)
        meta_before = (bundle / "bundle.json").read_bytes()
        out = run_cli("export", str(bundle), "--format", "onnx")
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "no space left on the device" in errors[0] and str(bundle) in errors[0]
        assert (bundle / "bundle.json").read_bytes() == meta_before
        assert sorted(p.name for p in bundle.iterdir()) == [".bundle.lock", "bundle.json", "model.keras"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_lone_onnx_with_good_metadata_still_runs(tiny_exported, image, tmp_path):
    """The checks above refuse only what is wrong: an untouched lone model runs."""
    lone = tmp_path / "model.onnx"
    shutil.copyfile(tiny_exported[0].path / "model.onnx", lone)
    with Predictor.load(lone) as predictor:
        assert predictor.predict(str(image)).label in (-2, 3, 10)
        assert np.asarray(predictor.labels).tolist() == [-2, 3, 10]
