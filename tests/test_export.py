"""Export to ONNX FP32/FP16/INT8 on a small trained model, validated on real digit images."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from edgeclf.bundle import Bundle
from edgeclf.errors import (
    BackendUnavailableError, BundleError, ConversionError, InvalidInputError, ValidationError,
)
from edgeclf.fsio import sha256_file
from edgeclf.gpu import local_compute_capability
from edgeclf.runtime.hardware import detect

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgeclf.export import ExportOptions, export_bundle  # noqa: E402
from edgeclf.export.int8_search import Int8Target  # noqa: E402
from edgeclf.formats import FORMATS, parse_formats  # noqa: E402
from tests.conftest import engine_left_out  # noqa: E402
from edgeclf.export.metadata import read_onnx_metadata  # noqa: E402
from edgeclf.export.reference import reference_sets  # noqa: E402
from edgeclf.runtime.checks import Tolerance  # noqa: E402


def test_every_format_is_produced_validated_and_recorded(exported):
    bundle, records = exported
    # Every format in the registry, in its order; an engine only where this machine's TensorRT builds one.
    expected = [f.name for f in FORMATS.values() if f.backend != "tensorrt" or not engine_left_out(f.precision)]
    assert [r["format"] for r in records] == expected and "tflite-int8" in expected
    saved = json.loads((bundle.path / "bundle.json").read_text())["artifacts"]
    for record in records:
        path = bundle.path / record["file"]
        if record["format"].startswith("tensorrt") and local_compute_capability() is None:
            assert record["status"] == "unvalidated" and "no NVIDIA GPU" in record["validation"]["skipped"]
            continue
        assert record["status"] == "validated", record["validation"]
        assert saved[record["format"]] == record
        files = [path] + ([bundle.path / record["weights_file"]] if "weights_file" in record else [])
        assert record["sha256"] == sha256_file(path)
        assert record["size_bytes"] == sum(f.stat().st_size for f in files)
        assert {"tensorflow", "tf2onnx", "onnx", "onnxruntime"} <= set(record["tools"])
        report = record["validation"]
        assert report["images"] >= 60 and report["passed"]
        if report["tolerance"].get("decided_margin") is not None:  # the INT8 gate: agreement on decided images
            assert report["decided"]["agreement"] >= report["tolerance"]["min_agreement"]
            assert report["decided"]["min_margin"] == record["quantization"]["decided"]["margin"]
            assert 0 < report["top1_agreement_lower_95"] <= report["top1_agreement"]
        else:
            assert report["top1_agreement"] >= report["tolerance"]["min_agreement"]
    sizes = {r["format"]: r["size_bytes"] for r in records}
    # A validated INT8 keeps at most a tenth of its layers in FP32, so it stays under 0.4 of FP32.
    for record in (records[2], records[4], records[-1]):
        q = record["quantization"]
        assert q["kept_fp32_layers"] <= 0.1 * q["quantizable_layers"]
        assert record.get("int8_cpu_class", detect().int8_class) == detect().int8_class  # none for LiteRT
    assert sizes["onnx-fp16"] < 0.6 * sizes["onnx"] and sizes["onnx-int8"] < 0.4 * sizes["onnx"]
    assert sizes["openvino-int8"] < 0.4 * sizes["onnx"]
    assert sizes["tflite-fp16"] < 0.6 * sizes["tflite"]
    assert sizes["tflite-int8"] < 0.4 * sizes["onnx"]
    assert records[3]["weights_sha256"] == sha256_file(bundle.path / "model.openvino.bin")
    # min-max first; onnxruntime's other calibrators only where it misses the INT8 target.
    chosen = records[2]["quantization"]["calibration"]
    # 7-bit weights only for the CPUs that sum u8 x s8 pairs in int16 (this machine's class by default).
    assert records[2]["calibration"] == {"images": 200, "method": chosen, "reduce_range": not detect().vnni}
    assert records[2]["needs_int8_dot_product"] is detect().vnni
    assert records[2]["quantization"]["calibrations"][0]["calibration"] == "minmax"
    assert records[4]["calibration"]["images"] == 200 and records[4]["calibration"]["method"].startswith("nncf")
    assert records[-1]["calibration"]["images"] == 200


def test_graph_takes_uint8_pixels_and_gives_logits_label_and_embedding(exported):
    bundle, _ = exported
    familiarity = bundle.meta["trust"]["familiarity"]
    candidates = familiarity["candidates"]
    assert list(candidates) == [f"mixed{i}" for i in range(10)] + ["avg_pool"]
    assert familiarity["dimension"] == candidates[familiarity["block"]]["dimension"]
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        session = ort.InferenceSession(str(bundle.path / name), providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        assert (inp.name, inp.type) == ("pixels", "tensor(uint8)")
        assert inp.shape[1:] == [75, 75, 3] and not isinstance(inp.shape[0], int)  # dynamic batch
        outs = [(o.name, o.type) for o in session.get_outputs()]
        # logits first (whatever reads the first output still gets them); the embedding is the pooled
        # output of the block export chose for the familiarity check.
        assert outs == [("logits", "tensor(float)"), ("label", "tensor(int64)"), ("embedding", "tensor(float)")]
        assert session.get_outputs()[2].shape[1] == familiarity["dimension"]


def test_label_output_is_labels_of_argmax_and_uint8_matches_keras(exported):
    import keras

    bundle, _ = exported
    _, heldout = reference_sets(bundle)
    session = ort.InferenceSession(str(bundle.path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, label = session.run(["logits", "label"], {"pixels": heldout.images})
    np.testing.assert_array_equal(label, np.asarray([-2, 3, 10])[logits.argmax(axis=1)])
    assert set(label.tolist()) <= {-2, 3, 10}
    # The same uint8 pixels through Keras (which takes them as float32 0..255).
    model = keras.saving.load_model(bundle.model_path, compile=False)
    reference = model.predict(heldout.images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-3 + 1e-4 * np.abs(reference).max())


def test_openvino_ir_takes_uint8_and_matches_onnx_runtime(exported):
    import openvino as ov

    from edgeclf.export.openvino_ir import read_openvino_metadata

    bundle, _ = exported
    _, heldout = reference_sets(bundle)
    for xml, onnx_name, precision in (("model.openvino.xml", "model.onnx", "fp32"),
                                      ("model.int8.openvino.xml", "model.int8.onnx", "int8")):
        model = ov.Core().read_model(str(bundle.path / xml))
        assert [i.get_any_name() for i in model.inputs] == ["pixels"]
        assert str(model.inputs[0].get_element_type()) == "<Type: 'uint8_t'>"
        assert model.inputs[0].get_partial_shape()[0].is_dynamic
        meta = read_openvino_metadata(bundle.path / xml)
        assert meta["labels"] == [-2, 3, 10] and meta["precision"] == precision
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled(heldout.images)
        np.testing.assert_array_equal(result["label"], np.asarray([-2, 3, 10])[result["logits"].argmax(1)])
        session = ort.InferenceSession(str(bundle.path / onnx_name), providers=["CPUExecutionProvider"])
        ort_logits = session.run(["logits"], {"pixels": heldout.images})[0]
        if precision == "fp32":
            np.testing.assert_allclose(result["logits"], ort_logits, rtol=1e-3, atol=1e-3)


def test_tflite_takes_uint8_and_carries_metadata(exported):
    from ai_edge_litert.interpreter import Interpreter

    from edgeclf.export.tflite import read_tflite_metadata

    bundle, _ = exported
    _, heldout = reference_sets(bundle)
    for name, precision in (("model.tflite", "fp32"), ("model.fp16.tflite", "fp16"), ("model.int8.tflite", "int8")):
        interpreter = Interpreter(model_path=str(bundle.path / name))
        (inp,) = interpreter.get_input_details()
        assert inp["dtype"] == np.uint8 and list(inp["shape_signature"]) == [-1, 75, 75, 3]
        result = interpreter.get_signature_runner("serving_default")(pixels=heldout.images[:16])
        np.testing.assert_array_equal(result["label"], np.asarray([-2, 3, 10])[result["logits"].argmax(1)])
        meta = read_tflite_metadata(bundle.path / name)
        assert meta["labels"] == [-2, 3, 10] and meta["precision"] == precision
        assert meta["source_model_sha256"] == bundle.meta["model"]["sha256"]
        if precision == "int8":  # full-integer: every convolution and dense layer computes in INT8,
            # but those the INT8 search kept in float (named by their output tensors)
            kept = set(meta["quantization"]["kept_float"])
            tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
            ops = interpreter._get_ops_details()  # no public API lists ops
            compute = [op for op in ops if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
            assert len(compute) == 96  # InceptionV3's 94 convolutions and the 2 dense layers
            int8 = [op for op in compute if tensors[op["outputs"][0]]["name"] not in kept]
            assert len(int8) >= 96 - len(kept) and all(
                tensors[op["inputs"][0]]["dtype"] == np.int8 and tensors[op["inputs"][1]]["dtype"] == np.int8
                for op in int8)
            assert meta["calibration"]["images"] == 200


def test_metadata_round_trip(exported):
    bundle, _ = exported
    for name, precision in (("model.onnx", "fp32"), ("model.fp16.onnx", "fp16"), ("model.int8.onnx", "int8")):
        proto_meta = read_onnx_metadata(onnx.load(str(bundle.path / name)))
        session = ort.InferenceSession(str(bundle.path / name), providers=["CPUExecutionProvider"])
        ort_meta = read_onnx_metadata(session.get_modelmeta())
        assert proto_meta == ort_meta
        assert ort_meta["labels"] == [-2, 3, 10]
        assert ort_meta["precision"] == precision
        assert ort_meta["input"]["dtype"] == "uint8" and ort_meta["input"]["height"] == 75
        assert ort_meta["source_model_sha256"] == bundle.meta["model"]["sha256"]
        assert "127.5" in ort_meta["preprocessing"]["steps"]
    assert read_onnx_metadata(onnx.load(str(bundle.path / "model.int8.onnx")))["calibration"]["images"] == 200


@pytest.mark.slow  # exports three formats
def test_validation_failure_keeps_an_unvalidated_file(tiny_exported, tmp_path):
    """A failed build is kept as *.unvalidated.*; it never replaces a validated artifact."""
    bundle, _ = tiny_exported
    path = tmp_path / "bundle"
    shutil.copytree(bundle.path, path)
    meta = json.loads((path / "bundle.json").read_text())
    for fmt in ("onnx-int8", "openvino-int8"):  # these two have no earlier artifact; onnx has a validated one
        del meta["artifacts"][fmt]
    (path / "bundle.json").write_text(json.dumps(meta))
    impossible = Tolerance(rtol=0.0, atol=0.0, min_agreement=1.01, max_accuracy_drop=-1.0)
    tolerances = {"fp32": impossible, "int8": impossible}
    with pytest.raises(ValidationError, match=r"onnx: max \|logit diff\|, top-1 agreement, accuracy drop "
                                              r"\(kept as model.unvalidated.onnx\); onnx-int8: .*"
                                              r"model.int8.unvalidated.onnx"):
        export_bundle(path, "onnx,onnx-int8,openvino-int8", ExportOptions(
            calibration_images=100, tolerances=tolerances, int8_target=Int8Target(max_trials=0)))
    for name in ("model", "model.int8"):
        assert (path / f"{name}.unvalidated.onnx").is_file()
    artifacts = Bundle.load(path).meta["artifacts"]
    # The validated ONNX model and its record are still in force, untouched.
    assert artifacts["onnx"] == meta["artifacts"]["onnx"]
    assert sha256_file(path / "model.onnx") == artifacts["onnx"]["sha256"]
    for fmt, name in (("onnx-int8", "model.int8.unvalidated.onnx"),
                      ("openvino-int8", "model.int8.openvino.unvalidated.xml")):
        assert artifacts[fmt]["status"] == "failed-validation" and artifacts[fmt]["file"] == name
    # An IR's weights are renamed with it, so OpenVINO still finds them.
    assert artifacts["openvino-int8"]["weights_file"] == "model.int8.openvino.unvalidated.bin"
    assert (path / "model.int8.openvino.unvalidated.bin").is_file()


def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(InvalidInputError, match=r"\['tflite2'\].*'onnx', 'onnx-fp16', 'onnx-int8', 'openvino'"):
        parse_formats("onnx,tflite2")
    assert [f.name for f in parse_formats("onnx-int8,onnx")] == ["onnx", "onnx-int8"]
    # What a format is converted from is built too, in order.
    assert [f.name for f in parse_formats("openvino-int8")] == ["onnx", "openvino-int8"]
    assert [f.name for f in parse_formats("tensorrt")] == ["onnx", "onnx-fp16", "tensorrt"]


def test_every_format_has_its_builder():
    from edgeclf.export.builders import Builders

    for name in FORMATS:
        assert callable(getattr(Builders, name.replace("-", "_"), None)), name


def test_bundle_missing_or_corrupt(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        export_bundle(tmp_path / "nothing", "onnx")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bundle.json").write_text("{")
    with pytest.raises(BundleError, match="corrupt"):
        export_bundle(tmp_path / "b", "onnx")


def test_missing_library_names_the_extra(monkeypatch, tiny_exported):
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)  # as if not installed
    with pytest.raises(BackendUnavailableError, match=r"onnxconverter_common.*pip install 'edgeclf\[export\]'"):
        export_bundle(tiny_exported[0].path, "onnx-fp16")


@pytest.mark.slow  # quantizes to INT8
def test_calibration_images_none_or_few(tiny_exported, tmp_path):
    bundle, _ = tiny_exported
    path = tmp_path / "bundle"
    shutil.copytree(bundle.path, path)
    with pytest.raises(InvalidInputError, match="calibration image count must be >= 1"):
        export_bundle(path, "onnx-int8", ExportOptions(calibration_images=0))
    with pytest.warns(UserWarning, match="calibrating INT8 on only 20 images"):
        records = export_bundle(path, "onnx-int8", ExportOptions(calibration_images=20, validate=False))
    # Not validated, so it does not replace the validated INT8 model: it is kept beside it.
    assert (records[-1]["status"], records[-1]["file"]) == ("unvalidated", "model.int8.unvalidated.onnx")
    assert (path / "model.int8.unvalidated.onnx").is_file()
    assert Bundle.load(path).meta["artifacts"]["onnx-int8"] == bundle.meta["artifacts"]["onnx-int8"]


def test_bundle_trained_on_arrays_needs_data(tiny_exported, tmp_path):
    bundle, _ = tiny_exported
    path = tmp_path / "bundle"
    shutil.copytree(bundle.path, path)
    meta = json.loads((path / "bundle.json").read_text())
    meta["training"]["data"]["source"] = "arrays"
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="--data"):
        export_bundle(path, "onnx")


@pytest.mark.slow  # runs tf2onnx
def test_converter_failure_carries_its_message(tiny_exported, tmp_path):
    bundle, _ = tiny_exported
    path = tmp_path / "bundle"
    shutil.copytree(bundle.path, path)
    with pytest.raises(ConversionError, match=r"tf2onnx (could not convert the model|produced an invalid graph) \(opset 1\)"):
        export_bundle(path, "onnx", ExportOptions(opset=1, validate=False))


def test_calibration_reads_images_in_chunks_onnxruntime_can_stride_over():
    """onnxruntime calibrates chunk by chunk only through len() and set_range() (CalibStridedMinMax),
    and only with a chunk that divides the batch count: a 299x299 export otherwise held every
    activation of 300 images at once (over 23 GB)."""
    from edgeclf.export.onnx_int8 import _ImageReader

    images = np.arange(300).reshape(300, 1, 1, 1)  # image i holds the number i
    one_by_one = _ImageReader(images, batch_size=1)  # the histogram calibrators' batches
    assert len(one_by_one) == 300 and one_by_one.chunk() == 15 and 300 % one_by_one.chunk() == 0
    by_16 = _ImageReader(images, batch_size=16)  # 19 batches, the last of 12 images
    assert len(by_16) == 19 and by_16.chunk() == 1
    by_16.set_range(17, 19)
    assert [int(b["pixels"][0, 0, 0, 0]) for b in iter(by_16.get_next, None)] == [272, 288]
    assert _ImageReader(images[:40], batch_size=4).chunk() == 2  # 10 batches: 2 of them hold 8 images


@pytest.mark.slow  # exports
def test_export_cli_passes_calibration_method_full_range_and_other_data(tiny_bundle, digits_dir, tmp_path):
    """``export --calibration-method entropy --full-range-int8 --data DIR`` reaches the artifact:
    the record names the calibrator and the 8-bit weights, and validation ran on DIR's images."""
    from tests.conftest import NONCONTIGUOUS, run_cli

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, bundle)
    data = tmp_path / "other"  # images training never saw, under the bundle's labels
    for label, digit in NONCONTIGUOUS.items():
        shutil.copytree(digits_dir / "test" / str(digit), data / str(label))
    out = run_cli("export", str(bundle), "--format", "onnx-int8", "--calibration-method", "entropy",
                  "--full-range-int8", "--data", str(data), "--calibration-images", "60",
                  "--int8-min-agreement", "0.9", "--int8-max-accuracy-drop", "0.05", "--int8-search-trials", "0")
    meta = json.loads((bundle / "bundle.json").read_text())
    record = meta["artifacts"]["onnx-int8"]
    assert record["calibration"] == {"images": 60, "method": "entropy", "reduce_range": False}
    assert record["quantization"]["calibrations"][0]["calibration"] == "entropy"  # no other calibrator tried
    assert record["needs_int8_dot_product"] is True
    drawn = meta["verification_set"]["drawn"]
    images = sum(1 for _ in data.rglob("*.png"))
    assert drawn["from"] == str(data) and drawn["held_out_images"] < images
    # 8-bit weights saturate on CPUs without VNNI, so validation may fail there: then the exit
    # status and the record both say so.
    assert (out.returncode == 0) == (record["status"] == "validated"), out.stderr[-2000:]
    # stdout stays for results: the entropy calibrator's own prints do not reach it.
    assert "Collecting tensor data" not in out.stdout and "histogram" not in out.stdout, out.stdout[-2000:]
