"""Two-phase fine-tuning of the integer classifier, ending in a bundle directory.

Phase 1 trains the head with the backbone frozen. Without augmentation the backbone's
output cannot change between epochs, so its pooled features are computed once and
the head is trained on them (the cost of an epoch drops from a full forward pass of
the backbone to a few matrix products). Phase 2 unfreezes the top of the backbone
(InceptionV3: layer 249 on, i.e. mixed9 and mixed10) at a low learning rate, with
BatchNormalization kept in inference mode. Both phases stop early on validation loss
and restore the best weights.
"""

from __future__ import annotations

import dataclasses
import json
import datetime as _dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from edgeclf.train import model as model_lib
from edgeclf.train.backbones import PREPROCESSING_DESCRIPTIONS, get_backbone
from edgeclf.train.data import INPUT_MODES, ImageSet, LabelMap, load_dataset, split_stratified
from edgeclf.train.checkpoint import (STATE_FILE, EpochCheckpoints, ResumableEarlyStopping, RunCheckpoint,
                                      best_weights, checkpoint_dir, restore_variables)
from edgeclf.train.evaluate import load_keras_model, predict_logits
from edgeclf.train.options import RECIPES, default
from edgeclf.train.ordinal import check_loss, ordinal_loss
from edgeclf.train.metrics import classification_metrics, format_metrics, save_confusion_png
from edgeclf.train.feature_cache import FeatureCache, default_cache_dir, images_sha256, weights_sha256
from edgeclf.train.pipeline import (augmenter, feature_batches, steps_per_epoch, training_batches,
                                    validation_batches)
from edgeclf.train.strategy import STRATEGIES, check_tf_config, is_chief, make_strategy

import edgeclf
from edgeclf import limits
from edgeclf.bundle import BUNDLE_FORMAT, CONFUSION_PNG, MODEL_FILE, Bundle
from edgeclf.errors import DataError, InvalidInputError, OutputExistsError, TrainingDivergedError
from edgeclf.fsio import check_output_dir, sha256_file, staged_directory
from edgeclf.images import DECODE_SPEC
from edgeclf.progress import log

#: Training images used to (re-)estimate BatchNormalization statistics.
BN_CALIBRATION_IMAGES = 512


