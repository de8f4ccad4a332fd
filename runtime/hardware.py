"""What this machine offers an inference backend: CPU vendor and ISA extensions, GPU."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

from edgeclf.gpu import local_compute_capability

#: /proc/cpuinfo flags that decide which CPU path is fast.
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "asimddp")


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
    def int8_class(self) -> str:
        """How the CPU multiplies INT8: "vnni" (VNNI, AMX or ARM dot product: 8-bit products summed
        in 32 bits) or "avx2" (u8 x s8 pairs summed in int16, which saturates with 8-bit weights)."""
        return "vnni" if self.vnni else "avx2"

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


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    """The machine's hardware, read once (``/proc/cpuinfo``, ``nvidia-smi``)."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return Hardware(
        cpu_vendor=info.get("vendor_id") or ("ARM" if "CPU implementer" in info else platform.machine()),
        cpu_model=info.get("model name") or platform.processor() or platform.machine(),
        cpu_flags=frozenset(flags & set(_FLAGS)),
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        gpu_compute_capability=local_compute_capability(),
    )
