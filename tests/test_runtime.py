"""The device runtime on real exported artifacts and real digit images: parity with Keras,
automatic choice, no TensorFlow, bad input, threads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeclf.errors import BundleError, EdgeclfError, ImageDecodeError, InvalidInputError
from edgeclf.bundle import Bundle
from edgeclf.runtime import Predictor
from edgeclf.runtime.fingerprint import fingerprint, machine_key
from edgeclf.runtime.hardware import Hardware, detect
from edgeclf.runtime.selection import choose
from tests.conftest import CPU_ARTIFACTS, NONCONTIGUOUS, TINY_SIZE, has_gpu, run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tiny_exported):
    """Held-out images (uint8) and the Keras model's integer answers for them."""
    from edgeclf.export.reference import reference_sets
    from edgeclf.train.evaluate import load_keras_model, predict_logits

    bundle, _ = tiny_exported
    _, heldout = reference_sets(bundle)
    logits = predict_logits(load_keras_model(bundle), heldout.images)
    return heldout.images, np.asarray(bundle.labels)[logits.argmax(axis=1)]


@pytest.fixture(scope="module")
def test_files(digits_dir):
    """Real PNG files never seen in training, of the three digits the bundle knows."""
    return [p for digit in NONCONTIGUOUS.values() for p in sorted((digits_dir / "test" / str(digit)).glob("*.png"))[:8]]


@pytest.mark.parametrize("artifact", CPU_ARTIFACTS)
def test_every_cpu_artifact_gives_the_integers_export_validated(tiny_exported, reference, artifact):
    bundle, _ = tiny_exported
    images, keras_labels = reference
    with Predictor.load(bundle.path, artifact) as predictor:
        predictions = predictor.predict(images)
        assert predictor.describe()["format"] == artifact
    labels = np.asarray([p.label for p in predictions])
    assert set(labels.tolist()) <= {-2, 3, 10}
    agreement = float(np.mean(labels == keras_labels))
    validation = bundle.meta["artifacts"][artifact]["validation"]
    # The runtime reproduces what export measured on the same images (session settings
    # may move an INT8 near-tie by an image)...
    assert abs(agreement - validation["top1_agreement"]) <= 0.01
    if validation["tolerance"].get("decided_margin") is None:  # the INT8 gate judges decided images only
        assert agreement >= validation["tolerance"]["min_agreement"]
    if bundle.meta["artifacts"][artifact]["precision"] == "fp32":
        assert agreement == 1.0  # ...and FP32 is Keras's answer on every image.


def test_full_integer_tflite_logits_are_read_back_as_real_numbers(tiny_exported):
    """LiteRT's full-integer model outputs INT8 logits; the backend dequantizes them, so logits,
    probabilities and confidences are Keras's scale, not raw integers."""
    pytest.importorskip("ai_edge_litert")
    from edgeclf.verification import load_verification_set

    bundle, _ = tiny_exported
    reference = load_verification_set(bundle)
    with Predictor.load(bundle.path, "tflite-int8") as predictor:
        logits = predictor.backend.infer(reference.images[:32])
        probabilities = predictor.probabilities(reference.images[:32])
    assert logits.dtype == np.float32 and not np.array_equal(logits, np.round(logits))
    scale = np.abs(reference.logits[:32]).max()
    assert np.abs(logits - reference.logits[:32]).max() < 0.25 * scale
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_files_decode_as_in_training_and_decoding_matches_the_graph_label(tiny_exported, test_files):
    import onnxruntime as ort

    from edgeclf.images import load_image
    from edgeclf.train.evaluate import load_keras_model, predict_logits

    bundle, _ = tiny_exported
    pixels = np.stack([load_image(p, (TINY_SIZE, TINY_SIZE)) for p in test_files])
    keras_labels = np.asarray(bundle.labels)[predict_logits(load_keras_model(bundle), pixels).argmax(axis=1)]
    session = ort.InferenceSession(str(bundle.path / "model.onnx"), providers=["CPUExecutionProvider"])
    graph_labels = session.run(["label"], {"pixels": pixels})[0]
    with Predictor.load(bundle.path, "onnxruntime") as predictor:
        from_files = [p.label for p in predictor.predict([str(p) for p in test_files])]
        from_bytes = [p.label for p in predictor.predict([p.read_bytes() for p in test_files])]
        from_pil = [p.label for p in predictor.predict([Image.open(p) for p in test_files])]
    assert from_files == from_bytes == from_pil == keras_labels.tolist() == graph_labels.tolist()