@dataclass
class TrainConfig:
    """Everything ``train`` needs; the CLI maps its options one to one onto these fields, and
    every default is the one :data:`edgeclf.train.options.OPTIONS` declares for the CLI and
    config files too.

    ``data`` and ``val_data`` are a directory of label folders, a ``.csv`` of
    path,label, ``"digits"``, or an :class:`ImageSet` (e.g. from ``from_arrays``).
    """

    data: Any
    out: str | Path
    labels: Sequence[int] | None = default("labels")
    image_size: int | tuple[int, int] = default("image_size")
    backbone: str = default("backbone")
    weights: str | Path | None = default("weights")
    #: A bundle whose weights start this training (same backbone and labels, any input size).
    init_from: str | Path | None = default("init_from")
    epochs_frozen: int = default("epochs_frozen")
    epochs_finetune: int = default("epochs_finetune")
    batch_size: int = default("batch_size")
    lr_frozen: float = default("lr_frozen")
    #: None, like ``unfreeze_at`` and ``train_batchnorm``: the recipe's (see RECIPES).
    lr_finetune: float | None = default("lr_finetune")
    unfreeze_at: int | None = default("unfreeze_at")
    val_split: float = default("val_split")
    val_data: Any = default("val_data")
    seed: int = default("seed")
    strategy: str = default("strategy")
    class_weights: str | None = default("class_weights")  # None or "balanced"
    augment: bool = default("augment")
    augment_flip: bool = default("augment_flip")
    #: Phase 2 trains BatchNormalization on batch statistics (the from-scratch recipe's).
    train_batchnorm: bool | None = default("train_batchnorm")
    cache_features: bool = default("cache_features")
    #: Where phase 1's features are kept between runs; None: $EDGECLF_CACHE_DIR, else ~/.cache/edgeclf.
    feature_cache_dir: str | Path | None = default("feature_cache_dir")
    #: "memory": decode every image up front; "stream": decode batch by batch from the files
    #: (memory flat in the number of images); "auto": stream above IN_MEMORY_MAX_BYTES of pixels.
    input: str = default("input")
    patience: int = default("patience")
    tensorboard: str | Path | None = default("tensorboard")  # a folder for TensorBoard logs of both phases
    #: "crossentropy" (one-hot targets) or "ordinal": soft ordinal labels (SORD, see ordinal.py),
    #: softmax over classes of -ordinal_alpha * phi(true value, class value), phi = ordinal_distance.
    loss: str = default("loss")
    ordinal_alpha: float = default("ordinal_alpha")
    ordinal_distance: str = default("ordinal_distance")
    #: Multi-worker: seconds to wait for every peer in TF_CONFIG to accept a connection.
    peer_timeout: float = default("peer_timeout")
    #: Continue the interrupted run writing ``out`` from its last finished epoch (see checkpoint.py).
    resume: bool = default("resume")
    overwrite: bool = default("overwrite")
    strict: bool = default("strict")
    verbose: int | None = None  # Keras verbosity; None: bars on a terminal, one line per epoch otherwise

    @property
    def size(self) -> tuple[int, int]:
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        return (int(self.image_size[0]), int(self.image_size[1]))

    def check(self) -> None:
        """Reject bad settings before any expensive work starts."""
        spec = get_backbone(self.backbone)
        model_lib.check_image_size(self.size, spec)
        model_lib.resolve_weights(self.weights)
        for name, kind in (("epochs_frozen", "epochs"), ("epochs_finetune", "epochs"), ("patience", "patience"),
                           ("batch_size", "train_batch"), ("lr_frozen", "learning_rate"), ("seed", "seed"),
                           ("lr_finetune", "learning_rate"), ("unfreeze_at", "layer_index"),
                           ("peer_timeout", "peer_timeout")):
            if getattr(self, name) is not None:
                limits.check(kind, getattr(self, name), name)
        check_loss(self.loss, self.ordinal_alpha, self.ordinal_distance)
        if self.epochs_frozen + self.epochs_finetune == 0:
            raise InvalidInputError("at least one epoch is needed (epochs_frozen + epochs_finetune > 0).")
        if self.labels is not None:
            limits.check_label_count(len(self.labels), f"{len(self.labels)} labels")
        if self.class_weights not in (None, "balanced"):
            raise InvalidInputError(f"class_weights must be None or 'balanced'. Received: {self.class_weights!r}")
        if self.val_data is None:
            limits.check("val_split", self.val_split, "val_split")
        if self.input not in INPUT_MODES:
            raise InvalidInputError(f"input must be one of {list(INPUT_MODES)}. Received: {self.input!r}")
        if self.strategy not in STRATEGIES:
            raise InvalidInputError(f"strategy must be one of {list(STRATEGIES)}. Received: {self.strategy!r}")
        if self.augment_flip and not self.augment:
            raise InvalidInputError("augment_flip (--augment-flip) needs augment (--augment). Received: augment=False")
        if self.init_from is not None:
            Bundle.load(self.init_from)  # BundleError now, not after loading the data
        if self.tensorboard is not None:
            _check_tensorboard(Path(self.tensorboard))
        if self.strategy == "multiworker":
            check_tf_config()
        check_output_dir(self.out, self.overwrite)
        saved = checkpoint_dir(self.out) / STATE_FILE
        if self.resume and not saved.exists():
            raise InvalidInputError(f"nothing to resume: no checkpoint of an interrupted run in {saved.parent}")
        if not self.resume and not self.overwrite and saved.exists():
            raise OutputExistsError(f"{saved.parent} holds the checkpoint of an interrupted run: --resume "
                                    f"continues it, --overwrite starts over")

    @property
    def from_scratch(self) -> bool:
        """No pretrained weights to start from: a random backbone."""
        return self.init_from is None and model_lib.resolve_weights(self.weights) is None


