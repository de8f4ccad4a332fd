"""What to install on each kind of device, checked against the package index.

    python tools/platforms.py [--json]

A maintainer's tool, run in a checkout to regenerate the README's platform table: it is not
part of the installed package, which a device gets.

For every platform of :data:`PLATFORMS` and every device extra of pyproject.toml (``cpu``,
``openvino``, ``tflite``, ``gpu``), pip resolves the extra's requirements for that platform
from the package index without installing anything (``pip install --dry-run
--only-binary=:all: --platform ... --python-version ...``): a cell says whether binary
wheels exist there. Prints the README's platform table (``--json``: the versions resolved).
pip matches platform tags exactly, so a glibc version is given as every ``manylinux_2_N``
tag up to it, as the device's own pip would accept.

It asks the index first whether it answers at all (:func:`index_reachable`, within
:data:`REACHABLE_S`), every pip call is bounded (:data:`PIP_TIMEOUT_S` per connection, one
retry, :data:`RESOLVE_S` in all), and a resolution that failed for want of the network is an
error, never a "no wheels" cell: offline it exits 1 with one line and prints no table.

The ``gpu`` extra's ``tensorrt`` is a source package that fetches NVIDIA's wheels when it
builds, so it cannot be resolved for another platform; TensorRT comes with the driver
stack (JetPack on a Jetson), and ``onnxruntime-gpu`` and ``cuda-python`` are checked.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from edgeclf.compat import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The extras a device installs, and the backend each brings.
DEVICE_EXTRAS = ("cpu", "openvino", "tflite", "gpu")
#: Requirements that cannot be resolved for another platform (source packages that download at build time).
UNRESOLVABLE = {"tensorrt"}
#: Seconds pip waits on one connection; the reachability check's whole budget; one resolution's.
PIP_TIMEOUT_S, REACHABLE_S, RESOLVE_S = 10, 25, 300
#: What pip prints when the index, not the platform, is the problem.
_NETWORK_FAILURES = ("Retrying (", "NewConnectionError", "Could not fetch URL", "ConnectTimeout", "ReadTimeout",
                     "Max retries exceeded", "Network is unreachable", "Temporary failure in name resolution",
                     "Connection refused", "ProxyError", "SSLError")


class IndexUnreachable(Exception):
    """The package index could not be asked; the message says why."""


@dataclass(frozen=True)
class Platform:
    name: str
    arch: str  # the wheel tag's machine: x86_64, aarch64, armv7l
    glibc: tuple[int, int]
    python: str
    note: str = ""
    nvidia: bool = False  # may carry an NVIDIA GPU: [gpu] is asked for

    def tags(self) -> list[str]:
        """Every platform tag the device's pip accepts, newest first."""
        glibc = [f"manylinux_{self.glibc[0]}_{minor}_{self.arch}" for minor in range(self.glibc[1], 16, -1)]
        legacy = {"x86_64": ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"],
                  "aarch64": ["manylinux2014_aarch64"], "armv7l": ["manylinux2014_armv7l"]}[self.arch]
        return [*glibc, *legacy, f"linux_{self.arch}"]


PLATFORMS = (
    Platform("x86-64 Linux (AVX2, VNNI or AMX; Ubuntu 22.04+)", "x86_64", (2, 35), "3.11", nvidia=True),
    Platform("Raspberry Pi 4 and 5 (Raspberry Pi OS 12, 64-bit)", "aarch64", (2, 36), "3.11"),
    Platform("Jetson, JetPack 6 (Ubuntu 22.04), its Python", "aarch64", (2, 35), "3.10", nvidia=True),
    Platform("Jetson, JetPack 5 (Ubuntu 20.04), its Python", "aarch64", (2, 31), "3.8", "edgeclf needs Python 3.10+",
             nvidia=True),
    Platform("32-bit Raspberry Pi OS (armv7l)", "armv7l", (2, 36), "3.11"),
)


def _declared() -> tuple[list[str], dict[str, list[str]]]:
    """(core requirements, extra -> requirements), from the checkout's pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return project["dependencies"], project["optional-dependencies"]


def _requirement(text: str):
    """``text`` parsed as a PEP 508 requirement (packaging, the library pip itself vendors)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        raise SystemExit("tools/platforms.py needs the packaging library: pip install packaging") from None
    return Requirement(text)


