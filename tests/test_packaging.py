"""The installed package imports from any folder, the checkout's root included."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import HANG_S

ROOT = Path(__file__).resolve().parent.parent
#: Imports a device and the workstation make first: the subpackages that live beside edgeclf/.
IMPORTS = ("import edgeclf.runtime.backends, edgeclf.serve.guard, edgeclf.train.ordinal; "
           "from edgeclf.runtime import Predictor; print(edgeclf.runtime.__file__)")


def _python(cwd: Path, *flags: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    return subprocess.run([sys.executable, *flags, "-c", IMPORTS], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=HANG_S)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """edgeclf installed as a wheel is (``pip install .``, not editable), into a folder of its own."""
    # Built from a copy: setuptools writes build/ into the folder it builds.
    source = tmp_path_factory.mktemp("source") / "edgeclf"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__",
                                                                "tests", "docs"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(source)], check=True, capture_output=True, timeout=HANG_S)
    assert (target / "edgeclf" / "runtime" / "predictor.py").is_file()
    return target


@pytest.mark.parametrize("where", ["the checkout's root", "another folder"])
def test_a_normal_install_imports_from_any_folder(installed, tmp_path, where):
    """``python -S`` with the install and the dependencies on PYTHONPATH: no .pth file runs, so no
    editable-install finder hides what a plain install does. From the checkout's root Python finds
    the source folder edgeclf/ first, which holds only the core (the case that failed)."""
    cwd = ROOT if where == "the checkout's root" else tmp_path
    dependencies = sysconfig.get_paths()["purelib"]
    out = _python(cwd, "-S", pythonpath=f"{installed}:{dependencies}")
    assert out.returncode == 0, out.stderr
    expected = ROOT / "runtime" if cwd == ROOT else installed / "edgeclf" / "runtime"
    assert Path(out.stdout.strip()).parent == expected


@pytest.mark.parametrize("where", ["the checkout's root", "another folder"])
def test_the_editable_install_imports_from_any_folder(tmp_path, where):
    out = _python(ROOT if where == "the checkout's root" else tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == ROOT / "runtime"


@pytest.fixture(scope="module")
def device_site(tmp_path_factory) -> Path:
    """What a device install of edgeclf[cpu] has beside edgeclf: numpy, Pillow, filelock, onnxruntime (links
    to this environment's own), and no TensorFlow, Keras or scikit-learn."""
    import importlib.util

    site = tmp_path_factory.mktemp("device-site")
    purelib = Path(sysconfig.get_paths()["purelib"])
    for name in ("numpy", "numpy.libs", "PIL", "pillow.libs", "filelock", "onnxruntime", "flatbuffers", "packaging",
                 "google", "coloredlogs", "humanfriendly", "sympy", "mpmath"):
        if (purelib / name).exists():
            (site / name).symlink_to(purelib / name)
    assert importlib.util.find_spec("tensorflow") is not None  # the links, not this environment, lack it
    return site


def test_a_device_install_runs_the_cli_and_names_what_needs_tensorflow(installed, device_site, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{installed}:{device_site}"}
    run = lambda *args: subprocess.run([sys.executable, "-S", "-m", "edgeclf", *args], cwd=tmp_path, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=HANG_S)
    assert run("--help").returncode == 0 and run("export", "--help").returncode == 0
    for command, extra in (("train", "train"), ("evaluate", "train"), ("export", "export")):
        args = {"train": ("train", "data", "--out", "b"), "evaluate": ("evaluate", "b", "data"),
                "export": ("export", "b")}[command]
        out = run(*args)
        assert out.returncode == 1, out.stderr
        assert out.stderr.strip().splitlines() == [
            f"error: edgeclf {command} needs TensorFlow and Keras, which are not installed here (tensorflow, keras "
            f"missing): pip install 'edgeclf[{extra}]'"]


#: The folders that become the package (pyproject.toml's package-dir).
PACKAGE_DIRS = ("edgeclf", "train", "export", "runtime", "serve", "benchmarks")


def _vermin(*paths: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "-t=3.10-", "--no-tips", "--violations",
                           "--eval-annotations", *map(str, paths)], capture_output=True, text=True, timeout=HANG_S,
                          cwd=ROOT)


def test_the_package_keeps_to_python_3_10_and_the_check_sees_a_3_11_call(tmp_path):
    """Jetson's JetPack 6 Python is 3.10 (requires-python >= 3.10): vermin, a static checker,
    stands in for a 3.10 interpreter this machine cannot install."""
    pytest.importorskip("vermin")
    done = _vermin(*PACKAGE_DIRS)
    assert done.returncode == 0, done.stdout + done.stderr
    planted = tmp_path / "planted.py"
    planted.write_text("import datetime\n\nprint(datetime.UTC)\n")  # datetime.UTC is new in 3.11
    done = _vermin(planted)
    assert done.returncode != 0 and "'datetime.UTC' member requires !2, 3.11" in done.stdout, done.stdout


def test_the_linter_finds_nothing_and_would_find_an_undefined_name(tmp_path):
    """ruff, with pyproject.toml's rules (defects, not style), over the package, the tests and tools/."""
    pytest.importorskip("ruff")
    ruff = [sys.executable, "-m", "ruff", "check", "--no-cache"]
    done = subprocess.run([*ruff, *PACKAGE_DIRS, "tools", "tests"], capture_output=True, text=True, timeout=HANG_S, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    return undefined_name\n")
    done = subprocess.run([*ruff, "--config", str(ROOT / "pyproject.toml"), str(planted)], capture_output=True,
                          text=True, timeout=HANG_S, cwd=ROOT)
    assert done.returncode != 0 and "F821" in done.stdout, done.stdout
