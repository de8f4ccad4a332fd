"""Which NVIDIA GPU this machine has, and how that was found out.

Asked in order of trust: the CUDA driver itself (cuda-python), NVML (``pynvml``, where
installed), ``nvidia-smi``, and on a Jetson the L4T release file and device tree. The
driver answers on desktops, servers and Jetsons alike; ``nvidia-smi`` is absent or says
"N/A" on Jetsons (JetPack 5/6), which is why it is not the only way. No CUDA library is
required: where none answers, the machine has no usable GPU for our purposes.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

#: Where L4T (the Jetson Linux) says it is one, and where the board names itself.
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
#: Jetson modules by the word their device-tree model holds -> GPU compute capability. Used
#: only when the CUDA driver cannot be asked (no cuda-python): the driver knows better.
JETSON_COMPUTE = {"thor": "11.0", "orin": "8.7", "xavier": "7.2", "tx2": "6.2", "tx1": "5.3", "nano": "5.3"}


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "9.0"
    found_by: str  # "CUDA driver (cuda-python)", "NVML", "nvidia-smi", "Jetson device tree"
    jetson: str | None = None  # the board's device-tree model on a Jetson


@dataclass(frozen=True)
class GpuSearch:
    """The GPU found (or None) and why each way that did not answer did not."""

    gpu: Gpu | None
    tried: dict[str, str] = field(default_factory=dict)


def _driver(board: str | None) -> Gpu:
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        from cuda import cuda as driver  # older cuda-python; ImportError if neither

    def ok(result):
        err, *rest = result
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{err.name}")
        return rest[0] if len(rest) == 1 else rest

    ok(driver.cuInit(0))
    if ok(driver.cuDeviceGetCount()) < 1:
        raise RuntimeError("the driver sees no device")
    device = ok(driver.cuDeviceGet(0))
    attr = driver.CUdevice_attribute
    major = ok(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device))
    minor = ok(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device))
    name = ok(driver.cuDeviceGetName(256, device))
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    return Gpu(name, f"{major}.{minor}", "CUDA driver (cuda-python)", board)


def _nvml(board: str | None) -> Gpu:
    import pynvml  # nvidia-ml-py; ImportError where not installed

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
    finally:
        pynvml.nvmlShutdown()
    return Gpu(name, f"{major}.{minor}", "NVML", board)


def _smi(board: str | None) -> Gpu:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise FileNotFoundError("not on PATH")
    done = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=20, check=True)
    first = (done.stdout.strip().splitlines() or [""])[0]
    name, _, cap = first.rpartition(",")
    if not re.fullmatch(r"\d+\.\d+", cap.strip()):  # "[N/A]" on a Jetson, nothing without a device
        raise RuntimeError(f"no compute capability in its answer {first!r}")
    return Gpu(name.strip(), cap.strip(), "nvidia-smi", board)


def _jetson_board() -> str | None:
    """The Jetson's device-tree model ("NVIDIA Jetson AGX Orin Developer Kit"), or None elsewhere."""
    try:
        model = DEVICE_TREE_MODEL.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    except OSError:
        model = ""
    if "jetson" in model.lower():
        return model
    return (model or "an L4T board") if TEGRA_RELEASE.exists() else None


def _jetson(board: str | None) -> Gpu:
    if board is None:
        raise FileNotFoundError(f"no {TEGRA_RELEASE} and no Jetson in {DEVICE_TREE_MODEL}")
    for word, cap in JETSON_COMPUTE.items():
        if word in board.lower():
            return Gpu(board, cap, "Jetson device tree", board)
    raise RuntimeError(f"a Jetson edgeclf does not know ({board!r}); install cuda-python to ask the driver")


@functools.lru_cache(maxsize=1)
def find_gpu() -> GpuSearch:
    """The first NVIDIA GPU, asked once per process, with what each way of asking said."""
    board = _jetson_board()
    tried: dict[str, str] = {}
    for way, ask in (("CUDA driver (cuda-python)", _driver), ("NVML", _nvml), ("nvidia-smi", _smi),
                     ("Jetson device tree", _jetson)):
        try:
            return GpuSearch(ask(board), tried)
        except ImportError as exc:
            tried[way] = f"not installed ({exc.name or exc})"
        except Exception as exc:  # no driver, no device, a tool that fails: this way has no answer
            said = (str(exc).splitlines() or ["no message"])[0].split(". ")[0]
            tried[way] = f"{type(exc).__name__}: {said}"[:200]
    return GpuSearch(None, tried)


def local_gpu() -> Gpu | None:
    return find_gpu().gpu


def local_compute_capability() -> str | None:
    """The first GPU's compute capability ("8.6"), or None without a usable NVIDIA GPU."""
    gpu = local_gpu()
    return gpu.compute_capability if gpu else None
