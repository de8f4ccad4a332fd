"""Shared fixtures: real digits images on disk and real trained, exported bundles.

Everything is real: images are PNG files written from scikit-learn's handwritten
digits, models are real Keras networks at 75x75 with random initial weights, since
ImageNet weights cannot be downloaded here. Two layers:

- fast: ``tiny_bundle``/``tiny_exported``, a MobileNetV3-Small at 32x32 trained and exported to
  every format in under 2 minutes on 2 cores, serves the runtime, serving, verification, benchmark
  and CLI-plumbing tests (``make test-fast``), and the export-error and INT8-search tests that do
  not need InceptionV3 (those that export or search again are marked ``slow`` one by one);
- slow: ``trained_bundle``, ``accurate_bundle`` and ``exported``, the product's InceptionV3 at
  75x75, serve the training tests and check every format and the default INT8 search on it. A
  test using any of them is marked ``slow`` here, so no test needs to remember to say so.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from filelock import FileLock

from edgeclf.formats import FORMATS
from edgeclf.runtime.backends import BACKENDS
from edgeclf.train.data import write_digits_folder

# Digit classes used for the non-contiguous label set: the folder named -2 holds
# images of the digit 1, 3 holds 3s and 10 holds 7s.
NONCONTIGUOUS = {-2: 1, 3: 3, 10: 7}
SIZE = 75
#: The fast layer's input size: MobileNetV3-Small's smallest (the digits are 8x8 scans).
TINY_SIZE = 32
#: Every format a CPU runs, from the registries (a format added there is tested here too).
CPU_ARTIFACTS = tuple(f.name for f in FORMATS.values() if not BACKENDS[f.backend].needs_gpu)
#: Held-out accuracy every model the tests export must reach (3 classes: chance is 0.33).
ACCURATE_MIN = 0.9
#: Fine-tuning epochs of the fast layer's model.
TINY_EPOCHS = 3
#: Fixtures that train or export InceptionV3: tests using them are ``slow`` (so are tests that train or
#: export a model themselves, or install packages: they say so with the mark).
SLOW_FIXTURES = frozenset({"trained_bundle", "accurate_bundle", "exported"})
#: The fast layer's fixtures.
TINY_FIXTURES = frozenset({"tiny_bundle", "tiny_exported"})
#: Under pytest-xdist, the tests of each InceptionV3 chain run in one process (the one that builds it),
#: so that the processes do not wait on each other's training; so do the tests of the one Triton
#: server that tests/test_serve.py starts (and stops in its last test).
XDIST_GROUPS = {"exported": "inceptionv3-export", "accurate_bundle": "inceptionv3-export",
                "trained_bundle": "inceptionv3-train", "server": "triton-server"}


@pytest.fixture(scope="session", autouse=True)
def feature_cache_dir(tmp_path_factory) -> Path:
    """Phase 1's feature cache of every training of this run (subprocesses too): in the run's
    temporary folder, not the user's ~/.cache."""
    path = tmp_path_factory.getbasetemp() / "feature-cache"
    os.environ["EDGECLF_CACHE_DIR"] = str(path)
    return path


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    from edgeclf.gpu import local_compute_capability

    has_gpu = local_compute_capability() is not None
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; none on this machine")
    for item in items:
        used = set(item.fixturenames)
        if SLOW_FIXTURES & used:
            item.add_marker(pytest.mark.slow)
        group = next((XDIST_GROUPS[name] for name in XDIST_GROUPS if name in used), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
        if not has_gpu and ("gpu" in item.keywords or "tensorrt" in item.keywords):
            item.add_marker(skip_gpu)
    items[:] = _run_order(items)


def _run_order(items: list) -> list:
    """The longest chains first, so that two processes keep busy: the InceptionV3 groups, then one
    test that builds the fast layer's model, then the tests that need no model (the other process
    runs them meanwhile), then the rest. Otherwise collection order."""
    def rank(item) -> int:
        used = set(item.fixturenames)
        if SLOW_FIXTURES & used:
            return 0 if {"exported", "accurate_bundle"} & used else 1
        return 3 if TINY_FIXTURES & used else 2

    ordered = sorted(items, key=rank)
    first_tiny = next((i for i, item in enumerate(ordered) if rank(item) == 3), None)
    if first_tiny is not None:
        start = next(i for i, item in enumerate(ordered) if rank(item) >= 2)
        ordered.insert(start, ordered.pop(first_tiny))
    return ordered


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], Any]) -> tuple[Path, Any]:
    """Build a session fixture once per test run: ``build(path)`` writes it at ``path`` and returns
    something JSON can hold. Under pytest-xdist, the first process that asks builds it under a file
    lock and every other one reads what it wrote (all processes of a run share the parent of their
    base temporary directory). Each fixture has a folder of its own, so that one being built (with
    its staging files) never shows up beside another. After a failed build the next process to ask
    builds it again (and fails with its own error)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "shared"
    else:
        root = tmp_path_factory.getbasetemp() / "shared"
    root.mkdir(exist_ok=True)
    path, done = root / name / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(path.parent, ignore_errors=True)
            path.parent.mkdir()
            done.write_text(json.dumps({"value": build(path)}))
    return path, json.loads(done.read_text())["value"]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's digits as real PNG files: train/<label>/ and test/<label>/."""
    def build(out: Path) -> None:
        write_digits_folder(out, holdout=0.2, seed=0, size=32)

    return _built_once(tmp_path_factory, "digits", build)[0]