def test_prediction_confidence_top_k_and_probabilities(tiny_exported, reference):
    bundle, _ = tiny_exported
    images, _ = reference
    with Predictor.load(bundle.path, "onnx") as predictor:
        one = predictor.predict(images[0], top_k=2)
        everything = predictor.predict(images[0], top_k=10)  # more than the 3 classes: all of them
        probs = predictor.probabilities(images[:5])
        batch = predictor.predict_batch(images[0])
    assert isinstance(batch, list) and batch[0].label == one.label
    # The k most probable labels, best first, with their softmax probabilities (labels, not class indices).
    order = np.argsort(-probs[0], kind="stable")
    expected = [(bundle.labels[i], probs[0][i]) for i in order]
    assert [label for label, _ in one.top_k] == [label for label, _ in expected[:2]]
    assert [p for _, p in one.top_k] == pytest.approx([p for _, p in expected[:2]])
    assert [label for label, _ in everything.top_k] == [label for label, _ in expected]
    assert one.label == expected[0][0] and one.top_k[0][1] >= one.top_k[1][1]
    assert one.confidence == pytest.approx(one.top_k[0][1]) and one.confidence == pytest.approx(probs[0].max())
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert one.to_dict()["top_k"][0]["label"] == one.label


def test_auto_choice_from_hardware_and_from_benchmarks(tiny_exported, tmp_path):
    bundle, _ = tiny_exported
    plain = Hardware("AuthenticAMD", "test", frozenset({"avx2"}), 2, None)
    assert choose(bundle.path, "auto", None, plain).format == "onnx"
    vnni = Hardware("GenuineIntel", "test", frozenset({"avx512_vnni"}), 2, None)
    assert choose(bundle.path, "auto", None, vnni).format == "openvino-int8"
    # AMX: BF16 waits until it passed on this machine (tests/test_verify.py); INT8 meanwhile.
    amx = Hardware("GenuineIntel", "test", frozenset({"avx512f", "amx_bf16", "amx_int8"}), 2, None)
    assert choose(bundle.path, "auto", None, amx).format == "openvino-int8"

    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    rows = [
        {"artifact": "onnx", "batch": 1, "p50_ms": 9.0, "agreement": 1.0, "status": "ok"},
        {"artifact": "tflite-int8", "batch": 1, "p50_ms": 1.0, "agreement": 0.9, "status": "ok"},  # too inexact
        {"artifact": "openvino", "batch": 1, "p50_ms": 4.0, "agreement": 1.0, "status": "ok"},
        {"artifact": "openvino", "batch": 8, "p50_ms": 0.5, "agreement": 1.0, "status": "ok"},  # not batch 1
    ]
    # Rows that do not say which machine measured them are not trusted.
    meta["benchmarks"] = {"rows": rows}
    (copy / "bundle.json").write_text(json.dumps(meta))
    picked = choose(copy, "auto", None, plain)
    assert picked.format == "onnx" and "do not say which machine" in picked.reason
    # Rows of another machine (the AMX box) are not trusted on this one, but are on that one.
    meta["benchmarks"] = {"machines": {machine_key(amx): {"environment": {"machine": fingerprint(amx)},
                                                          "rows": rows}}}
    (copy / "bundle.json").write_text(json.dumps(meta))
    picked = choose(copy, "auto", None, plain)
    assert picked.format == "onnx" and "other machines (test (amx_bf16,amx_int8,avx512f))" in picked.reason
    picked = choose(copy, "auto", None, amx)
    assert picked.format == "openvino" and picked.precision_hint is None and "on this machine" in picked.reason
    # This machine's own rows decide for the Predictor here.
    meta["benchmarks"]["machines"][machine_key()] = {"environment": {"machine": fingerprint()}, "rows": rows}
    (copy / "bundle.json").write_text(json.dumps(meta))
    with Predictor.load(copy) as predictor:
        assert predictor.describe()["backend"] == "openvino" and "benchmarks" in predictor.describe()["reason"]


