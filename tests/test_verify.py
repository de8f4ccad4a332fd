"""``edgeclf verify`` and the verification set: trust checked where the model runs.

Export keeps a sample of the held-out images with the Keras logits in the bundle and
validates every artifact on it through the runtime's own backends; verify runs the same
code on the device, without TensorFlow, and ``auto`` obeys what passed on this machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgeclf.bundle import Bundle
from edgeclf.errors import BackendUnavailableError, BundleError
from edgeclf.formats import FORMATS, entry_name
from edgeclf.fsio import sha256_file
from edgeclf.runtime.fingerprint import fingerprint, machine_key
from edgeclf.runtime.hardware import Hardware, detect
from edgeclf.runtime.selection import choose
from edgeclf.runtime.verifier import check_labels_against_export, store_results, verify
from edgeclf.runtime.checks import measurable_check
from edgeclf.runtime.fidelity import clopper_pearson_lower, images_to_show
from edgeclf.verification import VerificationSet, load_verification_set
from tests.conftest import CPU_ARTIFACTS, HANG_S, engine_left_out, has_gpu, run_cli

REPO = Path(__file__).resolve().parents[1]
AVX2 = Hardware("AuthenticAMD", "test avx2", frozenset({"avx2"}), 2, None)
VNNI = Hardware("GenuineIntel", "test vnni", frozenset({"avx2", "avx512f", "avx512_vnni"}), 2, None)
AMX = Hardware("GenuineIntel", "test amx", frozenset({"avx512f", "avx512_vnni", "amx_bf16", "amx_int8"}), 2, None)


@pytest.fixture
def bundle_copy(tiny_exported, tmp_path) -> Path:
    path = tmp_path / "bundle"
    shutil.copytree(tiny_exported[0].path, path, ignore=shutil.ignore_patterns("benchmarks"))
    return path


def _edit(path: Path, change) -> None:
    meta = json.loads((path / "bundle.json").read_text())
    change(meta)
    (path / "bundle.json").write_text(json.dumps(meta))


def test_the_verification_set_is_the_held_out_reference_export_validated_on(tiny_exported):
    from edgeclf.export.reference import reference_sets
    from edgeclf.train.evaluate import load_keras_model, predict_logits

    bundle, records = tiny_exported
    record = bundle.meta["verification_set"]
    reference = load_verification_set(bundle)
    _, heldout = reference_sets(bundle)
    assert len(reference) == record["images"] == min(256, len(heldout))
    assert record["sha256"] == sha256_file(bundle.path / record["file"])
    assert record["drawn"]["held_out_images"] == len(heldout) and record["drawn"]["split"]["seed"] == 0
    # Real held-out images with their true labels, and the Keras model's own logits on them.
    rows = {img.tobytes(): value for img, value in zip(heldout.images, heldout.values, strict=True)}
    assert all(rows[img.tobytes()] == value for img, value in zip(reference.images, reference.values, strict=True))
    keras = predict_logits(load_keras_model(bundle), reference.images)
    np.testing.assert_allclose(reference.logits, keras, rtol=1e-5, atol=1e-5)
    for r in records:
        if "images" in r["validation"]:
            assert r["validation"]["images"] == len(reference)


def test_verify_gives_the_figures_export_recorded_for_every_cpu_artifact(bundle_copy, tiny_exported):
    _, records = tiny_exported
    report = verify(bundle_copy, "all", allow_small_set=True)  # the fast layer's set is too small for 0.99
    assert report.passed, report.failures()
    by_format = {r["format"]: r for r in records}
    for artifact in CPU_ARTIFACTS:
        result, validation = report.results[artifact], by_format[artifact]["validation"]
        assert result["run_by"]["backend"] == FORMATS[artifact].backend  # the runtime's own backend ran it
        for key in ("images", "top1_agreement", "accuracy", "accuracy_keras"):
            assert result[key] == validation[key], (artifact, key)
        assert result["max_abs_logit_diff"] == pytest.approx(validation["max_abs_logit_diff"], rel=1e-6, abs=1e-7)
        assert result["tolerance"] == validation["tolerance"]
    # Stored under this machine's key, next to export's own results, for the artifacts in force.
    stored = Bundle.load(bundle_copy).meta["verified"]["machines"][machine_key()]
    assert stored["machine"]["cpu_model"] == detect().cpu_model
    assert {name: r["by"] for name, r in stored["results"].items() if name in CPU_ARTIFACTS} == \
        {a: "verify" for a in CPU_ARTIFACTS}
    if not has_gpu():
        assert "tensorrt" not in report.results  # not runnable here, so not reported as passed


def test_verify_cli_fails_naming_the_artifact_and_the_check(bundle_copy):
    # The tolerance export recorded is the one verify applies: tighten it beyond reach.
    _edit(bundle_copy, lambda m: m["artifacts"]["onnx-int8"]["validation"]["tolerance"].update(min_agreement=1.01))
    out = run_cli("verify", str(bundle_copy), "--backend", "onnxruntime", "--allow-small-set")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "error: verification failed: onnx-int8: top-1 agreement" in out.stderr
    table = {line.split()[0]: line.split() for line in out.stdout.splitlines() if "onnxruntime" in line}
    assert table["onnx"][-1] == "passed" and table["onnx-int8"][-1] == "FAILED"
    assert "Traceback" not in out.stderr
    ok = run_cli("verify", str(bundle_copy), "--backend", "onnx", "--json", "--allow-small-set")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["results"]["onnx"]["checks"][0]["check"] == "max |logit diff|"


def test_a_missing_or_altered_verification_set_is_refused(bundle_copy):
    path = bundle_copy / "verification.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="differs from the verification set export wrote"):
        verify(bundle_copy, "onnx")
    _edit(bundle_copy, lambda m: m.pop("verification_set"))
    out = run_cli("verify", str(bundle_copy))
    assert out.returncode == 1 and "has no verification set" in out.stderr and "edgeclf export" in out.stderr
    _edit(bundle_copy, lambda m: m.update(verification_set={"file": "../../etc/passwd", "sha256": "0" * 64,
                                                               "size_bytes": 1}))
    with pytest.raises(BundleError, match="inside the bundle"):
        verify(bundle_copy, "onnx")


def test_verify_where_no_backend_runs_any_artifact_names_the_extras(bundle_copy):
    # Only the TensorRT engine is left, and the machine (AVX2) has no GPU.
    if "tensorrt" not in Bundle.load(bundle_copy).meta["artifacts"]:
        pytest.skip(f"no engine exported here: {engine_left_out()}")
    _edit(bundle_copy, lambda m: m.update(artifacts={"tensorrt": m["artifacts"]["tensorrt"]}))
    with pytest.raises(BackendUnavailableError, match=r"no backend installed here can run .*tensorrt.*"
                                                      r"pip install 'edgeclf\[gpu\]'"):
        verify(bundle_copy, "all", hardware=AVX2)


def test_concurrent_verify_runs_lose_no_record(bundle_copy):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    procs = [subprocess.Popen([sys.executable, "-m", "edgeclf", "verify", str(bundle_copy), "--backend", b,
                               "--allow-small-set"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for b in ("onnxruntime", "tflite", "openvino")]
    for proc in procs:
        _, err = proc.communicate(timeout=HANG_S)
        assert proc.returncode == 0, err
    results = Bundle.load(bundle_copy).meta["verified"]["machines"][machine_key()]["results"]
    assert all(results[a]["by"] == "verify" for a in CPU_ARTIFACTS)


def test_auto_runs_bf16_only_once_it_passed_on_this_machine(bundle_copy):
    bundle = Bundle.load(bundle_copy)
    picked = choose(bundle_copy, "auto", None, AMX)
    assert picked.precision_hint is None and picked.format == "openvino-int8"
    assert "OpenVINO BF16 left out until it passes here" in picked.reason
    sha = bundle.meta["artifacts"]["openvino"]["sha256"]
    # Passed on another machine: still not here.
    store_results(bundle_copy, {"openvino-bf16": {"passed": True, "artifact_sha256": sha}}, VNNI)
    assert choose(bundle_copy, "auto", None, AMX).precision_hint is None
    # Passed here, but for an artifact since replaced: not trusted either.
    store_results(bundle_copy, {"openvino-bf16": {"passed": True, "artifact_sha256": "f" * 64}}, AMX)
    assert choose(bundle_copy, "auto", None, AMX).precision_hint is None
    store_results(bundle_copy, {"openvino-bf16": {"passed": True, "artifact_sha256": sha}}, AMX)
    picked = choose(bundle_copy, "auto", None, AMX)
    assert (picked.format, picked.precision_hint) == ("openvino", "bf16") and "verified" in picked.reason
    # A benchmark row for BF16 on this machine counts only while the check stands.
    rows = [{"artifact": "openvino", "precision_hint": "bf16", "batch": 1, "p50_ms": 1.0, "agreement": 1.0,
             "status": "ok"}, {"artifact": "onnx", "batch": 1, "p50_ms": 9.0, "agreement": 1.0, "status": "ok"}]
    _edit(bundle_copy, lambda m: m.update(benchmarks={"machines": {machine_key(AMX): {
        "environment": {"machine": fingerprint(AMX)}, "rows": rows}}}))
    assert choose(bundle_copy, "auto", None, AMX).precision_hint == "bf16"
    store_results(bundle_copy, {"openvino-bf16": {"passed": False, "artifact_sha256": sha}}, AMX)
    picked = choose(bundle_copy, "auto", None, AMX)
    assert (picked.format, picked.precision_hint) == ("onnx", None) and "benchmarks" in picked.reason


def test_full_range_int8_is_not_picked_by_auto_without_int8_dot_products(bundle_copy):
    _edit(bundle_copy, lambda m: m["artifacts"]["onnx-int8"].update(needs_int8_dot_product=True))
    rows = [{"artifact": "onnx-int8", "batch": 1, "p50_ms": 1.0, "agreement": 1.0, "status": "ok"},
            {"artifact": "onnx", "batch": 1, "p50_ms": 9.0, "agreement": 1.0, "status": "ok"}]
    _edit(bundle_copy, lambda m: m.update(benchmarks={"machines": {
        machine_key(hw): {"environment": {"machine": fingerprint(hw)}, "rows": rows} for hw in (AVX2, VNNI)}}))
    picked = choose(bundle_copy, "auto", None, AVX2)
    assert picked.format == "onnx"
    assert choose(bundle_copy, "auto", None, VNNI).format == "onnx-int8"
    # Asked for by name it still runs, with a warning, wherever this test runs.
    from edgeclf.runtime import Predictor

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Predictor.load(bundle_copy, "onnx-int8").close()
    warned = [str(w.message) for w in caught if "full-range 8-bit INT8" in str(w.message)]
    assert bool(warned) == detect().int8_saturates
    # ARM does not saturate, dot product or not (measured on an emulated Raspberry Pi 4): auto may run it there.
    from edgeclf.runtime.selection import _usable

    pi4 = Hardware("ARM", "Cortex-A72 (Raspberry Pi 4)", frozenset({"asimd"}), 4, None)
    bundle = Bundle.load(bundle_copy)
    assert _usable(bundle, "onnx-int8", False, pi4, auto=True) is not None
    assert _usable(bundle, "onnx-int8", False, AVX2, auto=True) is None


def test_export_marks_full_range_int8_artifacts(tiny_exported):
    _, records = tiny_exported
    by_format = {r["format"]: r for r in records}
    # The default build is for this machine's CPU class: 8-bit weights where it has VNNI (they need
    # an INT8 dot product to run exactly), 7-bit ones on an AVX2-only CPU (exact everywhere).
    for fmt in ("onnx-int8", "openvino-int8"):
        assert by_format[fmt]["needs_int8_dot_product"] is detect().vnni
        assert by_format[fmt]["int8_cpu_class"] == detect().int8_class


@pytest.mark.slow  # pip installs edgeclf[cpu] into a new venv
def test_a_device_install_verifies_and_benches_without_tensorflow(bundle_copy, tiny_exported, tmp_path):
    """``pip install '.[cpu]'`` from the package metadata into a new venv: no TensorFlow, no
    OpenVINO, no LiteRT. verify and bench there give the figures export recorded."""
    # The project as a user gets it (no build outputs, no venv), installed by pip from its metadata.
    source = tmp_path / "edgeclf-src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "runs",
                                                                "__pycache__", "tests"))
    venv = tmp_path / "device"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{source}[cpu]"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    edgeclf = str(venv / "bin" / "edgeclf")
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import tensorflow"], capture_output=True)
    assert check.returncode != 0  # truly without TensorFlow
    out = subprocess.run([edgeclf, "verify", str(bundle_copy), "--json", "--allow-small-set"], capture_output=True,
                         text=True,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["results"]) == {"onnx", "onnx-fp16", "onnx-int8"}  # what onnxruntime runs
    validation = {r["format"]: r["validation"] for r in tiny_exported[1]}
    for name, result in report["results"].items():
        assert result["top1_agreement"] == validation[name]["top1_agreement"]
        assert result["accuracy"] == validation[name]["accuracy"]
    bench = subprocess.run([edgeclf, "bench", str(bundle_copy), "--batch", "1", "--duration", "1", "--warmup",
                            "0.2", "--folder-images", "4", "--out", str(tmp_path / "bench")], capture_output=True,
                           text=True, cwd=tmp_path, timeout=600)
    assert bench.returncode == 0, bench.stderr
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert "keras model.predict" not in rows  # no TensorFlow: no Keras baselines
    assert rows["onnx"]["agreement"] == validation["onnx"]["top1_agreement"]
    assert rows["onnx"]["machine"] == machine_key()
    assert not (tmp_path / "bench" / "bench.png").exists()  # no matplotlib on a device
    # The whole path too, on pictures drawn from the seed (no scikit-learn on a device).
    assert "drawn pictures" in result["end_to_end"]["pictures"] and result["end_to_end"]["folder"]["images"] == 4


def test_bad_verify_and_export_arguments_are_refused_up_front(bundle_copy):
    from edgeclf.errors import InvalidInputError
    from edgeclf.export import ExportOptions, export_bundle

    with pytest.raises(InvalidInputError, match="verification image count must be >= 1. Received: 0"):
        export_bundle(bundle_copy, "onnx", ExportOptions(verification_images=0))
    with pytest.raises(InvalidInputError, match="--backend must be 'auto', 'all', a backend"):
        verify(bundle_copy, "caffe")
    with pytest.raises(InvalidInputError, match="needs a bundle directory"):
        verify(bundle_copy / "model.onnx")
    out = run_cli("verify", str(bundle_copy), "--backend", "onnxruntime", "--precision", "bf16")
    assert out.returncode == 1 and "is in bf16" in out.stderr


def test_verify_is_part_of_the_runtime_api(bundle_copy):
    import edgeclf.runtime

    with edgeclf.runtime.Predictor.load(bundle_copy) as predictor:
        auto = entry_name(predictor.choice.format, predictor.choice.precision_hint)
    report = edgeclf.runtime.verify(bundle_copy, "auto", record=False, allow_small_set=True)
    assert list(report.results) == [auto] and report.passed and report.seconds > 0
    # Not recorded: what this machine holds is still export's own result.
    assert Bundle.load(bundle_copy).meta["verified"]["machines"][machine_key()]["results"][auto]["by"] == "export"


def _replace_set(path: Path, images: np.ndarray, values: np.ndarray, logits: np.ndarray) -> None:
    """Rewrite verification.npz as a hostile user with write access would: bundle.json's record
    (sha256, size, image count) updated to match, so only the contents can give it away."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, pixels=images, labels=values, logits=logits)
    (path / "verification.npz").write_bytes(buffer.getvalue())
    _edit(path, lambda m: m["verification_set"].update(sha256=hashlib.sha256(buffer.getvalue()).hexdigest(),
                                                       size_bytes=len(buffer.getvalue()), images=len(values)))


