"""The environment a benchmark ran in: CPU, GPU, and every relevant library's version."""

from __future__ import annotations

import platform
import sys
from typing import Any

from edgeclf.runtime.fingerprint import fingerprint
from edgeclf.runtime.hardware import detect
from edgeclf.versions import installed_versions

PACKAGES = ("edgeclf", "numpy", "Pillow", "onnxruntime", "onnxruntime-gpu", "openvino", "ai-edge-litert",
            "tensorrt", "tensorrt-rtx-cu12", "tensorflow", "keras", "tf2onnx", "onnx")


def environment() -> dict[str, Any]:
    hw = detect()
    return {
        "cpu": hw.cpu_model, "cpu_vendor": hw.cpu_vendor, "cpu_flags": sorted(hw.cpu_flags), "cores": hw.cores,
        "gpu_compute_capability": hw.gpu_compute_capability, "platform": platform.platform(),
        "python": sys.version.split()[0], "versions": installed_versions(PACKAGES),
        "machine": fingerprint(hw),  # the key auto matches stored rows against
    }