@pytest.fixture(scope="session")
def noncontiguous_dir(digits_dir, tmp_path_factory) -> Path:
    """Real digit images under the non-contiguous integer labels -2, 3 and 10."""
    def build(out: Path) -> None:
        for label, digit in NONCONTIGUOUS.items():
            shutil.copytree(digits_dir / "train" / str(digit), out / str(label))

    return _built_once(tmp_path_factory, "noncontiguous", build)[0]


def _trained(tmp_path_factory, name: str, **settings):
    """A bundle trained once per run with ``TrainConfig(**settings)`` (its data and size included)."""
    from edgeclf.bundle import Bundle
    from edgeclf.train import TrainConfig, train

    def build(out: Path) -> None:
        train(TrainConfig(out=out, **settings))

    return Bundle.load(_built_once(tmp_path_factory, name, build)[0])


def _exported(tmp_path_factory, name: str, source, options):
    """A copy of bundle ``source`` exported once per run to every format this machine builds:
    (bundle, records)."""
    from edgeclf.bundle import Bundle
    from edgeclf.export import export_bundle

    def build(out: Path) -> list[dict]:
        shutil.copytree(source.path, out)
        return export_bundle(out, "all", options)

    path, records = _built_once(tmp_path_factory, name, build)
    return Bundle.load(path), records


@pytest.fixture(scope="session")
def trained_bundle(noncontiguous_dir, tmp_path_factory):
    """A small InceptionV3 bundle trained in both phases on about 440 real images, with the
    fine-tuning recipe (top blocks only) although its backbone is random: the recipe the
    export and runtime tests were written for."""
    return _trained(tmp_path_factory, "trained", data=noncontiguous_dir, image_size=SIZE, weights=None,
                    epochs_frozen=3, epochs_finetune=1, batch_size=32, lr_finetune=1e-4, unfreeze_at=249,
                    train_batchnorm=False, seed=0, verbose=0)


def has_gpu() -> bool:
    from edgeclf.gpu import local_compute_capability

    return local_compute_capability() is not None


def engine_left_out(precision: str = "fp16") -> str | None:
    """Why export leaves out the TensorRT engine of ``precision`` here, or None when it builds one:
    no TensorRT installed, or a GPU the installed flavour builds nothing for (TensorRT-RTX on an H200)."""
    from edgeclf.export.exporter import ExportOptions, cannot_build

    engine = next(f for f in FORMATS.values() if f.backend == "tensorrt" and f.precision == precision)
    error = cannot_build(engine, ExportOptions())
    return None if error is None else str(error)


def engine_record(records, fmt: str = "tensorrt") -> dict:
    """The export record of an engine format, or a skip saying why this machine builds none."""
    found = [r for r in records if r["format"] == fmt]
    if not found:
        why = engine_left_out("int8" if fmt.endswith("int8") else "fp16")
        assert why, f"{fmt} should have been exported here"
        pytest.skip(f"no {fmt} engine on this machine: {why}")
    return found[0]


#: Waits in the tests (timeouts of sockets, subprocesses, servers) end at this bound only on a hang: what a
#: test checks never depends on how fast a busy machine gets there (two test workers, a training run and
#: whatever else shares two cores; `make test-loaded` runs the suite that way).
HANG_S = 600