def test_lone_artifacts_describe_themselves(tiny_exported, reference, tmp_path):
    bundle, _ = tiny_exported
    images, keras_labels = reference
    for files in (["model.onnx"], ["model.int8.openvino.xml", "model.int8.openvino.bin"], ["model.fp16.tflite"]):
        for name in files:
            shutil.copy(bundle.path / name, tmp_path / name)
        with Predictor.load(tmp_path / files[0]) as predictor:
            assert predictor.labels == [-2, 3, 10] and predictor.image_size == (TINY_SIZE, TINY_SIZE)
            labels = [p.label for p in predictor.predict(images[:40])]
        if files == ["model.onnx"]:  # FP32 gives Keras's answers, every one of them
            assert labels == keras_labels[:40].tolist()
        else:
            assert np.mean(np.asarray(labels) == keras_labels[:40]) >= 0.95


def test_runtime_does_not_import_tensorflow():
    code = ("import sys, edgeclf.runtime; from edgeclf.runtime import Predictor; "
            "import edgeclf.runtime.predictor, edgeclf.runtime.backends.onnxruntime; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_runtime_runs_with_only_numpy_pillow_and_onnxruntime(tiny_exported, test_files, tmp_path):
    """A device install: a bare venv holding numpy, Pillow, onnxruntime (and its own
    dependencies) and edgeclf's root and runtime packages only: no train/, no export/."""
    import numpy
    import onnxruntime
    import PIL

    venv = tmp_path / "device"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    for module in (numpy, PIL, onnxruntime, __import__("flatbuffers"), __import__("packaging")):
        root = Path(module.__file__).parent
        (site / root.name).symlink_to(root)
        libs = root.with_name(f"{root.name.lower() if root.name != 'PIL' else 'pillow'}.libs")
        if libs.is_dir():
            (site / libs.name).symlink_to(libs)
    import google.protobuf

    (site / "google").mkdir()
    (site / "google" / "protobuf").symlink_to(Path(google.protobuf.__file__).parent)
    shutil.copytree(REPO / "edgeclf", site / "edgeclf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "runtime", site / "edgeclf" / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import json, sys\n"
        "from edgeclf.runtime import Predictor\n"
        f"p = Predictor.load({str(tiny_exported[0].path)!r}, 'onnx')\n"
        f"labels = [x.label for x in p.predict({[str(f) for f in test_files]!r})]\n"
        "for name in ('tensorflow', 'keras', 'openvino', 'edgeclf.train', 'edgeclf.export'):\n"
        "    try:\n"
        "        __import__(name); print('importable:', name); sys.exit(1)\n"
        "    except ImportError:\n"
        "        pass\n"
        "print(json.dumps({'backend': p.describe()['backend'], 'labels': labels}))\n"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Like with like: the same artifact and backend on both sides, whatever ``auto`` would
    # pick on this CPU (OpenVINO BF16 on AMX gives other integers on a few images).
    with Predictor.load(tiny_exported[0].path, "onnx") as predictor:
        expected = [p.label for p in predictor.predict([str(f) for f in test_files])]
    assert result == {"backend": "onnxruntime", "labels": expected}


def test_eight_threads_give_the_serial_answers(tiny_exported, reference):
    bundle, _ = tiny_exported
    images, _ = reference
    for artifact in ("onnx", "openvino-int8", "tflite"):
        with Predictor.load(bundle.path, artifact, batch_size=4) as predictor:
            serial = [predictor.predict(img).label for img in images[:48]]
            results: dict[int, list[int]] = {}

            def work(worker: int, results=results) -> None:
                # Each thread walks the images from its own offset, so calls overlap differently.
                order = np.roll(np.arange(48), worker * 6)
                results[worker] = [None] * 48
                for i in order:
                    results[worker][i] = predictor.predict(images[i]).label

            threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert all(results[w] == serial for w in range(8)), artifact


def test_bad_images_get_typed_errors_naming_the_input(tiny_exported, tmp_path, test_files, monkeypatch):
    bundle, _ = tiny_exported
    good = test_files[0]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with Predictor.load(bundle.path, "onnx") as p:
        for path, message in ((tmp_path / "missing.png", "not found"), (empty, "empty"),
                              (truncated, "corrupt or truncated"), (text, "not a readable image"),
                              (tmp_path, "got a directory")):
            with pytest.raises(ImageDecodeError, match=message) as info:
                p.predict(str(path))
            assert str(path) in str(info.value)
        with pytest.raises(ImageDecodeError, match="truncated"):
            p.predict(truncated.read_bytes())
        with pytest.raises(ImageDecodeError, match="empty"):
            p.predict(b"")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 32x32 file is then a "bomb"
        with pytest.raises(ImageDecodeError, match="too large to decode safely"):
            p.predict(str(good))
        monkeypatch.undo()

        pixels = np.zeros((75, 75, 3), np.uint8)
        with pytest.raises(InvalidInputError, match=r"float32.*expected uint8.*np.clip"):
            p.predict(pixels.astype(np.float32))
        with pytest.raises(InvalidInputError, match="holds NaN"):
            p.predict(np.full((75, 75, 3), np.nan, np.float32))
        with pytest.raises(InvalidInputError, match=r"4 channels .*expected HxWx3 RGB.*2::-1.*\(75, 75, 4\)"):
            p.predict(np.zeros((75, 75, 4), np.uint8))
        with pytest.raises(InvalidInputError, match=r"2 dimensions"):
            p.predict(np.zeros((75, 75), np.uint8))
        with pytest.raises(InvalidInputError, match="0 pixels"):
            p.predict(np.zeros((0, 75, 3), np.uint8))
        with pytest.raises(InvalidInputError, match="must be 0..255.*-1..300"):
            p.predict(np.array([[[-1, 300, 0]]], np.int32))
        with pytest.raises(InvalidInputError, match="empty batch"):
            p.predict([])
        with pytest.raises(InvalidInputError, match="empty batch"):
            p.predict(np.zeros((0, 75, 75, 3), np.uint8))
        with pytest.raises(InvalidInputError, match=r"input 1: expected a file path.*<int>"):
            p.predict([str(good), 7])
        # Integer pixels 0..255 of another dtype, and another size, are converted without loss.
        assert p.predict(np.zeros((40, 30, 3), np.int64)).label in (-2, 3, 10)
    with pytest.raises(InvalidInputError, match="closed"):
        p.predict(pixels)


def test_bad_models_get_typed_errors(tiny_exported, tmp_path):
    bundle, _ = tiny_exported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    size = (copy / "model.int8.onnx").stat().st_size
    with open(copy / "model.int8.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=rf"model.int8.onnx is {size + 1} bytes, bundle.json records {size}"):
        Predictor.load(copy, "onnx-int8")
    with open(copy / "model.int8.onnx", "r+b") as fh:  # the same size, one byte altered
        fh.truncate(size)
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"model.int8.onnx differs from the file export validated"):
        Predictor.load(copy, "onnx-int8")
    (copy / "model.int8.onnx").unlink()
    with pytest.raises(BundleError, match="no validated artifact for 'onnx-int8'"):
        Predictor.load(copy, "onnx-int8")
    lone = tmp_path / "cut.onnx"
    lone.write_bytes((bundle.path / "model.onnx").read_bytes()[:100_000])
    with pytest.raises(BundleError, match="onnxruntime cannot load"):
        Predictor.load(lone)
    with pytest.raises(BundleError, match="not found"):
        Predictor.load(tmp_path / "nothing")
    with pytest.raises(BundleError, match="cannot tell what runs"):
        Predictor.load(bundle.path / "bundle.json")
    with pytest.raises(InvalidInputError, match=r"unknown backend or artifact 'onnx-int4'"):
        Predictor.load(bundle.path, "onnx-int4")
    with pytest.raises(InvalidInputError, match="precision must be"):
        Predictor.load(bundle.path, precision="int4")
    # An engine for another TensorRT version, or with no GPU here, is refused with the reason.
    engine = bundle.path / "model.fp16.engine"
    if engine.is_file():
        from edgeclf.engine_file import read_engine, write_engine
        from edgeclf.gpu import local_compute_capability

        header, plan = read_engine(engine)
        header["tensorrt"]["version"] = "0.0.1"
        write_engine(tmp_path / "old.engine", header, plan)
        with pytest.raises(EdgeclfError, match=r"built with tensorrt\S* 0.0.1|not installed"):
            Predictor.load(tmp_path / "old.engine")
        if local_compute_capability() is None:
            with pytest.raises(EdgeclfError, match="needs an NVIDIA GPU|not installed"):
                Predictor.load(engine)


def test_random_arrays_raise_only_typed_errors(tiny_exported):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    bundle, _ = tiny_exported
    predictor = Predictor.load(bundle.path, "onnx")
    dtypes = st.sampled_from([np.uint8, np.int8, np.int16, np.uint16, np.int64, np.float16, np.float32,
                              np.float64, np.bool_, np.complex64])
    shapes = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6)

    # No deadline and no health check on generation speed: on a busy machine neither says anything about the code.
    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True,
                         suppress_health_check=[hypothesis.HealthCheck.too_slow])
    @hypothesis.given(hnp.arrays(dtypes, shapes))
    def check(arr):
        try:
            result = predictor.predict(arr)
        except EdgeclfError:
            return
        assert all(r.label in (-2, 3, 10) for r in (result if isinstance(result, list) else [result]))

    check()
    predictor.close()


