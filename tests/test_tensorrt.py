"""TensorRT FP16 and INT8 engines: a real build (tensorrt_rtx builds without a GPU) and the engine file's header."""

from __future__ import annotations

import pytest

from edgeclf.engine_file import (
    FORMAT, MAGIC, check_engine_compatible, read_engine, read_engine_header, write_engine,
)
from edgeclf.errors import BundleError, ConversionError, IncompatibleArtifactError, InvalidInputError
from edgeclf.fsio import sha256_file
from tests.conftest import engine_record, run_cli

pytest.importorskip("onnx")
try:
    from edgeclf.export.tensorrt_engine import EngineOptions, onnx_to_engine, tensorrt_module

    TRT, FLAVOUR = tensorrt_module()
except ImportError:  # BackendUnavailableError is an ImportError
    pytest.skip("neither tensorrt nor tensorrt_rtx is installed (pip install 'edgeclf[rtx]')",
                allow_module_level=True)


def test_exported_engine_describes_itself(exported):
    bundle, records = exported
    record = engine_record(records, "tensorrt")
    header, plan = read_engine(bundle.path / record["file"])
    assert header["labels"] == [-2, 3, 10] and header["precision"] == "fp16"
    assert header["input"]["dtype"] == "uint8" and (header["input"]["height"], header["input"]["width"]) == (75, 75)
    assert header["tensorrt"] == {"flavour": FLAVOUR, "version": TRT.__version__, "strongly_typed": True}
    assert header["onnx_file"] == "model.fp16.onnx"
    assert header["onnx_sha256"] == sha256_file(bundle.path / "model.fp16.onnx") == record["source_sha256"]
    assert header["source_model_sha256"] == bundle.meta["model"]["sha256"]
    assert header["profile"] == {"input": "pixels", "min": [1, 75, 75, 3], "opt": [8, 75, 75, 3],
                                 "max": [32, 75, 75, 3]}
    assert {(t["name"], t["dtype"]) for t in header["io"]} == {("pixels", "UINT8"), ("logits", "FLOAT"),
                                                              ("label", "INT64"), ("embedding", "FLOAT")}
    assert record["target"] == header["target"] and header["target"]["compute_capabilities"]
    # The plan holds the FP16 weights (InceptionV3: ~48 MB), not just a graph.
    assert len(plan) == header["plan_bytes"] > 0.8 * (bundle.path / "model.fp16.onnx").stat().st_size


def test_int8_engine_is_built_from_a_symmetric_qdq_graph_and_never_called_validated_without_a_gpu(exported):
    """TensorRT's explicit quantization: INT8 activations with zero point 0, float biases; the
    engine holds INT8 weights (about a quarter of FP32). Its QDQ graph is checked on ONNX Runtime,
    but only a GPU run validates the engine."""
    from edgeclf.gpu import local_compute_capability

    bundle, records = exported
    record = engine_record(records, "tensorrt-int8")
    header, plan = read_engine(bundle.path / record["file"])
    assert header["precision"] == "int8" and record["precision"] == "int8"
    assert record["file"] == "model.int8.engine" and header["onnx_file"] == ".model.int8.qdq.onnx"
    assert not (bundle.path / ".model.int8.qdq.onnx").exists()  # the QDQ graph was a step, not an artifact
    if local_compute_capability() is None:
        assert record["status"] == "unvalidated" and "no NVIDIA GPU" in record["validation"]["skipped"]
        if FLAVOUR == "tensorrt-rtx":  # Turing gets no INT8 engine: TensorRT-RTX has no FP32 GEMM for it
            assert "7.5" not in header["target"]["compute_capabilities"]
            assert "8.0" in header["target"]["compute_capabilities"]
    on_cpu = record["quantization"]["qdq_graph_on_onnxruntime"]
    assert 0.5 < on_cpu["agreement"] <= 1.0 and isinstance(on_cpu["passed"], bool)
    from edgeclf.runtime.hardware import detect

    # Without VNNI the CPU saturates these full-range weights: the figure is flagged as a lower bound.
    assert ("lower bound" in record["quantization"]["note"]) == (not detect().vnni)
    assert len(plan) < 0.5 * (bundle.path / "model.onnx").stat().st_size
    assert record["calibration"] == {"images": 200, "method": "minmax", "reduce_range": False}


def test_build_options_reach_the_engine(exported, tmp_path):
    if FLAVOUR != "tensorrt-rtx":
        pytest.skip("choosing compute capabilities is a TensorRT-RTX (ahead-of-time) feature")
    bundle, _ = exported
    header = onnx_to_engine(bundle.path / "model.fp16.onnx", tmp_path / "e.engine", {"labels": [-2, 3, 10]},
                            EngineOptions(batch_profile=(2, 4, 16), workspace_mib=256, compute_capabilities=("8.6",)))
    assert header == read_engine_header(tmp_path / "e.engine")
    assert header["target"]["compute_capabilities"] == ["8.6"]
    assert header["profile"]["min"][0] == 2 and header["profile"]["max"][0] == 16
    assert header["workspace_bytes"] == 256 << 20


def test_bad_build_input(exported, tmp_path):
    bundle, _ = exported
    src = bundle.path / "model.fp16.onnx"
    with pytest.raises(InvalidInputError, match=r"MIN <= OPT <= MAX.*\(8, 4, 16\)"):
        EngineOptions(batch_profile=(8, 4, 16))
    if FLAVOUR == "tensorrt-rtx":
        with pytest.raises(InvalidInputError, match=r"unknown compute capability \['9.9'\]"):
            onnx_to_engine(src, tmp_path / "e.engine", {}, EngineOptions(compute_capabilities=("9.9",)))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    # TensorRT-RTX is told a target it supports, so that the parser is reached on any machine.
    options = EngineOptions(compute_capabilities=("8.6",) if FLAVOUR == "tensorrt-rtx" else None)
    with pytest.raises(ConversionError, match="ONNX parser rejected broken.onnx: .*parse"):
        onnx_to_engine(broken, tmp_path / "e.engine", {}, options)
    assert not (tmp_path / "e.engine").exists()