#: The longest INT8 search the limits allow: in the tests the number of trials bounds a search, so what it
#: finds never depends on how many trials a busy machine fits into a time budget.
SEARCH_UNTIMED_S = 86_400



class ManualClock:
    """A clock that moves only when a test moves it: deadlines and log windows pass when the test says,
    and a timed call costs what the test bills it, however busy the machine is."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

def pytest_make_parametrize_id(config, val, argname):
    """A long text parameter (a 17 MB JSON, 100,000 brackets) is named by its start and length, not
    written whole into every test id, log line and --durations row."""
    if isinstance(val, (str, bytes)) and len(val) > 200:
        head = val[:16] if isinstance(val, str) else val[:16].decode("ascii", "backslashreplace")
        return f"{head}...{len(val)}{'chars' if isinstance(val, str) else 'bytes'}"
    return None


def run_cli(*args: str, env: dict | None = None, timeout: float = HANG_S):
    """Run the real ``edgeclf`` command line in a subprocess."""
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "edgeclf", *args], capture_output=True, text=True,
        env=full_env, timeout=timeout,
    )



@pytest.fixture(scope="session")
def accurate_bundle(noncontiguous_dir, tmp_path_factory):
    """A well-separated model for export checks: InceptionV3 trained from scratch.

    A barely trained model has near-tied logits, where any FP16 or INT8 rounding flips
    the top-1 answer; a deployed model is not like that, so export is tested on one
    that has learnt its task (the same recipe as the main job).
    """
    bundle = _trained(tmp_path_factory, "accurate", data=noncontiguous_dir, image_size=SIZE, weights=None,
                      epochs_frozen=1, epochs_finetune=3, unfreeze_at=0, train_batchnorm=True, lr_finetune=1e-3,
                      batch_size=32, seed=0, verbose=0)
    _check_learnt(bundle, "the export tests' model")
    return bundle


@pytest.fixture(scope="session")
def exported(accurate_bundle, tmp_path_factory):
    """A copy of ``accurate_bundle`` with every format exported and validated: (bundle, records)."""
    from edgeclf.export import ExportOptions
    from edgeclf.export.int8_search import Int8Target

    options = ExportOptions(calibration_images=200, int8_target=Int8Target(max_seconds=SEARCH_UNTIMED_S))
    return _exported(tmp_path_factory, "exported", accurate_bundle, options)


def _check_learnt(bundle, what: str) -> None:
    """Agreement with Keras means nothing for a model that learnt nothing (one answering a
    single class agrees with itself): check it learnt first. Chance is 1/3."""
    accuracy = bundle.meta["metrics"]["validation"]["accuracy"]
    assert accuracy >= ACCURATE_MIN, f"{what} reached only {accuracy:.3f} held-out accuracy"


@pytest.fixture(scope="session")
def tiny_bundle(noncontiguous_dir, tmp_path_factory):
    """The fast layer's model: MobileNetV3-Small at 32x32 trained from scratch in under a minute
    (3 epochs; most of it is TensorFlow tracing the training step), through the same ``train`` as
    the product's InceptionV3."""
    bundle = _trained(tmp_path_factory, "tiny", data=noncontiguous_dir, image_size=TINY_SIZE,
                      backbone="mobilenet_v3_small", weights=None, epochs_frozen=0, epochs_finetune=TINY_EPOCHS,
                      unfreeze_at=0, train_batchnorm=True, lr_finetune=3e-3, batch_size=32, seed=0, verbose=0)
    _check_learnt(bundle, "the fast layer's model")
    return bundle


@pytest.fixture(scope="session")
def tiny_exported(tiny_bundle, tmp_path_factory):
    """A copy of ``tiny_bundle`` with every format this machine builds exported and validated:
    (bundle, records). Its INT8 target is loose and its search short: tests/test_int8_search.py
    sets its own targets on copies of it."""
    from edgeclf.export import ExportOptions
    from edgeclf.export.int8_search import Int8Target

    target = Int8Target(min_agreement=0.95, max_accuracy_drop=0.03, max_trials=2, max_seconds=SEARCH_UNTIMED_S)
    return _exported(tmp_path_factory, "tiny_exported", tiny_bundle,
                     ExportOptions(calibration_images=100, int8_target=target))