#: Values of the options left unset (None), by whether the backbone starts pretrained.
#: A frozen random backbone gives features little better than noise: on a Fashion-MNIST
#: subset the fine-tuning recipe reached 40% test accuracy from scratch, this one 67%.
def resolve_recipe(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the options it leaves unset taken from its recipe; from scratch, says so
    on one line when that changes what the fine-tuning recipe would train."""
    name = "from scratch" if cfg.from_scratch else "fine-tuning"
    unset = {key: value for key, value in RECIPES[name].items() if getattr(cfg, key) is None}
    if name == "from scratch" and unset and cfg.epochs_finetune > 0:
        chosen = ", ".join(f"{key}={value}" for key, value in unset.items())
        log(f"no pretrained weights: training the whole backbone from scratch ({chosen}); a frozen random "
            f"backbone learns little. Set these options to override")
    return dataclasses.replace(cfg, **unset)


def _check_tensorboard(folder: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise InvalidInputError("--tensorboard needs the tensorboard package: pip install 'edgeclf[train]'")
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"--tensorboard needs a folder for the logs. Received a file: {folder}")


def _load(source: Any, size: tuple[int, int], strict: bool, input_mode: str):
    if isinstance(source, ImageSet):
        if source.images.shape[1:3] != size:
            raise DataError(f"ImageSet images must be {size} (height, width) for this model. "
                            f"Received: {source.images.shape[1:3]}")
        return source
    return load_dataset(source, size, strict, input_mode)


class _Run:
    """A run's checkpoints: what a resumed run restores, and the callbacks that save each epoch."""

    def __init__(self, checkpoint: RunCheckpoint, saving: bool, state: dict[str, Any] | None):
        self.checkpoint, self.saving, self.state = checkpoint, saving, state
        self.finished: list[dict[str, Any]] = list(state["finished_phases"]) if state else []

    def finished_phase(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.finished if p["name"] == name), None)

    def resumed(self, name: str) -> dict[str, Any] | None:
        """The saved state if the run stopped inside phase ``name``."""
        current = self.state["current"] if self.state else None
        return self.state if current and current["phase"] == name else None

    def callbacks(self, cfg: TrainConfig, phase: str, model: keras.Model,
                  before: Sequence[keras.callbacks.Callback] = ()) -> tuple[list, EpochCheckpoints]:
        """``before`` (callbacks that change the weights or the logs), early stopping,
        TensorBoard logs in ``<tensorboard>/<phase>`` if asked for, and the epoch checkpoint last."""
        stopping = ResumableEarlyStopping(cfg.patience)
        resumed = self.resumed(phase)
        if resumed:
            current = resumed["current"]
            stopping.restore(current["early_stopping"], best_weights(resumed["arrays"]))
        epochs = EpochCheckpoints(self.checkpoint if self.saving else None, phase, self.finished, model,
                                  stopping, resumed)
        # First: a non-finite loss stops the phase before any callback (a checkpoint) sees it.
        callbacks = [_StopOnNonFinite(phase, cfg), *before, stopping]
        if cfg.tensorboard is not None:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(Path(cfg.tensorboard) / phase)))
        return [*callbacks, epochs], epochs

    def end_phase(self, record: dict[str, Any], model: keras.Model) -> dict[str, Any]:
        self.finished.append(record)
        if self.saving:
            self.checkpoint.save(self.finished, None, model)
        return record