def test_cli_predict_reports_failures_and_goes_on(tiny_exported, test_files, tmp_path):
    bundle, _ = tiny_exported
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    out = run_cli("predict", str(bundle.path), str(test_files[0]), str(broken), str(tmp_path / "missing.png"),
                  str(test_files[1]), "--json", "--top-k", "2")
    assert out.returncode == 1
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file"] for r in records] == [str(test_files[0]), str(broken), str(tmp_path / "missing.png"),
                                            str(test_files[1])]
    assert "label" in records[0] and "label" in records[3] and len(records[0]["top_k"]) == 2
    assert "not a readable image" in records[1]["error"] and "no such file" in records[2]["error"]
    assert "2 predicted, 2 failed" in out.stderr
    ok = run_cli("predict", str(bundle.path), str(test_files[0].parent), "--backend", "tflite")
    assert ok.returncode == 0 and "tflite running" in ok.stderr
    assert len(ok.stdout.splitlines()) == len(list(test_files[0].parent.glob("*.png")))


def test_doctor_says_what_is_usable_and_why_not():
    out = run_cli("doctor", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["hardware"]["machine_key"] == machine_key()  # what bench stores its rows under
    rows = {r["backend"]: r for r in report["backends"]}
    assert rows["onnxruntime"]["usable"] and "CPUExecutionProvider" in rows["onnxruntime"]["why"]
    assert rows["openvino"]["usable"] and rows["tflite"]["usable"]
    from edgeclf.gpu import local_compute_capability

    if local_compute_capability() is None:
        assert not rows["tensorrt"]["usable"] and "no NVIDIA GPU" in rows["tensorrt"]["why"]


@pytest.mark.tensorrt
def test_tensorrt_engine_gives_the_keras_integers(tiny_exported, reference):
    bundle, _ = tiny_exported
    images, keras_labels = reference
    with Predictor.load(bundle.path, "tensorrt", allow_unvalidated=True) as predictor:
        labels = np.asarray([p.label for p in predictor.predict(images)])
    assert np.mean(labels == keras_labels) >= 0.98


def test_cli_predict_walks_folders_recursively_and_prints_file_label_confidence(tiny_exported, test_files, tmp_path):
    """README: `predict` reads directories recursively, one `file<TAB>label<TAB>confidence` line per image."""
    bundle, _ = tiny_exported
    tree = {tmp_path / "in" / "top.png": test_files[0], tmp_path / "in" / "a" / "one.png": test_files[9],
            tmp_path / "in" / "a" / "b" / "two.png": test_files[17]}
    for target, source in tree.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (tmp_path / "in" / "a" / "notes.txt").write_text("not an image: skipped by extension")
    out = run_cli("predict", str(bundle.path), str(tmp_path / "in"), "--backend", "onnx")
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert sorted(Path(f) for f, *_ in lines) == sorted(tree)
    with Predictor.load(bundle.path, "onnx") as predictor:
        expected = {str(path): predictor.predict(str(path)) for path in tree}
    for file, label, confidence, *_ in lines:
        assert int(label) == expected[file].label
        assert float(confidence) == pytest.approx(expected[file].confidence, abs=1e-4)


def test_an_artifact_whose_labels_differ_from_the_bundle_is_refused(tiny_exported, tmp_path):
    """README: the artifact decodes to its own labels; a bundle that says otherwise is refused."""
    bundle, _ = tiny_exported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta["labels"] = [-2, 3, 11]
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(EdgeclfError, match=r"model.onnx decodes to labels \[-2, 3, 10\], but the bundle's labels "
                                           r"are \[-2, 3, 11\]: the artifact belongs to another model"):
        Predictor.load(copy, "onnx")


def test_auto_never_picks_an_artifact_export_did_not_validate(tiny_exported, tmp_path):
    """README: `auto` skips unvalidated artifacts; asking for one by name needs --allow-unvalidated."""
    bundle, _ = tiny_exported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    vnni = Hardware("GenuineIntel", "test", frozenset({"avx512_vnni"}), 2, None)
    assert choose(copy, "auto", None, vnni).format == "openvino-int8"
    meta = json.loads((copy / "bundle.json").read_text())
    meta["artifacts"]["openvino-int8"]["status"] = "failed-validation"
    (copy / "bundle.json").write_text(json.dumps(meta))
    assert choose(copy, "auto", None, vnni).format == "onnx"  # the next rule, not the failed INT8
    with pytest.raises(BundleError, match=r"no validated artifact for 'openvino-int8'.*'failed-validation'"):
        choose(copy, "openvino-int8", None, vnni)
    assert choose(copy, "openvino-int8", None, vnni, allow_unvalidated=True).format == "openvino-int8"
    # An engine built without a GPU is unvalidated: a GPU machine runs it only once it passed there.
    gpu = Hardware("AuthenticAMD", "test", frozenset({"avx2"}), 2, "8.6")
    engines = {f for f, r in meta["artifacts"].items() if r["format"].startswith("tensorrt")}
    assert all(meta["artifacts"][f]["status"] == "unvalidated" for f in engines) or has_gpu()
    if engines and not has_gpu():
        assert not choose(copy, "auto", None, gpu).format.startswith("tensorrt")


@pytest.mark.skipif(not detect().bf16, reason="BF16 runs natively only on CPUs with AMX or AVX512_BF16 (Intel "
                                              "Sapphire Rapids and Cooper Lake, AMD Zen 4 and later); none here")
def test_bf16_on_a_bf16_cpu_gives_the_keras_integers(tiny_exported):
    """The README's BF16 path: the FP32 OpenVINO IR run in BF16 passes, on the device, the gate
    export recorded for it (agreement on the images Keras has decided, the paired accuracy test)."""
    from edgeclf.runtime import verify

    bundle, _ = tiny_exported
    with Predictor.load(bundle.path, "openvino", precision="bf16") as predictor:
        assert predictor.describe()["precision_hint"] == "bf16"
    report = verify(bundle.path, "openvino", precision="bf16", record=False, allow_small_set=True)
    result = report.results["openvino-bf16"]
    assert report.passed, report.failures()
    recorded = Bundle.load(bundle.path).meta["artifacts"]["openvino"]["run_time_tolerances"]["bf16"]
    assert recorded["decided_margin"] is not None and result["tolerance"] == recorded