def test_the_images_a_target_needs_follow_the_gates_confidence_bound():
    # All n agreeing shows agreement (1 - 0.95) ** (1 / n) at best: 0.99 takes 299 images.
    for target, needed in ((0.99, 299), (0.98, 149), (0.95, 59), (0.9, 29), (0.999, 2995), (0.05, 1)):
        assert images_to_show(target) == needed
        assert clopper_pearson_lower(needed, needed) >= target > clopper_pearson_lower(needed - 1, needed - 1)
    assert images_to_show(1.0) is None  # no finite set shows perfect agreement
    from edgeclf.runtime.checks import TOLERANCES, Tolerance

    logits = np.eye(3, dtype=np.float32)[np.arange(300) % 3] * 5  # margins of 5
    assert measurable_check(TOLERANCES["fp32"], logits[:298])["passed"] is False
    assert measurable_check(TOLERANCES["fp32"], logits[:299])["passed"] is True
    gate = Tolerance(rtol=None, atol=0.0, min_agreement=0.95, max_accuracy_drop=0.02, decided_margin=6.0,
                     paired_alpha=0.05)  # judged on the decided images only: here none
    check = measurable_check(gate, logits)
    assert (check["images"], check["passed"], check["check"]) == (0, False, "95% bound if all 0 decided img agree "
                                                                             "(needs 59)")


