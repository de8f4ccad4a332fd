"""What this machine offers an inference backend: CPU vendor and ISA extensions, GPU."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

from edgeclf.gpu import local_compute_capability

#: /proc/cpuinfo flags that decide which CPU path is fast (on ARM, from the kernel's HWCAP words).
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "asimddp",
          "i8mm", "sve")
#: AArch64 HWCAP and HWCAP2 bits (Linux, arch/arm64/include/uapi/asm/hwcap.h), read from the process's
#: auxiliary vector: QEMU's user mode fills it for the CPU it emulates (QEMU_CPU), while its
#: /proc/cpuinfo is the host's, so on ARM these decide, not /proc/cpuinfo's text.
_ARM_HWCAP = {"asimd": 1 << 1, "asimddp": 1 << 20, "sve": 1 << 22}
_ARM_HWCAP2 = {"i8mm": 1 << 13}
_AT_HWCAP, _AT_HWCAP2 = 16, 26
#: ARM's part numbers (/proc/cpuinfo "CPU part") of the cores on common boards.
_ARM_PARTS = {"0xd03": "Cortex-A53 (Raspberry Pi 3)", "0xd08": "Cortex-A72 (Raspberry Pi 4)",
              "0xd0b": "Cortex-A76 (Raspberry Pi 5)", "0xd42": "Cortex-A78AE (Jetson Orin)",
              "0xd41": "Cortex-A78", "0xd05": "Cortex-A55"}


@dataclass(frozen=True)
class Hardware:
    cpu_vendor: str  # "GenuineIntel", "AuthenticAMD", "ARM"...
    cpu_model: str
    cpu_flags: frozenset[str]
    cores: int
    gpu_compute_capability: str | None

    @property
    def intel(self) -> bool:
        return self.cpu_vendor == "GenuineIntel"

    @property
    def vnni(self) -> bool:
        """INT8 dot products in one instruction (x86 VNNI, or ARM's dot product)."""
        return bool(self.cpu_flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.cpu_flags

    @property
    def bf16(self) -> bool:
        """BF16 arithmetic in hardware: AMX, or AVX512_BF16 (AMD Zen 4 and 5, Intel Cooper Lake).
        OpenVINO runs FP32 models in BF16 by default on both."""
        return bool(self.cpu_flags & {"amx_bf16", "avx512_bf16"})

    @property
    def int8_saturates(self) -> bool:
        """Whether full-range 8-bit INT8 saturates here: only on x86 without VNNI or AMX, where
        AVX2's VPMADDUBSW sums pairs of u8 x s8 products in int16. ARM does not, dot product or not:
        on an emulated Cortex-A72 (a Raspberry Pi 4: no dot product; exact integer arithmetic) ONNX
        Runtime's full-range INT8 InceptionV3 gave the x86 VNNI run's figures to the last digit
        (agreement 0.9897, max |logit diff| 33.3, accuracy 0.9321 on 486 images; tests/arm_leg.py)."""
        return self.cpu_vendor != "ARM" and not self.vnni

    @property
    def int8_class(self) -> str:
        """How the CPU multiplies INT8: "vnni" (8-bit products summed in 32 bits: VNNI, AMX, any ARM)
        or "avx2" (u8 x s8 pairs summed in int16, which saturates with 8-bit weights)."""
        return "avx2" if self.int8_saturates else "vnni"

    def summary(self) -> str:
        flags = ",".join(sorted(self.cpu_flags)) or "none of note"
        gpu = f"NVIDIA GPU (compute capability {self.gpu_compute_capability})" \
            if self.gpu_compute_capability else "no NVIDIA GPU"
        return f"{self.cpu_model} ({self.cores} cores; {flags}); {gpu}"


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor describes them all
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass  # not Linux: flags unknown, which only makes the automatic choice conservative
    return info


def _arm_hwcaps() -> set[str] | None:
    """The AArch64 features the kernel (or QEMU) gives this process, from /proc/self/auxv; None if unreadable."""
    import struct

    try:
        with open("/proc/self/auxv", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    words = dict(struct.iter_unpack("<QQ", data[:len(data) // 16 * 16]))
    hwcap, hwcap2 = words.get(_AT_HWCAP, 0), words.get(_AT_HWCAP2, 0)
    return ({name for name, bit in _ARM_HWCAP.items() if hwcap & bit}
            | {name for name, bit in _ARM_HWCAP2.items() if hwcap2 & bit})


def _arm_model(info: dict[str, str]) -> str:
    """A real board's core (and board, where the kernel names it), or what an emulated one runs on."""
    if "vendor_id" in info:  # an x86 host's /proc/cpuinfo: QEMU's user mode passes it through
        return f"AArch64 under emulation (QEMU; /proc/cpuinfo is the host's: {info.get('model name', 'unknown')})"
    core = _ARM_PARTS.get(info.get("CPU part", "").lower(), f"ARM core {info.get('CPU part', 'unknown')}")
    board = info.get("Model") or ""
    try:
        with open("/proc/device-tree/model", encoding="utf-8", errors="replace") as fh:
            board = board or fh.read().strip("\0\n ")
    except OSError:
        pass
    return f"{board}: {core}" if board else core


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    """The machine's hardware, read once (``/proc/cpuinfo``, the auxiliary vector on ARM, ``nvidia-smi``)."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    model = info.get("model name") or platform.processor() or platform.machine()
    vendor = info.get("vendor_id") or ("ARM" if "CPU implementer" in info else platform.machine())
    if platform.machine().lower() in ("aarch64", "arm64"):
        hwcaps = _arm_hwcaps()
        # Never an emulating x86 host's "flags": a real board's "Features" where the auxiliary vector is unreadable.
        flags = hwcaps if hwcaps is not None else set((info.get("Features") or "").split())
        vendor, model = "ARM", _arm_model(info)
    return Hardware(
        cpu_vendor=vendor,
        cpu_model=model,
        cpu_flags=frozenset(flags & set(_FLAGS)),
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        gpu_compute_capability=local_compute_capability(),
    )
