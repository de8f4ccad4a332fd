"""Which machine a measurement belongs to: speed and INT8 numerics depend on the CPU and GPU.

A benchmark row from an AMX workstation says nothing about an AVX2 device. Rows are
stored under the key of the machine that measured them, and ``backend="auto"`` trusts
only the rows whose key is this machine's: the same CPU model and ISA flags that decide
the fast path, and the same GPU.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from edgeclf.runtime.hardware import Hardware, detect
from edgeclf.versions import installed_versions

#: Libraries whose version changes what a backend runs (recorded, not part of the key).
BACKEND_PACKAGES = ("onnxruntime", "onnxruntime-gpu", "openvino", "ai-edge-litert", "tensorrt", "tensorrt-rtx-cu12")


def machine_key(hardware: Hardware | None = None) -> str:
    """16 hex digits naming this kind of machine: CPU vendor, model and ISA flags, and GPU."""
    hw = hardware or detect()
    what = [hw.cpu_vendor, hw.cpu_model, sorted(hw.cpu_flags), hw.gpu_compute_capability]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def fingerprint(hardware: Hardware | None = None) -> dict[str, Any]:
    """What a stored result records about the machine that produced it."""
    hw = hardware or detect()
    return {"key": machine_key(hw), "cpu_vendor": hw.cpu_vendor, "cpu_model": hw.cpu_model,
            "cpu_flags": sorted(hw.cpu_flags), "cores": hw.cores,
            "gpu_compute_capability": hw.gpu_compute_capability,
            "libraries": installed_versions(BACKEND_PACKAGES)}


def describe_machine(record: dict[str, Any]) -> str:
    """A fingerprint in a few words, for messages."""
    flags = ",".join(record.get("cpu_flags") or []) or "no listed ISA flags"
    gpu = record.get("gpu_compute_capability")
    return f"{record.get('cpu_model', 'unknown CPU')} ({flags})" + (f", GPU {gpu}" if gpu else "")