def _fit_phase(run: _Run, cfg: TrainConfig, phase: str, model: keras.Model, fit_model: keras.Model,
               epochs: int, batches, before: Sequence[keras.callbacks.Callback] = (), **fit_args) -> dict[str, Any]:
    """Run ``fit_model.fit`` over ``batches(first_epoch)`` for ``epochs`` epochs, from the
    epoch a resumed run stopped at; returns the phase's merged history."""
    callbacks, saver = run.callbacks(cfg, phase, model, before)
    resumed = run.resumed(phase)
    first = resumed["current"]["epochs_done"] if resumed else 0
    if resumed and (first >= epochs or resumed["current"]["stopped"]):
        # Killed after its last epoch's checkpoint: only the end of the phase is left.
        restore_variables(model.variables, resumed["arrays"], "model", run.checkpoint.dir)
        best = best_weights(resumed["arrays"])
        if best is not None:
            fit_model.set_weights(best)
        return saver.history
    if first:
        log(f"{phase}: resuming after epoch {first} of {epochs}")
    fit_model.fit(batches(first), initial_epoch=first, epochs=epochs, callbacks=callbacks, shuffle=False, **fit_args)
    return saver.history


class _StopOnNonFinite(keras.callbacks.Callback):
    """Raise TrainingDivergedError at the first batch or epoch whose loss is NaN or infinite.

    Keras trains on through NaN (37 epochs of ``loss: nan`` from NaN weights, seen here);
    its TerminateOnNaN only stops, and the run would then write a bundle of NaN weights.
    """

    def __init__(self, phase: str, cfg: TrainConfig):
        super().__init__()
        self.phase, self.cfg = phase, cfg

    def _check(self, logs: dict | None, where: str) -> None:
        for key in ("loss", "val_loss"):
            value = (logs or {}).get(key)
            if value is not None and not np.isfinite(float(value)):
                lr = self.cfg.lr_frozen if self.phase == "frozen" else self.cfg.lr_finetune
                raise TrainingDivergedError(
                    f"{key} became {float(value)} in phase {self.phase} at {where}: training diverged; try a lower "
                    f"learning rate (it was {lr}), check the data, or start again without --resume if the "
                    f"checkpoint's weights are damaged")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._check(logs, f"batch {batch + 1}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._check(logs, f"epoch {epoch + 1}")


class _CalibrateThenValidate(keras.callbacks.Callback):
    """At each epoch end: re-estimate BatchNormalization statistics, then validate.

    Runs before EarlyStopping and the progress bar, which read the ``val_*`` it adds.
    """

    def __init__(self, calibration_images: np.ndarray, val_ds: tf.data.Dataset, batch_size: int):
        super().__init__()
        self.calibration_images = calibration_images
        self.val_ds = val_ds
        self.batch_size = batch_size

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        model_lib.calibrate_batchnorm(self.model, self.calibration_images, self.batch_size)
        results = self.model.evaluate(self.val_ds, verbose=0, return_dict=True)
        if logs is not None:
            logs["val_loss"] = float(results["loss"])
            logs["val_accuracy"] = float(results["accuracy"])


def _phase_record(h: dict[str, list[float]], seconds: float, **extra: Any) -> dict[str, Any]:
    best = int(np.argmin(h["val_loss"])) if h.get("val_loss") else None
    record = {
        "epochs_run": len(h.get("loss", [])),
        "seconds": round(seconds, 2),
        "best_epoch": None if best is None else best + 1,
        "best_val_loss": None if best is None else float(h["val_loss"][best]),
        "best_val_accuracy": None if best is None else float(h["val_accuracy"][best]),
    }
    record.update(extra)
    return record


def _init_from_bundle(model: keras.Model, cfg: TrainConfig, label_map: LabelMap, calib: np.ndarray) -> None:
    """Start from an earlier bundle's weights, e.g. one trained cheaply at a smaller size.

    The backbones are fully convolutional and the head follows a global pooling, so the
    weights fit any input size; what they learnt at another scale does not, which is why
    the BatchNormalization statistics are re-estimated here and training must continue
    (``--train-batchnorm --unfreeze-at 0`` adapts the whole network).
    """
    source = Bundle.load(cfg.init_from)
    if source.meta["backbone"]["name"] != cfg.backbone or source.labels != list(label_map.labels):
        raise InvalidInputError(
            f"--init-from needs a bundle with the same backbone and labels; {source.path} has "
            f"{source.meta['backbone']['name']} with labels {source.labels}, this training "
            f"{cfg.backbone} with {list(label_map.labels)}"
        )
    model.set_weights(load_keras_model(source).get_weights())
    log(f"initialised from {source.path} (trained at {source.image_size[0]}x{source.image_size[1]}); "
        f"estimating BatchNormalization statistics at {cfg.size[0]}x{cfg.size[1]} from {len(calib)} images")
    model_lib.calibrate_batchnorm(model, calib, cfg.batch_size)


def _prepare_data(cfg: TrainConfig) -> tuple[ImageSet, ImageSet, LabelMap, list]:
    """Load, check and split the data; returns (train, validation, label map, skipped)."""
    size = cfg.size
    log(f"loading data from {cfg.data if not isinstance(cfg.data, ImageSet) else 'arrays'} at {size[0]}x{size[1]}")
    data = _load(cfg.data, size, cfg.strict, cfg.input)
    if cfg.val_data is None:
        label_map = LabelMap.from_values(data.all_labels, cfg.labels)
        data.check_classes(label_map)
        train_set, val_set = split_stratified(data, cfg.val_split, cfg.seed)
    else:
        train_set, val_set = data, _load(cfg.val_data, size, cfg.strict, cfg.input)
        label_map = LabelMap.from_values(train_set.all_labels + val_set.all_labels, cfg.labels)
        train_set.check_classes(label_map, "the training data")
    how = "in memory" if isinstance(data, ImageSet) else "streamed from their files"
    log(f"{len(train_set)} training and {len(val_set)} validation images ({how}); labels {list(label_map.labels)}")
    return train_set, val_set, label_map, data.skipped + (val_set.skipped if cfg.val_data is not None else [])


def _train_frozen(run, cfg, model, loss, train_set, val_set, y_train, y_val, val_ds, class_weight, augment, verbose):
    """Phase 1: the head learns on a frozen backbone; on cached features where possible."""
    model_lib.freeze_backbone(model)
    t0 = time.perf_counter()
    steps = steps_per_epoch(len(train_set), cfg.batch_size)
    fit_args = dict(steps_per_epoch=steps, class_weight=class_weight, verbose=verbose)
    if cfg.cache_features and augment is None:
        cache = FeatureCache.for_backbone(cfg.feature_cache_dir or default_cache_dir(), model_lib.backbone_of(model),
                                          get_backbone(cfg.backbone), cfg.size, train_set, val_set)
        features = cache.load()
        hit = features is not None
        if hit:
            log(f"phase 1: backbone features of these {len(train_set) + len(val_set)} images read from {cache.path}")
        else:
            log(f"phase 1: computing backbone features once for {len(train_set) + len(val_set)} images "
                f"into {cache.path}")
            features = cache.compute(model_lib.feature_extractor(model), {"train": train_set, "val": val_set},
                                     cfg.batch_size)
        t_features = time.perf_counter() - t0
        head = model_lib.head_model(model)
        model_lib.compile_model(head, cfg.lr_frozen, loss)
        log(f"phase 1: training the head on cached features (lr={cfg.lr_frozen})")
        history = _fit_phase(  # rows are read from the memory-mapped files batch by batch
            run, cfg, "frozen", model, head, cfg.epochs_frozen,
            lambda first: feature_batches(features["train"], y_train, cfg.batch_size, cfg.seed, first,
                                          cfg.epochs_frozen),
            validation_data=feature_batches(features["val"], y_val, cfg.batch_size), **fit_args)
        extra = {"feature_cache": True, "feature_seconds": round(t_features, 2),
                 "feature_cache_hit": hit, "feature_cache_key": cache.key}
    else:
        model_lib.compile_model(model, cfg.lr_frozen, loss)
        log(f"phase 1: training the head, backbone frozen, running it every epoch (lr={cfg.lr_frozen})")
        history = _fit_phase(
            run, cfg, "frozen", model, model, cfg.epochs_frozen,
            lambda first: training_batches(train_set, y_train, cfg.batch_size, cfg.seed, augment, first,
                                           cfg.epochs_frozen),
            validation_data=val_ds, **fit_args)
        extra = {"feature_cache": False}
    return _phase_record(history, time.perf_counter() - t0, name="frozen", learning_rate=cfg.lr_frozen, **extra)


def _train_finetune(run, cfg, model, loss, unfreeze_index, calib, train_set, y_train, val_ds, class_weight, augment,
                    verbose):
    """Phase 2: the top of the backbone learns at a low learning rate."""
    model_lib.unfreeze_top(model, unfreeze_index, cfg.train_batchnorm)
    model_lib.compile_model(model, cfg.lr_finetune, loss)
    bn_mode = "on batch statistics" if cfg.train_batchnorm else "in inference mode"
    last = len(model_lib.backbone_of(model).layers) - 1
    log(f"phase 2: fine-tuning backbone layers {unfreeze_index}..{last} "
         f"(lr={cfg.lr_finetune}, BatchNormalization {bn_mode})")
    # Moving averages lag the changing weights: validate on fresh statistics.
    before = [_CalibrateThenValidate(calib, val_ds, cfg.batch_size)] if cfg.train_batchnorm else []
    t0 = time.perf_counter()
    history = _fit_phase(  # the dataset shuffles itself, seeded per epoch; one iterator for all epochs
        run, cfg, "finetune", model, model, cfg.epochs_finetune,
        lambda first: training_batches(train_set, y_train, cfg.batch_size, cfg.seed, augment, first,
                                       cfg.epochs_finetune),
        before, steps_per_epoch=steps_per_epoch(len(train_set), cfg.batch_size),
        validation_data=None if cfg.train_batchnorm else val_ds, class_weight=class_weight, verbose=verbose)
    return _phase_record(
        history, time.perf_counter() - t0, name="finetune", learning_rate=cfg.lr_finetune,
        unfreeze_at=unfreeze_index,
        batchnorm="batch statistics, re-estimated each epoch" if cfg.train_batchnorm else "inference mode",
    )


def _fingerprint(cfg: TrainConfig, train_set, val_set) -> dict[str, Any]:
    """What a resumed run must share with the one it continues: every setting that changes
    the weights, the weights it started from, and the images (path, size, mtime) in order."""
    same_either_way = {"resume", "overwrite", "strict", "input", "feature_cache_dir", "tensorboard", "verbose",
                       "peer_timeout"}
    fingerprint = {k: v for k, v in _settings(cfg).items() if k not in same_either_way}
    fingerprint.update(image_size=list(cfg.size), weights=_weights_record(cfg),
                       train_images=[len(train_set), images_sha256(train_set)],
                       val_images=[len(val_set), images_sha256(val_set)])
    return json.loads(json.dumps(fingerprint))  # as state.json will read back (tuples become lists)


def train(cfg: TrainConfig) -> Bundle | None:
    """Train, evaluate and write a bundle. Returns the written :class:`Bundle`.

    Under ``strategy="multiworker"`` only the chief writes the bundle; the other
    workers return ``None``.

    Raises:
        InvalidInputError, DataError, WeightsError, WeightsUnavailableError,
        OutputExistsError: bad settings or data, found before training starts.

    Example:
        >>> bundle = train(TrainConfig("digits", "runs/digits", image_size=75, weights=None))
        >>> bundle.meta["metrics"]["validation"]["accuracy"]
    """
    started = time.perf_counter()
    cfg.check()
    verbose = cfg.verbose if cfg.verbose is not None else (1 if sys.stdout.isatty() else 2)
    spec = get_backbone(cfg.backbone)
    train_set, val_set, label_map, skipped = _prepare_data(cfg)
    cfg = resolve_recipe(cfg)  # said once the data is known to be readable
    y_train, y_val = label_map.encode(train_set.values), label_map.encode(val_set.values)

    keras.utils.set_random_seed(cfg.seed)
    strategy = make_strategy(cfg.strategy, cfg.peer_timeout)
    class_weight = _class_weight(cfg.class_weights, y_train, len(label_map.labels))
    augment = augmenter(cfg.augment_flip) if cfg.augment else None
    val_ds = validation_batches(val_set, y_val, cfg.batch_size)
    rng = np.random.default_rng(cfg.seed)
    calib = train_set.pixels(np.sort(rng.choice(len(train_set), min(len(train_set), BN_CALIBRATION_IMAGES),
                                                 replace=False)))
    checkpoint = RunCheckpoint(cfg.out, _fingerprint(cfg, train_set, val_set))
    state = checkpoint.load() if cfg.resume else None  # CheckpointError: damaged, or another run's
    chief = is_chief(strategy)  # the only worker that writes: checkpoints and the bundle
    if not cfg.resume and chief:
        checkpoint.remove()  # an interrupted run's, which check() let --overwrite replace
    run = _Run(checkpoint, saving=chief, state=state)
    with strategy.scope():
        model = model_lib.build_model(len(label_map.labels), cfg.size, cfg.backbone, cfg.weights)
        loss = None if cfg.loss == "crossentropy" else ordinal_loss(label_map.labels, cfg.ordinal_alpha,
                                                                      cfg.ordinal_distance)
        unfreeze_index = model_lib.resolve_unfreeze_index(model_lib.backbone_of(model), spec, cfg.unfreeze_at)
        if cfg.init_from is not None:
            _init_from_bundle(model, cfg, label_map, calib)
        elif model_lib.resolve_weights(cfg.weights) is None:
            log(f"random backbone: estimating BatchNormalization statistics from {len(calib)} training images")
            model_lib.calibrate_batchnorm(model, calib, cfg.batch_size)
        if state is not None:
            restore_variables(model.variables, state["arrays"], "model", checkpoint.dir)
            log(f"resuming from {checkpoint.dir}: {len(run.finished)} phase(s) finished"
                + (f", {state['current']['phase']} after epoch {state['current']['epochs_done']}"
                   if state["current"] else ""))
        if cfg.epochs_frozen > 0 and not run.finished_phase("frozen"):
            run.end_phase(_train_frozen(run, cfg, model, loss, train_set, val_set, y_train, y_val, val_ds,
                                        class_weight, augment, verbose), model)
        if cfg.epochs_finetune > 0 and not run.finished_phase("finetune"):
            run.end_phase(_train_finetune(run, cfg, model, loss, unfreeze_index, calib, train_set, y_train, val_ds,
                                          class_weight, augment, verbose), model)
        phases = run.finished
        model_lib.freeze_backbone(model)

    logits = predict_logits(model, val_set, cfg.batch_size)
    metrics = classification_metrics(val_set.values, label_map.decode(logits.argmax(axis=1)), label_map.labels)
    log(f"validation: {format_metrics(metrics)}")
    # Every worker of a synchronous run ends with the same weights: each says which.
    weights = weights_sha256(model)
    log(f"final weights sha256 {weights}")
    if not chief:
        log("not the chief worker: leaving the bundle to the chief")
        return None

    meta = _bundle_meta(cfg, spec, model, label_map, train_set, val_set, skipped, unfreeze_index, phases,
                        metrics, strategy)
    _write_bundle(cfg, model, meta, weights, started)
    checkpoint.remove()  # the bundle is complete: nothing left to resume
    return Bundle.load(cfg.out)


def _class_weight(how: str, y_train: np.ndarray, classes: int) -> dict[int, float] | None:
    """Keras' class_weight: None, or for "balanced" each class weighted inversely to its frequency."""
    if how != "balanced":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(classes), y=y_train)
    return {i: float(w) for i, w in enumerate(weights)}