def test_verify_fails_a_set_too_small_to_show_its_targets(bundle_copy, tiny_exported):
    reference = load_verification_set(Bundle.load(bundle_copy))
    assert len(reference) < 299  # the fast layer's own set cannot show FP32's 0.99 either
    report = verify(bundle_copy, "onnx", record=False)
    assert not report.passed and report.failures() == [
        f"onnx: 95% bound if all {len(reference)} img agree (needs 299) "
        f"{clopper_pearson_lower(len(reference), len(reference)):.4g} (limit 0.99)"]
    # The hostile case: one image, which passed every check before.
    _replace_set(bundle_copy, reference.images[:1], reference.values[:1], reference.logits[:1])
    out = run_cli("verify", str(bundle_copy), "--backend", "onnxruntime")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "onnx: 95% bound if all 1 img agree (needs 299) 0.05 (limit 0.99)" in errors[0], \
        out.stderr
    assert "onnx-int8: 95% bound if all" in errors[0]  # INT8's gate too, on its decided images
    # Asked for, it is judged anyway: the check is kept as waived, with one warning line.
    out = run_cli("verify", str(bundle_copy), "--backend", "onnx", "--allow-small-set", "--json")
    assert out.returncode == 0, out.stderr
    check = json.loads(out.stdout)["results"]["onnx"]["checks"][-1]
    assert check["waived"] is True and check["images_needed"] == 299 and check["value"] == pytest.approx(0.05)
    warned = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "verification set (1 image) is too small to show the agreement target of onnx " \
                                "(0.99 on 1, needs 299)" in warned[0]


