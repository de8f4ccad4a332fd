"""Per-epoch training checkpoints, so that ``train --resume`` continues a killed run.

Keras' ``BackupAndRestore`` saves the weights and the epoch, but not what else decides
the next epochs: early stopping's best weights and patience count, and the random
state of the dropout layers. Resuming from it gives another model than the run that
was not interrupted. This checkpoint keeps all of it, per phase:

- every variable of the model (weights, BatchNormalization statistics, the seed
  state of each random layer) and of the optimizer (Adam's moments and step);
- early stopping's best value, best epoch, patience count and best weights;
- the history of the phase so far, and the records of finished phases.

Together with :func:`edgeclf.train.pipeline.epoch_order` (the data order of epoch
``k`` depends on ``k`` alone), a resumed run trains on the same batches from the same
state, and ends with the same bundle as one that ran through.

Layout: ``<out>.checkpoint/state.json`` names the arrays file of the last finished
epoch (``epoch-<phase>-<k>.npz``). The arrays are written first and the state renamed
over the old one after, so a kill at any moment leaves the previous, complete
checkpoint.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from edgeclf.errors import CheckpointError
from edgeclf.fsio import atomic_path, atomic_write_json, read_json, storage_errors

CHECKPOINT_FORMAT = 1
STATE_FILE = "state.json"
PHASES = ("frozen", "finetune")
#: state.json holds settings and per-epoch histories: kilobytes. More is not one this module wrote.
MAX_STATE_BYTES = 16 << 20


def checkpoint_dir(out: str | Path) -> Path:
    """Where the checkpoints of a run writing bundle ``out`` go: beside it."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping on ``val_loss`` (best weights restored) whose state can be saved and restored."""

    def __init__(self, patience: int):
        super().__init__(monitor="val_loss", patience=patience, restore_best_weights=True, verbose=0)
        self._restore: dict[str, Any] | None = None

    def state(self) -> tuple[dict[str, Any], list[np.ndarray] | None]:
        return ({"wait": self.wait, "best": None if self.best is None else float(self.best),
                 "best_epoch": int(self.best_epoch)}, self.best_weights)

    def restore(self, values: dict[str, Any], best_weights: list[np.ndarray] | None) -> None:
        """Applied when training begins (``on_train_begin`` resets the state first)."""
        self._restore = {**values, "best_weights": best_weights}

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)
        if self._restore is not None:
            self.wait, self.best = self._restore["wait"], self._restore["best"]
            self.best_epoch, self.best_weights = self._restore["best_epoch"], self._restore["best_weights"]