def _write_bundle(cfg: TrainConfig, model: keras.Model, meta: dict[str, Any], weights: str, started: float) -> None:
    """The bundle (model, confusion matrix, bundle.json) staged, then put in place at ``cfg.out`` whole."""
    with staged_directory(cfg.out, overwrite=cfg.overwrite) as stage:
        # For inference: uncompiled, so no optimizer state (twice the weights' size).
        model_lib.inference_copy(model).save(stage / MODEL_FILE)
        save_confusion_png(meta["metrics"]["validation"]["confusion_matrix"], stage / CONFUSION_PNG, "validation")
        meta["model"]["sha256"] = sha256_file(stage / MODEL_FILE)
        meta["model"]["weights_sha256"] = weights
        meta["training"]["wall_seconds"] = round(time.perf_counter() - started, 2)
        Bundle(stage, meta).save()
    log(f"wrote bundle {cfg.out} in {meta['training']['wall_seconds']:.1f} s")


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    """The plain settings of ``cfg`` (asdict() would deep-copy an ImageSet's pixels)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in ("data", "val_data", "out", "weights", "init_from", "verbose", "image_size",
                              "tensorboard", "feature_cache_dir")}


def _weights_record(cfg: TrainConfig) -> Any:
    """What the backbone started from: "none", "imagenet", a weights file or another bundle."""
    if cfg.init_from is not None:
        source = Bundle.load(cfg.init_from)
        return {"init_from": str(source.path), "sha256": source.meta["model"]["sha256"],
                "image_size": list(source.image_size)}
    weights = model_lib.resolve_weights(cfg.weights)
    if weights not in (None, "imagenet"):
        return {"file": Path(weights).name, "sha256": sha256_file(Path(weights))}
    return weights or "none"


def _bundle_meta(cfg, spec, model, label_map, train_set, val_set, skipped, unfreeze_index, phases,
                 metrics, strategy) -> dict[str, Any]:
    height, width = cfg.size
    weights = _weights_record(cfg)
    settings = _settings(cfg)
    settings["recipe"] = "from scratch" if cfg.from_scratch else "fine-tuning"
    settings["unfreeze_at"] = unfreeze_index  # None meant the backbone's own
    settings["labels"] = list(label_map.labels)
    return {
        "format": BUNDLE_FORMAT,
        "edgeclf_version": edgeclf.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "labels": list(label_map.labels),
        "input": {
            "name": "pixels", "height": height, "width": width, "channels": 3,
            "color": "RGB", "layout": "NHWC", "dtype": "float32", "range": [0, 255],
        },
        "preprocessing": {
            "inside_model": True,
            "model_input": "RGB pixel values 0..255 as float32",
            "in_graph": PREPROCESSING_DESCRIPTIONS[spec.preprocessing],
            "decode": DECODE_SPEC,
        },
        "backbone": {
            "name": spec.name, "keras_application": spec.constructor,
            "weights": weights or "none", "layers": len(model_lib.backbone_of(model).layers),
            "unfreeze_at": unfreeze_index,
        },
        "head": {"pooling": "global_average", "dense_units": 1024, "dropout": 0.5, "output": "logits"},
        "model": {
            "file": MODEL_FILE, "params": int(model.count_params()),
            "keras_version": keras.__version__, "tensorflow_version": tf.__version__,
        },
        "training": {
            "settings": settings,
            "replicas": int(strategy.num_replicas_in_sync),
            "loss": "SparseCategoricalCrossentropy(from_logits=True)",
            "phases": phases,
            "data": {
                "source": "arrays" if isinstance(cfg.data, ImageSet) else str(cfg.data),
                "validation": "split" if cfg.val_data is None else str(cfg.val_data),
                "train_images": len(train_set), "val_images": len(val_set),
                "class_counts": {str(v): int(np.sum(train_set.values == v)) for v in label_map.labels},
                "skipped_images": [{"source": s, "reason": r} for s, r in skipped],
            },
        },
        "metrics": {"validation": metrics},
        "artifacts": {},
    }