def extra_requirements(extra: str) -> list[str]:
    """The requirements ``edgeclf[extra]`` adds to the core's, with ``edgeclf[...]`` expanded."""
    core, optional = _declared()

    def expand(name: str) -> list[str]:
        out = []
        for text in optional[name]:
            requirement = _requirement(text)
            out += ([r for part in sorted(requirement.extras) for r in expand(part)] if requirement.name == "edgeclf"
                    else [text])
        return out

    return list(dict.fromkeys([*core, *expand(extra)]))


def resolve(platform: Platform, requirements: list[str]) -> dict[str, Any]:
    """pip's resolution of ``requirements`` for ``platform``: {"ok", "versions"} or {"ok": False, "error"}."""
    wanted = [r for r in requirements if _requirement(r).name not in UNRESOLVABLE]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                   "--timeout", str(PIP_TIMEOUT_S), "--retries", "1",
                   "--only-binary=:all:", "--python-version", platform.python, "--implementation", "cp",
                   "--target", str(Path(tmp) / "target"), "--report", str(report),
                   *[arg for tag in platform.tags() for arg in ("--platform", tag)], *wanted]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=RESOLVE_S)
        except subprocess.TimeoutExpired:
            raise IndexUnreachable(f"pip did not finish resolving for {platform.name} within {RESOLVE_S} s") from None
        if done.returncode != 0 and any(sign in done.stderr for sign in _NETWORK_FAILURES):
            raise IndexUnreachable(f"the package index failed while resolving for {platform.name}: "
                                   f"{_last_line(done.stderr)}")
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            return {"ok": False, "error": (errors or done.stderr.strip().splitlines() or ["pip failed"])[-1]}
        installs = json.loads(report.read_text())["install"]
    return {"ok": True, "versions": {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs},
            "skipped": sorted(set(requirements) - set(wanted))}


def index_reachable() -> str | None:
    """None, or why the package index cannot be asked (downloading one small wheel fails)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
                                   "--timeout", str(PIP_TIMEOUT_S), "--retries", "0",
                                   "--only-binary=:all:", "--no-cache-dir", "filelock"],
                                  capture_output=True, text=True, timeout=REACHABLE_S)
    except subprocess.TimeoutExpired:
        return f"the package index did not answer within {REACHABLE_S} s"
    return None if done.returncode == 0 else f"the package index cannot be reached: {_last_line(done.stderr)}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines or ["pip failed without a message"])[-1][:300]


def check() -> dict[str, dict[str, Any]]:
    """{platform name: {extra: resolution}} for every platform and device extra."""
    return {p.name: {extra: resolve(p, extra_requirements(extra)) for extra in DEVICE_EXTRAS
                     if extra != "gpu" or p.nvidia} for p in PLATFORMS}


def formats_of(extra: str) -> list[str]:
    """The artifact formats the backend of ``extra`` runs."""
    from edgeclf.runtime.backends import BACKENDS

    return [f for b in BACKENDS.values() if b.extra == extra for f in b.formats]


def table(results: dict[str, dict[str, Any]]) -> str:
    """The README's table: per platform, whether each extra's wheels exist, and the formats that run."""
    lines = ["| platform | Python | " + " | ".join(f"`[{e}]`" for e in DEVICE_EXTRAS) + " | formats that run |",
             "|---|---|" + "---|" * len(DEVICE_EXTRAS) + "---|"]
    for platform in PLATFORMS:
        row = results[platform.name]
        cells = ["no NVIDIA GPU" if e not in row else "wheels" if row[e]["ok"] else "no wheels" for e in DEVICE_EXTRAS]
        runs = [f for e in DEVICE_EXTRAS if e != "gpu" and row[e]["ok"] for f in formats_of(e)]
        formats = ", ".join(runs) or "none"
        if platform.note:
            formats = f"{platform.note}; " + (f"with it: {formats}" if runs else formats)
        lines.append(f"| {platform.name} | {platform.python} | " + " | ".join(cells) + f" | {formats} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print every resolution (versions, errors) as JSON")
    args = parser.parse_args(argv)
    try:
        problem = index_reachable()
        if problem:
            raise IndexUnreachable(problem)
        results = check()
    except IndexUnreachable as exc:  # a table it could not establish is never printed
        print(f"error: {exc}; no table was written", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=1) if args.json else table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
