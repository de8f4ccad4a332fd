"""What NVIDIA GPU this machine has, asked of ``nvidia-smi`` (no CUDA library needed)."""

from __future__ import annotations

import functools
import shutil
import subprocess


@functools.lru_cache(maxsize=1)
def local_compute_capability() -> str | None:
    """The first GPU's compute capability ("8.6"), or None without a usable NVIDIA GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None  # driver not loaded, no device visible: no GPU for our purposes
    first = done.stdout.strip().splitlines()
    return first[0].strip() if first else None