def test_header_round_trip_and_damage(tmp_path):
    path = tmp_path / "m.engine"
    written = write_engine(path, {"labels": [3, 4], "tensorrt": {"flavour": "tensorrt-rtx", "version": "1.0"},
                                  "target": {"compute_capabilities": ["8.6"]},
                                  "profile": {"min": [1, 75, 75, 3], "opt": [8, 75, 75, 3], "max": [32, 75, 75, 3]}},
                           b"PLAN" * 1000)
    assert path.read_bytes().startswith(MAGIC)
    header, plan = read_engine(path)
    assert header == written == read_engine_header(path) and header["format"] == FORMAT and plan == b"PLAN" * 1000

    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(BundleError, match="truncated or altered"):
        read_engine(path)
    path.write_bytes(data[:-1] + b"X")
    with pytest.raises(BundleError, match="truncated or altered"):
        read_engine(path)
    path.write_bytes(data[:20])
    with pytest.raises(BundleError, match="ends inside the engine header"):
        read_engine_header(path)
    path.write_bytes(b"\x00" * 64)  # a bare TensorRT plan, or anything else
    with pytest.raises(BundleError, match="not an edgeclf TensorRT engine"):
        read_engine_header(path)
    write_engine(path, {}, b"")
    path.write_bytes(path.read_bytes().replace(FORMAT.encode(), b"edgeclf-engine/9"))
    with pytest.raises(BundleError, match="'edgeclf-engine/9' is not supported"):
        read_engine_header(path)


def test_engine_refuses_another_tensorrt_or_gpu():
    header = {"tensorrt": {"flavour": "tensorrt-rtx", "version": "1.7.1.116"},
              "target": {"compute_capabilities": ["8.6", "8.9"]}}
    check_engine_compatible(header, "tensorrt-rtx", "1.7.1.116", "8.9")
    check_engine_compatible(header, "tensorrt-rtx", "1.7.1.116", None)
    with pytest.raises(IncompatibleArtifactError, match=r"built with tensorrt-rtx 1.7.1.116, but tensorrt 10.3"):
        check_engine_compatible(header, "tensorrt", "10.3", "8.6")
    with pytest.raises(IncompatibleArtifactError, match=r"\['8.6', '8.9'\], but this GPU is 9.0"):
        check_engine_compatible(header, "tensorrt-rtx", "1.7.1.116", "9.0")


def test_cli_rejects_a_bad_batch_profile(tmp_path):
    out = run_cli("export", str(tmp_path), "--format", "tensorrt", "--batch-profile", "1,8")
    assert out.returncode == 1
    assert "--batch-profile expects three integers MIN,OPT,MAX such as 1,8,32. Received: '1,8'" in out.stderr


def test_engine_is_built_on_the_device_from_a_package_without_tensorflow(tiny_exported, tmp_path):
    """pack --for tensorrt ships the FP16 ONNX; `edgeclf engine` builds the engine where it runs (here with
    TensorRT-RTX, which needs no GPU), records it in the package and never imports TensorFlow."""
    import json
    import subprocess
    import sys

    from edgeclf.bundle import Bundle
    from edgeclf.pack import pack
    from tests.conftest import HANG_S

    package = tmp_path / "pkg"
    report = pack(tiny_exported[0].path, ["tensorrt"], package)
    assert report.formats == ["onnx-fp16"] and report.build_on_device == ["tensorrt"]
    assert not (package / "model.fp16.engine").exists()
    assert Bundle.load(package).meta["package"]["build_on_device"] == {"tensorrt": "onnx-fp16"}

    code = ("import sys; from edgeclf.cli import main; status = main(sys.argv[1:]); "
            "print('tensorflow imported:', 'tensorflow' in sys.modules); sys.exit(status)")
    target = ["--trt-compute-capability", "8.6"] if FLAVOUR == "tensorrt-rtx" else []
    done = subprocess.run([sys.executable, "-c", code, "engine", str(package), *target], capture_output=True,
                          text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "tensorflow imported: False"
    meta = Bundle.load(package).meta
    record = meta["artifacts"]["tensorrt"]
    assert record["built_by"] == "edgeclf engine" and record["source_sha256"] == sha256_file(package / "model.fp16.onnx")
    assert meta["package"]["files"]["model.fp16.engine"]["sha256"] == sha256_file(package / "model.fp16.engine")
    assert meta["package"]["formats"] == ["onnx-fp16", "tensorrt"] and "build_on_device" not in meta["package"]
    if record["target"]["built_on_gpu"] is None:  # no GPU: unvalidated, with the reason
        assert record["status"] == "unvalidated" and "edgeclf verify" in record["validation"]["skipped"]
        assert "not verified here" in done.stdout

    again = run_cli("engine", str(package), *target)
    assert again.returncode == 0 and "(reused)" in again.stdout, again.stderr[-2000:]
    verified = run_cli("verify", str(package), "--allow-small-set", "--json")
    assert verified.returncode == 0, verified.stderr[-2000:]  # the package as packed, plus its engine
    assert json.loads(verified.stdout)["results"]["onnx-fp16"]["passed"]

    missing = run_cli("engine", str(tiny_exported[0].path / "nowhere"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
