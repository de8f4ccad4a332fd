"""Finding the GPU, and what export and doctor do with a GPU the installed TensorRT cannot build for.

No GPU here: the ways edgeclf asks after the CUDA driver are exercised with what a real
machine shows them. An executable ``nvidia-smi`` on PATH prints what the real tool prints
on an H200 or a Jetson (where it says "[N/A]"), and a device-tree model file holds a
Jetson's. On a machine whose CUDA driver answers, these fallbacks are never reached and
the tests are skipped.
"""

from __future__ import annotations

import json
import os
import warnings
from unittest.mock import ANY

import pytest

from edgeclf import gpu
from edgeclf.errors import IncompatibleArtifactError
from tests.conftest import run_cli


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """Set what ``nvidia-smi`` prints and what the device tree says; returns the setter."""
    gpu.find_gpu.cache_clear()
    if gpu.find_gpu().gpu is not None and gpu.find_gpu().gpu.found_by.startswith("CUDA driver"):
        pytest.skip("the CUDA driver answers on this machine: the fallback ways are never asked")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(gpu, "DEVICE_TREE_MODEL", tmp_path / "model")
    monkeypatch.setattr(gpu, "TEGRA_RELEASE", tmp_path / "nv_tegra_release")

    def set_machine(smi_prints: str | None, board: str | None = None) -> dict[str, str]:
        if smi_prints is not None:
            smi = bin_dir / "nvidia-smi"
            smi.write_text(f"#!/bin/sh\nprintf '%s\\n' '{smi_prints}'\n")
            smi.chmod(0o755)
        if board is not None:
            (tmp_path / "model").write_bytes(board.encode() + b"\0")  # the device tree ends it with NUL
            (tmp_path / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
        gpu.find_gpu.cache_clear()
        return {"PATH": os.environ["PATH"]}

    yield set_machine
    gpu.find_gpu.cache_clear()


def test_nvidia_smi_names_the_gpu_when_the_driver_cannot_be_asked(machine):
    machine("NVIDIA H200, 9.0")
    search = gpu.find_gpu()
    assert search.gpu == gpu.Gpu("NVIDIA H200", "9.0", "nvidia-smi")
    assert "CUDA driver (cuda-python)" in search.tried  # asked first, and why it did not answer is kept
    assert gpu.local_compute_capability() == "9.0"


def test_a_jetson_is_found_by_its_device_tree_where_nvidia_smi_says_na(machine):
    machine("Orin (nvgpu), [N/A]", board="NVIDIA Jetson AGX Orin Developer Kit")
    search = gpu.find_gpu()
    assert search.gpu == gpu.Gpu("NVIDIA Jetson AGX Orin Developer Kit", "8.7", "Jetson device tree",
                                 "NVIDIA Jetson AGX Orin Developer Kit")
    assert "no compute capability in its answer 'Orin (nvgpu), [N/A]'" in search.tried["nvidia-smi"]


def test_no_gpu_says_what_was_asked(machine):
    machine(None)
    search = gpu.find_gpu()
    assert search.gpu is None and gpu.local_compute_capability() is None
    assert list(search.tried) == ["CUDA driver (cuda-python)", "NVML", "nvidia-smi", "Jetson device tree"]
    assert "not on PATH" in search.tried["nvidia-smi"]


def test_doctor_shows_the_gpu_and_how_it_was_found(machine):
    env = machine("NVIDIA H200, 9.0")
    out = run_cli("doctor", env=env)
    assert out.returncode == 0, out.stderr
    assert "nvidia_gpu: NVIDIA H200, compute capability 9.0 (found by nvidia-smi)" in out.stdout
    out = run_cli("doctor", "--json", env=env)
    assert json.loads(out.stdout)["hardware"]["gpu"] == {
        "name": "NVIDIA H200", "compute_capability": "9.0", "found_by": "nvidia-smi", "jetson": None,
        "tried": {"CUDA driver (cuda-python)": ANY, "NVML": ANY}}


def test_tensorrt_rtx_on_a_gpu_it_cannot_build_for_leaves_the_engine_out(machine):
    """An H200 (9.0) with TensorRT-RTX installed: a clear refusal for the engine alone, not a KeyError."""
    trt_engine = pytest.importorskip("edgeclf.export.tensorrt_engine")
    from edgeclf.export.exporter import ExportOptions, _buildable_only, _check_buildable
    from edgeclf.formats import FORMATS
    from edgeclf.runtime.backends.tensorrt import tensorrt_module

    if tensorrt_module()[1] != "tensorrt-rtx":
        pytest.skip("full TensorRT builds for whatever GPU it runs on")
    machine("NVIDIA H200, 9.0")
    with pytest.raises(IncompatibleArtifactError, match=r"builds engines for compute capabilities \['7.5'.*; "
                                                        r"this machine's GPU \(NVIDIA H200\) is 9.0.*edgeclf\[gpu\]"):
        trt_engine.engine_targets()
    assert trt_engine.engine_targets(("8.6",)) == ["8.6"]  # ahead of time for another GPU still works

    with pytest.raises(IncompatibleArtifactError, match="format 'tensorrt' cannot be built here: TensorRT-RTX"):
        _check_buildable([FORMATS["onnx"], FORMATS["onnx-fp16"], FORMATS["tensorrt"]], ExportOptions())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = _buildable_only([FORMATS["tensorrt"], FORMATS["tensorrt-int8"]], ExportOptions())
    assert kept == []
    skipped = [str(w.message) for w in caught if "'all' skips tensorrt" in str(w.message)]
    assert len(skipped) == 2 and all("is 9.0" in m for m in skipped)

    out = run_cli("doctor", env={"PATH": os.environ["PATH"]})
    assert "not this GPU's 9.0: pip install 'edgeclf[gpu]'" in out.stdout


@pytest.mark.gpu
def test_a_real_gpu_is_named_and_doctor_says_what_runs_on_it():
    search = gpu.find_gpu()
    found = search.gpu
    assert found.name and found.compute_capability.replace(".", "").isdigit()
    out = run_cli("doctor", "--json")
    report = json.loads(out.stdout)
    assert report["hardware"]["gpu"]["compute_capability"] == found.compute_capability
    tensorrt = {r["backend"]: r for r in report["backends"]}["tensorrt"]
    # Usable, or installed-but-not-for-this-GPU with the reason; never a traceback.
    assert tensorrt["usable"] or "not installed" in tensorrt["why"] or "not this GPU's" in tensorrt["why"]
