"""Early stopping ends a run with the weights of its best epoch, not its last."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax

from tests.conftest import TINY_SIZE


@pytest.mark.slow
def test_a_run_whose_later_epochs_get_worse_ends_with_the_best_epochs_weights(noncontiguous_dir, tmp_path):
    from edgeclf.export.reference import reference_sets
    from edgeclf.train import TrainConfig, train
    from edgeclf.train.data import LabelMap
    from edgeclf.train.evaluate import load_keras_model, predict_logits

    # A learning rate far too high for Adam: validation loss jumps around, so the last epoch
    # is not the best one and restoring the best weights is visible.
    bundle = train(TrainConfig(
        data=noncontiguous_dir, out=tmp_path / "b", image_size=TINY_SIZE, backbone="mobilenet_v3_small", weights=None,
        epochs_frozen=0, epochs_finetune=6, unfreeze_at=0, train_batchnorm=True, lr_finetune=1.0, patience=2,
        batch_size=32, seed=0, verbose=0,
    ))
    (phase,) = bundle.meta["training"]["phases"]
    assert phase["best_epoch"] < phase["epochs_run"], phase

    _, heldout = reference_sets(bundle)  # the validation split training monitored
    logits = predict_logits(load_keras_model(bundle), heldout.images).astype(np.float64)
    y = LabelMap(tuple(bundle.labels)).encode(heldout.values)
    loss = float(-log_softmax(logits, axis=1)[np.arange(len(y)), y].mean())  # Keras' loss, from logits
    assert loss == pytest.approx(phase["best_val_loss"], rel=1e-3)
    assert bundle.meta["metrics"]["validation"]["accuracy"] == pytest.approx(phase["best_val_accuracy"])