class RunCheckpoint:
    """The checkpoint folder of one run; ``fingerprint`` says what a resume must match."""

    def __init__(self, out: str | Path, fingerprint: dict[str, Any]):
        self.dir = checkpoint_dir(out)
        self.fingerprint = fingerprint

    def exists(self) -> bool:
        return (self.dir / STATE_FILE).exists()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def load(self) -> dict[str, Any]:
        """The saved state with its arrays, after checking that it belongs to this run.

        Raises:
            CheckpointError: unreadable or damaged, or made with other settings or data
                (the message lists what differs).
        """
        try:
            state = read_json(self.dir / STATE_FILE, MAX_STATE_BYTES)
            if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {state.get('format') if isinstance(state, dict) else state!r}, "
                                 f"expected {CHECKPOINT_FORMAT}")
            arrays = _read_arrays(self.dir, state.get("arrays"))
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise CheckpointError(
                f"the checkpoint in {self.dir} is damaged or unreadable ({type(exc).__name__}: {exc}); "
                "start over with --overwrite instead of --resume"
            ) from None
        differences = _differences(state.get("fingerprint", {}), self.fingerprint)
        if differences:
            raise CheckpointError(
                f"cannot resume from {self.dir}: it was made with other settings or data ("
                + "; ".join(differences) + "). Resume with the same settings and data, or start over "
                "with --overwrite"
            )
        problem = _state_problem(state, self.fingerprint) or _arrays_problem(arrays)
        if problem:
            raise CheckpointError(f"the checkpoint in {self.dir} is damaged: {problem}; start over with "
                                  f"--overwrite instead of --resume")
        state["arrays"], state["dir"] = arrays, self.dir
        return state

    def save(self, finished: list[dict[str, Any]], current: dict[str, Any] | None, model: keras.Model,
             optimizer=None, best_weights: list[np.ndarray] | None = None) -> None:
        """Record the end of an epoch (``current``: phase, epochs done, history, early stopping),
        or of a phase (``current=None``), with every variable needed to go on from there."""
        arrays = {f"model/{i}": np.asarray(v) for i, v in enumerate(model.variables)}
        if optimizer is not None:
            arrays.update({f"optimizer/{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
        for i, w in enumerate(best_weights or []):
            arrays[f"best/{i}"] = np.asarray(w)
        tag = "done" if current is None else f"{current['phase']}-{current['epochs_done']}"
        name = f"epoch-{len(finished)}-{tag}.npz"
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / name, suffix=".npz") as tmp, storage_errors(self.dir):
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        atomic_write_json(self.dir / STATE_FILE, {
            "format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "arrays": name,
            "finished_phases": finished, "current": current,
        })
        for old in self.dir.glob("epoch-*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)


_ARRAYS_NAME = re.compile(r"^epoch-\d+-[a-z0-9-]+\.npz$")


def _read_arrays(folder: Path, name: Any) -> dict[str, np.ndarray]:
    """The arrays file ``name`` of the checkpoint in ``folder``, checked before it is read.

    The name must be one this module writes (no folder, no ``..``), the file a regular file
    inside ``folder``, and every member stored uncompressed, as ``np.savez`` writes them: so
    nothing reads outside the checkpoint, and reading allocates no more than the file's size.
    """
    if not isinstance(name, str) or not _ARRAYS_NAME.match(name):
        raise ValueError(f"state.json names its arrays file {name!r}; expected a file name such as "
                         f"epoch-1-frozen-3.npz inside the checkpoint")
    path = folder / name
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{name} is not a regular file inside the checkpoint")
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if member.compress_type != zipfile.ZIP_STORED or member.file_size > path.stat().st_size:
                raise ValueError(f"{name} member {member.filename!r} is compressed or larger than the file; "
                                 f"edgeclf writes them stored")
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _state_problem(state: dict[str, Any], fingerprint: dict[str, Any]) -> str | None:
    """What in state.json is out of range for this run, or None."""
    finished, current = state.get("finished_phases"), state.get("current")
    if not isinstance(finished, list) or not all(isinstance(p, dict) and p.get("name") in PHASES for p in finished) \
            or len({p["name"] for p in finished}) != len(finished):
        return f"its finished phases are {finished!r}; expected records of distinct phases among {PHASES}"
    if current is None:
        return None
    if not isinstance(current, dict) or current.get("phase") not in PHASES:
        return f"its current phase is {current!r}; expected one of {PHASES}"
    epochs = fingerprint.get(f"epochs_{current['phase']}")
    done = current.get("epochs_done")
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= (epochs if isinstance(epochs, int)
                                                                                else done):
        return f"epochs_done is {done!r}; expected an integer in 0..{epochs} (the phase's epochs)"
    history = current.get("history")
    if not isinstance(history, dict) or not all(isinstance(v, list) and len(v) == done for v in history.values()):
        return "its history does not match the epochs it says are done"
    return None


def _arrays_problem(arrays: dict[str, np.ndarray]) -> str | None:
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"{key} holds NaN or infinite values (the run had diverged)"
        if value.dtype.kind not in "fiub":
            return f"{key} is of dtype {value.dtype}; expected numbers"
    return None


def restore_variables(variables, arrays: dict[str, np.ndarray], prefix: str, where: Path) -> None:
    """Assign ``arrays[prefix/i]`` to each of ``variables``."""
    saved = sorted((int(k.split("/")[1]) for k in arrays if k.startswith(prefix + "/")))
    if saved != list(range(len(variables))):
        raise CheckpointError(f"the checkpoint in {where} holds {len(saved)} {prefix} variables, this model "
                              f"has {len(variables)}; start over with --overwrite")
    for i, variable in enumerate(variables):
        value = arrays[f"{prefix}/{i}"]
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointError(f"the checkpoint in {where} does not fit this model ({variable.path}: "
                                  f"{value.shape} vs {tuple(variable.shape)}); start over with --overwrite")
        variable.assign(value)


def best_weights(arrays: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    found = sorted((int(k.split("/")[1]) for k in arrays if k.startswith("best/")))
    return [arrays[f"best/{i}"] for i in found] or None


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"{key}: {saved.get(key)!r} then, {now.get(key)!r} now"
            for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


class EpochCheckpoints(keras.callbacks.Callback):
    """Saves the run after every epoch of one phase (unless ``checkpoint`` is None: a
    worker that is not the chief); restores it when training begins; keeps the phase's
    history, the resumed epochs' included.

    Goes last among the callbacks, after the ones that change the weights or early
    stopping's state at the end of an epoch.
    """

    def __init__(self, checkpoint: RunCheckpoint | None, phase: str, finished: list[dict[str, Any]],
                 full_model: keras.Model, early_stopping: ResumableEarlyStopping,
                 resume: dict[str, Any] | None = None):
        super().__init__()
        self.checkpoint, self.phase, self.finished = checkpoint, phase, finished
        self.full_model, self.early_stopping, self.resume = full_model, early_stopping, resume
        self.history: dict[str, list[float]] = dict(resume["current"]["history"]) if resume else {}

    def on_train_begin(self, logs=None) -> None:
        if self.resume is None:
            return
        arrays, where = self.resume["arrays"], self.resume["dir"]
        restore_variables(self.full_model.variables, arrays, "model", where)
        optimizer = self.model.optimizer
        if not optimizer.built:  # Keras builds it at the first step, unless a strategy made it build early
            with self.model.distribute_strategy.scope():
                optimizer.build(self.model.trainable_variables)
        restore_variables(optimizer.variables, arrays, "optimizer", where)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        values, best = self.early_stopping.state()
        if self.checkpoint is None:
            return
        current = {"phase": self.phase, "epochs_done": epoch + 1, "history": self.history,
                   "early_stopping": values, "stopped": bool(self.model.stop_training)}
        self.checkpoint.save(self.finished, current, self.full_model, self.model.optimizer, best)
