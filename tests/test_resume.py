"""Resumable training: a run killed with SIGKILL and resumed ends with the bundle of the run
that was not interrupted; a resume against other settings, other images or a damaged
checkpoint is refused with what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")

from edgeclf.errors import CheckpointError, InvalidInputError, OutputExistsError  # noqa: E402
from edgeclf.interrupts import SUPERVISED_ENV  # noqa: E402
from edgeclf.train import TrainConfig, train  # noqa: E402
from edgeclf.train.checkpoint import STATE_FILE, RunCheckpoint, checkpoint_dir  # noqa: E402
from tests.conftest import HANG_S  # noqa: E402

TRAIN = ["--backbone", "mobilenet_v3_small", "--image-size", "32", "--weights", "none", "--epochs-frozen", "2",
         "--epochs-finetune", "3", "--patience", "5"]


def _train(data, out, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeclf", "train", str(data), "--out", str(out), *TRAIN, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _saved(out) -> dict | None:
    try:
        return json.loads((checkpoint_dir(out) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


# The run to be killed: training in this process (no supervisor), which SIGKILLs itself right after writing the
# checkpoint of epoch N of PHASE. Killed at that exact point however busy the machine, where a test polling the
# checkpoint could see the phase go by before it sends the signal.
_KILLED_AFTER = """
import os, signal, sys
from edgeclf.train.checkpoint import RunCheckpoint
phase, epochs = sys.argv[1], int(sys.argv[2])
save = RunCheckpoint.save

def save_then_die(self, finished, current, *args, **kwargs):
    save(self, finished, current, *args, **kwargs)
    if current and current["phase"] == phase and current["epochs_done"] == epochs:
        os.kill(os.getpid(), signal.SIGKILL)

RunCheckpoint.save = save_then_die
from edgeclf.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _train_killed_after(data, out, phase: str, epochs: int) -> dict:
    """Train until the checkpoint holds ``epochs`` finished epochs of ``phase``, then SIGKILL: the checkpoint."""
    process = subprocess.Popen([sys.executable, "-c", _KILLED_AFTER, phase, str(epochs), "train", str(data), "--out",
                                str(out), *TRAIN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, **{SUPERVISED_ENV: "1"}))
    _, err = process.communicate(timeout=HANG_S)
    assert process.returncode == -9, f"the run was not killed where asked: {err[-2000:]}"
    return _saved(out)


@pytest.mark.slow  # three training runs
@pytest.mark.parametrize("phase", ["frozen", "finetune"])
def test_a_run_killed_after_an_epoch_and_resumed_ends_with_the_same_bundle(noncontiguous_dir, tmp_path, phase):
    full = _train(noncontiguous_dir, tmp_path / "full")
    _, err = full.communicate(timeout=HANG_S)
    assert full.returncode == 0, err[-3000:]

    state = _train_killed_after(noncontiguous_dir, tmp_path / "killed", phase, 1)
    assert (state["current"]["phase"], state["current"]["epochs_done"]) == (phase, 1)
    assert not (tmp_path / "killed").exists()  # no bundle, half or whole
    assert [p["name"] for p in state["finished_phases"]] == ([] if phase == "frozen" else ["frozen"])

    resumed = _train(noncontiguous_dir, tmp_path / "killed", "--resume")
    _, err = resumed.communicate(timeout=HANG_S)
    assert resumed.returncode == 0, err[-3000:]
    assert f"{phase}: resuming after epoch {state['current']['epochs_done']}" in err
    a, b = (json.loads((tmp_path / name / "bundle.json").read_text()) for name in ("full", "killed"))
    assert b["model"]["weights_sha256"] == a["model"]["weights_sha256"]  # bit for bit
    assert b["metrics"] == a["metrics"]
    assert [p["best_val_loss"] for p in b["training"]["phases"]] == [p["best_val_loss"] for p in a["training"]["phases"]]
    assert not checkpoint_dir(tmp_path / "killed").exists()  # removed once the bundle is written


def _checkpoint_of(cfg: TrainConfig) -> RunCheckpoint:
    """The checkpoint an interrupted run of ``cfg`` would have left (no epoch finished)."""
    import keras

    from edgeclf.train.data import load_dataset, split_stratified
    from edgeclf.train.trainer import _fingerprint, resolve_recipe

    cfg = resolve_recipe(cfg)
    train_set, val_set = split_stratified(load_dataset(cfg.data, cfg.size), cfg.val_split, cfg.seed)
    checkpoint = RunCheckpoint(cfg.out, _fingerprint(cfg, train_set, val_set))
    checkpoint.save([], None, keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    return checkpoint


def _config(data, out, **changes) -> TrainConfig:
    settings = dict(image_size=32, backbone="mobilenet_v3_small", weights=None, epochs_frozen=2, epochs_finetune=1,
                    seed=0, verbose=0)
    return TrainConfig(data, out, **(settings | changes))


def test_resume_is_refused_against_other_settings_or_images(noncontiguous_dir, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(noncontiguous_dir, data)
    out = tmp_path / "bundle"
    _checkpoint_of(_config(data, out))
    with pytest.raises(CheckpointError, match=r"other settings or data \(epochs_frozen: 2 then, 3 now\)"):
        train(_config(data, out, epochs_frozen=3, resume=True))
    image = sorted((data / "3").iterdir())[0]  # rewritten since: same name and size, another time
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match=r"\((train|val)_images: .* then, .* now\)"):
        train(_config(data, out, resume=True))


def test_a_damaged_checkpoint_is_reported_and_overwrite_starts_over(noncontiguous_dir, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(InvalidInputError, match="nothing to resume"):
        _config(noncontiguous_dir, out, resume=True).check()
    checkpoint = _checkpoint_of(_config(noncontiguous_dir, out))
    (checkpoint.dir / STATE_FILE).write_text('{"format": 1, "arrays": "epoch-9.npz"')
    with pytest.raises(CheckpointError, match="damaged or unreadable .*start over with --overwrite"):
        train(_config(noncontiguous_dir, out, resume=True))
    # Without --resume, the checkpoint is neither ignored nor silently replaced.
    with pytest.raises(OutputExistsError, match="checkpoint of an interrupted run: --resume continues it"):
        _config(noncontiguous_dir, out).check()
    _config(noncontiguous_dir, out, overwrite=True).check()
