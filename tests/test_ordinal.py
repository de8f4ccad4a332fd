"""Soft ordinal labels (train --loss ordinal): the targets, the options, and a model trained with them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeclf.cli import main
from edgeclf.errors import InvalidInputError
from edgeclf.train.ordinal import check_loss, soft_labels


def test_soft_labels_of_a_non_contiguous_label_set_weigh_distances_by_value():
    table = soft_labels([-2, 3, 10], alpha=0.5, distance="abs")
    # True -2: distances 0, 5, 12 -> weights e^0, e^-2.5, e^-6, normalised.
    weights = [1.0, math.exp(-2.5), math.exp(-6.0)]
    assert np.allclose(table[0], [w / sum(weights) for w in weights], atol=1e-7)
    # True 3: distances 5, 0, 7.
    weights = [math.exp(-2.5), 1.0, math.exp(-3.5)]
    assert np.allclose(table[1], [w / sum(weights) for w in weights], atol=1e-7)
    squared = soft_labels([-2, 3, 10], alpha=0.1, distance="squared")
    weights = [math.exp(-0.1 * 144), math.exp(-0.1 * 49), 1.0]  # true 10: distances 12, 7, 0, squared
    assert np.allclose(squared[2], [w / sum(weights) for w in weights], atol=1e-7)
    assert np.allclose(table.sum(axis=1), 1.0) and table.dtype == np.float32


def test_a_large_alpha_approaches_one_hot_and_stays_finite():
    table = soft_labels(list(range(10)), alpha=100.0, distance="squared")
    assert np.isfinite(table).all() and np.allclose(table, np.eye(10), atol=1e-30)


@pytest.mark.parametrize("args, fragment", [
    (("mse", 1.0, "abs"), "loss must be one of crossentropy, ordinal. Received: 'mse'"),
    (("ordinal", 0.0, "abs"), "ordinal alpha must be a finite number > 0"),
    (("ordinal", -1.0, "abs"), "Received: -1.0"),
    (("ordinal", float("nan"), "abs"), "Received: nan"),
    (("ordinal", 1.0, "cubic"), "ordinal distance must be one of abs, squared. Received: 'cubic'"),
])
def test_bad_loss_settings_are_one_line_errors(args, fragment):
    with pytest.raises(InvalidInputError, match="Received") as info:
        check_loss(*args)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("argv, fragment", [
    (["--loss", "mse"], "invalid choice: 'mse'"), (["--ordinal-alpha", "0"], "--ordinal-alpha"),
    (["--ordinal-alpha", "-2"], "Received: -2"),
])
def test_bad_loss_options_are_refused_where_they_are_parsed(capsys, tmp_path, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "digits", "--out", str(tmp_path / "o"), *argv])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and fragment in line


def test_the_config_file_takes_the_loss(tmp_path):
    from edgeclf.train.options import read_config

    path = tmp_path / "train.toml"
    path.write_text('loss = "ordinal"\nordinal-alpha = 2.5\nordinal-distance = "squared"\n')
    assert read_config(path) == {"loss": "ordinal", "ordinal_alpha": 2.5, "ordinal_distance": "squared"}
    path.write_text("ordinal-alpha = 0\n")
    with pytest.raises(InvalidInputError, match="'ordinal-alpha'"):
        read_config(path)


@pytest.mark.slow  # trains a small model with the ordinal loss and exports it (about a minute and a half)
def test_an_ordinal_model_exports_to_artifacts_that_give_the_keras_argmax_labels(noncontiguous_dir, tmp_path):
    """One logit per class, whatever the loss: ONNX, OpenVINO and LiteRT give Keras' argmax labels on the
    held-out images, and bundle.json records the loss and its parameters."""
    from edgeclf.bundle import Bundle
    from edgeclf.export import ExportOptions, export_bundle
    from edgeclf.runtime import Predictor
    from edgeclf.train import TrainConfig, train
    from edgeclf.verification import load_verification_set
    from tests.conftest import TINY_SIZE

    bundle = train(TrainConfig(noncontiguous_dir, tmp_path / "ordinal", image_size=TINY_SIZE,
                               backbone="mobilenet_v3_small", weights=None, epochs_frozen=0, epochs_finetune=1,
                               loss="ordinal", ordinal_alpha=0.5, ordinal_distance="abs", verbose=0))
    settings = bundle.meta["training"]["settings"]
    assert (settings["loss"], settings["ordinal_alpha"], settings["ordinal_distance"]) == ("ordinal", 0.5, "abs")
    records = export_bundle(bundle.path, "onnx,openvino,tflite", ExportOptions())
    reference = load_verification_set(Bundle.load(bundle.path))  # written by the export
    keras_labels = np.asarray(bundle.labels)[reference.logits.argmax(axis=1)]
    for record in records:
        with Predictor.load(bundle.path, record["format"], allow_unvalidated=True) as predictor:
            labels = [p.label for p in predictor.predict_batch(reference.images)]
        assert labels == keras_labels.tolist(), record["format"]


def test_the_gauges_dataset_is_deterministic_and_ordered_by_folder(tmp_path):
    from edgeclf.train.gauges import READINGS, write_gauges_folder

    counts = write_gauges_folder(tmp_path / "a", per_class=5, holdout=0.2, size=48)
    write_gauges_folder(tmp_path / "b", per_class=5, holdout=0.2, size=48)
    assert counts == {"train": 44, "test": 11}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert {p.parts[1] for p in files} == {str(r) for r in READINGS}
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in files)
    from PIL import Image

    with Image.open(tmp_path / "a" / files[0]) as img:
        assert img.size == (48, 48) and img.mode == "RGB"
    with pytest.raises(SystemExit):  # an unknown dataset name is argparse's usage error
        main(["dataset", "meters", str(tmp_path / "c")])
