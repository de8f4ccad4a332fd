"""The ARM leg of the tests, emulated: a device package run on an arm64 Debian 12 as a Raspberry Pi 5
(QEMU ``cortex-a76``: dot product) and as a Raspberry Pi 4 (``cortex-a72``: none).

    python -m tests.arm_leg [--package PKG.tar.gz] [--cpus cortex-a76,cortex-a72]     (make test-arm)

It builds and caches, under ``runs/arm/``, a Debian bookworm arm64 root file system from Debian's
packages (``mmdebstrap``; run under ``qemu-user-static`` through binfmt_misc), aarch64 wheels of
``edgeclf[cpu]`` downloaded from the package index and the edgeclf wheel built from this checkout.
In the root file system it makes a venv (Debian 12 refuses pip outside one: PEP 668), installs the
wheels offline, and for each CPU runs on the package: ``unpack``, ``verify`` (its table kept),
``predict``, ``doctor`` and a short ``bench``; every command must exit 0. Without a package given it
makes one from a small model (MobileNetV3-Small at 32 px, ONNX FP32) on this machine.

QEMU's user mode shows the guest the host's ``/proc/cpuinfo`` (an x86 CPU) but gives it an auxiliary
vector of the emulated CPU's features; ``edgeclf doctor`` must report the latter (its output is checked).
Where the machine cannot emulate (not root, no binfmt_misc, no qemu-user-static or mmdebstrap and no
way to install them, no network to Debian's archive or the package index) the leg prints why and
exits 0 as skipped (status 77 with --strict-skip).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: aarch64 wheel tags a Debian 12 (glibc 2.36) pip accepts, newest first.
PLATFORMS = ("manylinux_2_36_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
#: What each emulated board must report in ``edgeclf doctor --json``'s cpu flags.
BOARDS = {"cortex-a76": ("Raspberry Pi 5", {"asimd", "asimddp"}), "cortex-a72": ("Raspberry Pi 4", {"asimd"})}
SKIPPED = 77


class Skip(Exception):
    """This machine cannot run the leg; the message says why."""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def _setup(command: list[str], why: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """A step of setting up the emulation (apt, mmdebstrap, pip download): one that cannot finish in
    ``timeout`` means this machine cannot emulate in reasonable time, a skip, not a failure."""
    try:
        return _run(command, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise Skip(f"{why} did not finish within {timeout:.0f} s") from None


def check_host() -> None:
    """Root, binfmt_misc with an aarch64 interpreter, mmdebstrap: installed with apt where missing."""
    if os.geteuid() != 0:
        raise Skip("emulating a board needs root (chroot, mounting /proc and binfmt_misc)")
    if not (shutil.which("qemu-aarch64-static") and shutil.which("mmdebstrap")):
        done = _setup(["apt-get", "install", "-y", "-q", "qemu-user-static", "mmdebstrap", "binfmt-support"],
                      "installing qemu-user-static and mmdebstrap", 900,
                      env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            raise Skip(f"qemu-user-static and mmdebstrap are missing and apt could not install them: "
                       f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        if _run(["mount", "binfmt_misc", "-t", "binfmt_misc", str(binfmt)]).returncode != 0:
            raise Skip("binfmt_misc cannot be mounted here (a container without the privilege)")
    if not (binfmt / "qemu-aarch64").exists():
        _run(["update-binfmts", "--enable", "qemu-aarch64"])
    if not (binfmt / "qemu-aarch64").exists():
        raise Skip("no aarch64 interpreter registered with binfmt_misc (update-binfmts --enable qemu-aarch64 failed)")


def root_filesystem(cache: Path) -> Path:
    """Debian bookworm arm64 with Python 3 and venv, from Debian's archive (cached)."""
    rootfs = cache / "rootfs"
    if (rootfs / "usr/bin/python3").exists():
        return rootfs
    tarball = cache / "rootfs.tar"
    print(f"[arm] building a Debian 12 arm64 root file system from {DEBIAN_MIRROR} (a few minutes, once)", flush=True)
    done = _setup(["mmdebstrap", "--arch=arm64", "--variant=apt", "--include=python3,python3-venv,ca-certificates",
                   "bookworm", str(tarball), DEBIAN_MIRROR], "building the root file system", 1200)
    if done.returncode != 0:
        raise Skip(f"mmdebstrap could not build the root file system (no network to Debian's archive?): "
                   f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    staging = cache / "rootfs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(staging, filter="fully_trusted")  # our own mmdebstrap output: devices and links included
    staging.rename(rootfs)
    tarball.unlink()
    return rootfs


def wheels(cache: Path) -> Path:
    """aarch64 wheels of edgeclf[cpu]'s requirements from the index, and edgeclf's own wheel from this checkout."""
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("edgeclf-*.whl"):
        old.unlink()
    done = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder),
                 str(ROOT)], timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"building the edgeclf wheel failed: {done.stderr[-1000:]}")
    if not list(folder.glob("onnxruntime-*.whl")):
        done = _setup([sys.executable, "-m", "pip", "download", "-q", "--dest", str(folder), "--only-binary=:all:",
                       "--python-version", "3.11", "--implementation", "cp",
                       *[a for tag in PLATFORMS for a in ("--platform", tag)],
                       "numpy>=1.26", "Pillow>=10.0", "filelock>=3.12", "onnxruntime>=1.17"],
                      "downloading aarch64 wheels", 900)
        if done.returncode != 0:
            raise Skip(f"aarch64 wheels could not be downloaded (no package index?): "
                       f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    return folder


def small_package(cache: Path) -> Path:
    """A package of a small model made here: MobileNetV3-Small at 32 px on the digits, ONNX FP32."""
    archive = cache / "small.tar.gz"
    if archive.is_file():
        return archive
    edgeclf = [sys.executable, "-m", "edgeclf"]
    work = cache / "small"
    steps = [[*edgeclf, "dataset", "digits", str(work / "data"), "--overwrite"],
             [*edgeclf, "train", str(work / "data/train"), "--out", str(work / "bundle"), "--overwrite",
              "--backbone", "mobilenet_v3_small", "--image-size", "32", "--weights", "none", "--epochs-frozen", "0",
              "--epochs-finetune", "6", "--unfreeze-at", "0", "--train-batchnorm", "--lr-finetune", "3e-3"],
             # FP32 only: this small a model's INT8 does not pass export's gate (--package takes an INT8 one)
             [*edgeclf, "export", str(work / "bundle"), "--format", "onnx"],
             [*edgeclf, "pack", str(work / "bundle"), "--for", "onnx", "--out", str(archive)]]
    for step in steps:
        print("[arm] " + " ".join(step[2:]), flush=True)
        done = _run(step, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"making the small package failed at {' '.join(step[2:4])}: {done.stderr[-2000:]}")
    return archive


class Chroot:
    """Commands in the arm64 root file system, with /proc mounted (for /proc/self/auxv)."""

    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs

    def __enter__(self) -> Chroot:
        proc = self.rootfs / "proc"
        proc.mkdir(exist_ok=True)
        if not os.path.ismount(proc):
            subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "-l", str(self.rootfs / "proc")])

    def run(self, script: str, cpu: str | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
        env = {"PATH": "/opt/edgeclf/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
        if cpu:
            env["QEMU_CPU"] = cpu  # read by the binfmt interpreter, qemu-aarch64-static
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"  # found on the host's PATH, not the guest's
        return subprocess.run([chroot, str(self.rootfs), "/bin/sh", "-c", script], capture_output=True, text=True,
                              env=env, timeout=timeout)


def leg(package: Path, cpus: list[str], cache: Path, bench_s: float, artifacts: str | None = None) -> dict:
    rootfs = root_filesystem(cache)
    folder = wheels(cache)
    inside = rootfs / "leg"
    shutil.rmtree(inside, ignore_errors=True)
    shutil.copytree(folder, inside / "wheels")
    shutil.copyfile(package, inside / "package.tar.gz")
    results: dict = {"package": str(package), "cpus": {}}
    with Chroot(rootfs) as chroot:
        started = time.perf_counter()
        install = chroot.run("set -e; python3 -m venv /opt/edgeclf; /opt/edgeclf/bin/pip install -q --no-index "
                             "--find-links /leg/wheels 'edgeclf[cpu]'; python3 --version")
        if install.returncode != 0:
            raise RuntimeError(f"installing edgeclf[cpu] in the arm64 venv failed: {install.stderr[-2000:]}")
        results["install_s"] = round(time.perf_counter() - started, 1)
        results["python"] = install.stdout.strip()
        for cpu in cpus:
            board, expected_flags = BOARDS[cpu]
            steps = {
                "unpack": "edgeclf unpack /leg/package.tar.gz /leg/pkg --overwrite",
                "verify": f"edgeclf verify /leg/pkg --allow-small-set --no-record --backend {artifacts or 'all'}",
                "predict": "edgeclf predict /leg/pkg $(python3 -c \"import numpy as n, PIL.Image as I; "
                           "I.fromarray(n.full((32, 32, 3), 200, n.uint8)).save('/leg/x.png')\" && echo /leg/x.png)",
                "doctor": "edgeclf doctor --json",
                # No end-to-end rows: emulated timings say nothing, and drawing 12 MP pictures under QEMU is slow.
                "bench": f"edgeclf bench /leg/pkg --batch 1 --duration {bench_s} --warmup 0.5 --no-end-to-end "
                         f"--out /leg/bench" + (f" --backends {artifacts}" if artifacts else ""),
            }
            results["cpus"][cpu] = {"board": board}
            for name, script in steps.items():
                began = time.perf_counter()
                done = chroot.run(script, cpu)
                entry = {"status": done.returncode, "seconds": round(time.perf_counter() - began, 1),
                         "stdout": done.stdout[-4000:], "stderr": done.stderr[-2000:]}
                results["cpus"][cpu][name] = entry
                print(f"[arm] {cpu} ({board}) {name}: exit {done.returncode} in {entry['seconds']} s", flush=True)
                if name == "doctor" and done.returncode == 0:
                    flags = set(json.loads(done.stdout)["hardware"]["flags"])
                    entry["cpu_flags"] = sorted(flags)
                    if not expected_flags <= flags or ("asimddp" in flags) != ("asimddp" in expected_flags):
                        entry["status"] = 1
                        entry["stderr"] += f"\ndoctor reports {sorted(flags)}, the emulated {cpu} has {expected_flags}"
            verify = results["cpus"][cpu]["verify"]
            print(verify["stdout"], flush=True)
        results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, help="a device package (.tar.gz); default: one of a small model")
    parser.add_argument("--cpus", default="cortex-a76,cortex-a72", help="QEMU CPUs to emulate (default %(default)s)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "arm")
    parser.add_argument("--bench-seconds", type=float, default=2.0)
    parser.add_argument("--artifact", help="verify and bench this artifact only (e.g. onnx-int8; default: all)")
    parser.add_argument("--json", type=Path, help="write every step's output here")
    parser.add_argument("--strict-skip", action="store_true", help=f"exit {SKIPPED} when the leg is skipped")
    args = parser.parse_args(argv)
    cpus = args.cpus.split(",")
    unknown = [c for c in cpus if c not in BOARDS]
    if unknown:
        parser.error(f"unknown CPU {unknown}; known: {list(BOARDS)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    try:
        check_host()
        package = args.package or small_package(args.cache)
        results = leg(package, cpus, args.cache, args.bench_seconds, args.artifact)
    except Skip as exc:
        print(f"[arm] skipped: {exc}", flush=True)
        return SKIPPED if args.strict_skip else 0
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    failed = [f"{cpu} {name}" for cpu, steps in results["cpus"].items() for name, step in steps.items()
              if isinstance(step, dict) and step["status"] != 0]
    for problem in failed:
        cpu, name = problem.split()
        print(f"[arm] {problem} failed:\n{results['cpus'][cpu][name]['stderr']}", file=sys.stderr)
    print(f"[arm] {'FAILED: ' + ', '.join(failed) if failed else 'passed'}: {len(cpus)} boards in "
          f"{results['seconds']} s after installing in {results['install_s']} s ({results['python']})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