def test_verify_refuses_labels_changed_after_export(bundle_copy):
    bundle = Bundle.load(bundle_copy)
    reference = load_verification_set(bundle)
    # Every label moved to the next class: Keras and the artifact are equally wrong, "drop 0".
    shifted = np.array([bundle.labels[(bundle.labels.index(v) + 1) % len(bundle.labels)] for v in reference.values])
    _replace_set(bundle_copy, reference.images, shifted, reference.logits)
    out = run_cli("verify", str(bundle_copy), "--backend", "onnx", "--allow-small-set")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    recorded = bundle.meta["artifacts"]["onnx"]["validation"]["accuracy_keras"]
    assert len(errors) == 1 and "verification.npz's labels disagree with export" in errors[0], out.stderr
    assert f"export measured {recorded:.4f}" in errors[0] and "re-export the bundle" in errors[0]
    assert out.stdout == ""  # refused before anything ran or was recorded
    # A set of another size: export drew it nested with the recorded one (a prefix of one permutation), so
    # the images Keras gets right are bounded by export's count, at any size. Shifted labels fall outside.
    _replace_set(bundle_copy, reference.images[:-1], shifted[:-1], reference.logits[:-1])
    out = run_cli("verify", str(bundle_copy), "--backend", "onnx", "--allow-small-set")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1 and "labels disagree with export" in errors[0], out.stderr
    assert f"on {len(reference) - 1} images" in errors[0] and "which allows" in errors[0]
    # The same subset with its own labels is within the bounds.
    subset = load_verification_set(Bundle.load(bundle_copy))
    check_labels_against_export(bundle, VerificationSet(subset.images, reference.values[:-1], subset.logits))
    # With no export record to compare, training's held-out accuracy is the yardstick, statistically
    # (the set is a sample of that split), and a gap is warned about.
    unrecorded = Bundle(bundle.path, {**bundle.meta, "artifacts": {}})
    with pytest.warns(UserWarning, match=r"labels give the Keras model 0\.\d+ accuracy on its \d+ images, but "
                                         r"training measured [01]\.\d+ on the held-out split"):
        check_labels_against_export(unrecorded, VerificationSet(subset.images, shifted[:-1], subset.logits))
    # Untouched, the set agrees with its records: no error, no warning about its labels.
    _replace_set(bundle_copy, reference.images, reference.values, reference.logits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert verify(bundle_copy, "onnx", record=False, allow_small_set=True).passed
    assert not [w for w in caught if "labels" in str(w.message)]
