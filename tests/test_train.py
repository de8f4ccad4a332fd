"""Two-phase training end to end on real digit images, and the bundle it writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

from edgeclf.bundle import BUNDLE_FORMAT, Bundle
from edgeclf.errors import BundleError, DataError, InvalidInputError, OutputExistsError
from edgeclf.train import TrainConfig, evaluate_bundle, train
from edgeclf.train.data import load_folder

#: Builds and trains real InceptionV3 networks.
pytestmark = pytest.mark.slow


def test_bundle_json_contents(trained_bundle):
    meta = json.loads((trained_bundle.path / "bundle.json").read_text())
    assert meta["format"] == BUNDLE_FORMAT
    assert meta["labels"] == [-2, 3, 10]
    assert meta["input"] == {
        "name": "pixels", "height": 75, "width": 75, "channels": 3, "color": "RGB",
        "layout": "NHWC", "dtype": "float32", "range": [0, 255],
    }
    assert meta["preprocessing"]["inside_model"] is True
    assert meta["preprocessing"]["in_graph"] == "float32(pixels) / 127.5 - 1"
    assert meta["backbone"]["name"] == "inception_v3" and meta["backbone"]["unfreeze_at"] == 249
    assert meta["backbone"]["weights"] == "none"
    assert meta["training"]["loss"] == "SparseCategoricalCrossentropy(from_logits=True)"
    frozen, finetune = meta["training"]["phases"]
    assert frozen["name"] == "frozen" and frozen["feature_cache"] is True and frozen["epochs_run"] >= 1
    assert finetune["name"] == "finetune" and finetune["unfreeze_at"] == 249
    settings = meta["training"]["settings"]
    assert settings["lr_frozen"] == 1e-3 and settings["lr_finetune"] == 1e-4 and settings["seed"] == 0
    data = meta["training"]["data"]
    assert data["train_images"] == sum(data["class_counts"].values())
    assert set(data["class_counts"]) == {"-2", "3", "10"}
    m = meta["metrics"]["validation"]
    assert m["confusion_matrix"]["labels"] == [-2, 3, 10]
    matrix = np.asarray(m["confusion_matrix"]["matrix"])
    assert matrix.sum() == m["n"] == data["val_images"]
    # Every figure follows from the confusion matrix (rows: true label, columns: predicted).
    labels = np.asarray([-2, 3, 10])
    assert m["accuracy"] == pytest.approx(np.trace(matrix) / m["n"])
    distance = np.abs(labels[:, None] - labels[None, :])
    assert m["mae"] == pytest.approx((matrix * distance).sum() / m["n"])
    assert m["rmse"] == pytest.approx(np.sqrt((matrix * distance ** 2).sum() / m["n"]))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(np.diag(matrix) / matrix.sum(axis=0))
        recall = np.nan_to_num(np.diag(matrix) / matrix.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((precision.mean(), recall.mean(), f1.mean()))
    assert meta["artifacts"] == {}
    digest = hashlib.sha256((trained_bundle.path / "model.keras").read_bytes()).hexdigest()
    assert meta["model"]["sha256"] == digest
    png = (trained_bundle.path / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert not [p for p in trained_bundle.path.parent.iterdir() if p.name.startswith(".")]


def test_saved_model_decodes_to_the_integer_labels(trained_bundle, noncontiguous_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Keras's optimizer-mismatch warning
        model = keras.saving.load_model(trained_bundle.model_path)
    assert model.output_shape == (None, 3) and not model.compiled
    data = load_folder(noncontiguous_dir, (75, 75))
    logits = model.predict(data.images.astype("float32"), verbose=0)
    predicted = np.asarray(trained_bundle.labels)[logits.argmax(axis=1)]
    assert set(predicted.tolist()) <= {-2, 3, 10}
    # Trained on these images: far better than the 1/3 of chance.
    assert np.mean(predicted == data.values) > 0.6


def test_evaluate_bundle_writes_a_report(trained_bundle, noncontiguous_dir, tmp_path):
    metrics = evaluate_bundle(trained_bundle.path, noncontiguous_dir, report_dir=tmp_path / "report")
    assert metrics["n"] == len(load_folder(noncontiguous_dir, (75, 75)))
    assert set(metrics["per_class"]) == {"-2", "3", "10"}
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"]
    assert (tmp_path / "report" / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")


def test_evaluate_refuses_labels_the_model_does_not_know(trained_bundle, digits_dir):
    with pytest.raises(DataError, match="not labels"):
        evaluate_bundle(trained_bundle.path, digits_dir / "test")


def test_bundle_errors(tmp_path, trained_bundle):
    with pytest.raises(BundleError, match="not found"):
        Bundle.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no bundle.json"):
        Bundle.load(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        Bundle.load(tmp_path / "corrupt")
    for name, change, message in (
        ("future", {"format": "edgeclf-bundle/99"}, "edgeclf-bundle/99"),
        ("unsorted", {"labels": [3, -2, 10]}, r"sorted list.*\[3, -2, 10\]"),
        ("noinput", {"input": {"height": 75}}, "positive integer height, width and channels"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bundle.json").write_text(json.dumps(dict(trained_bundle.meta, **change)))
        with pytest.raises(BundleError, match=message):
            Bundle.load(tmp_path / name)


def test_output_directory_not_empty_is_refused_before_training(trained_bundle, noncontiguous_dir):
    before = sorted(p.name for p in trained_bundle.path.iterdir())
    with pytest.raises(OutputExistsError, match="--overwrite"):
        train(TrainConfig(noncontiguous_dir, trained_bundle.path, image_size=75, weights=None))
    assert sorted(p.name for p in trained_bundle.path.iterdir()) == before


def test_class_with_one_image_fails_before_training(noncontiguous_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(noncontiguous_dir / "3", data / "3")
    (data / "4").mkdir()
    shutil.copy(next((noncontiguous_dir / "10").iterdir()), data / "4")
    with pytest.raises(DataError, match="label 4: 1"):
        train(TrainConfig(data, tmp_path / "out", image_size=75, weights=None))
    assert not (tmp_path / "out").exists()


def test_declared_labels_may_exceed_the_data_only_with_images(noncontiguous_dir, tmp_path):
    with pytest.raises(DataError, match="label 4: 0"):
        train(TrainConfig(noncontiguous_dir, tmp_path / "out", labels=[-2, 3, 4, 10],
                          image_size=75, weights=None))


def test_val_dir_class_weights_augmentation_and_overwrite(noncontiguous_dir, trained_bundle, tmp_path):
    import shutil

    val = tmp_path / "val"
    for label in ("-2", "3", "10"):
        (val / label).mkdir(parents=True)
        for path in sorted((noncontiguous_dir / label).iterdir())[:8]:
            shutil.copy(path, val / label)
    out = tmp_path / "bundle"
    shutil.copytree(trained_bundle.path, out)  # an old bundle to replace
    bundle = train(TrainConfig(
        noncontiguous_dir, out, val_data=val, image_size=75, weights=None, epochs_frozen=1,
        epochs_finetune=0, class_weights="balanced", augment=True, overwrite=True, verbose=0,
    ))
    meta = bundle.meta
    assert meta["training"]["data"]["validation"] == str(val)
    assert meta["training"]["data"]["val_images"] == 24
    assert meta["training"]["settings"]["class_weights"] == "balanced"
    # Augmentation changes the backbone's input every epoch: no feature cache.
    assert [p["name"] for p in meta["training"]["phases"]] == ["frozen"]
    assert meta["training"]["phases"][0]["feature_cache"] is False
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # old bundle gone, no leftovers


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(noncontiguous_dir, tmp_path):
    # Logical devices must be configured before TensorFlow initialises: own process. The strategy's
    # plumbing is the same for every backbone: the smallest one keeps it short.
    script = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
        from edgeclf.train import TrainConfig, train
        bundle = train(TrainConfig({str(noncontiguous_dir)!r}, {str(tmp_path / "b")!r}, image_size=32,
                                   backbone="mobilenet_v3_small", weights=None, epochs_frozen=1,
                                   epochs_finetune=1, strategy="mirrored", verbose=0))
        print("REPLICAS", bundle.meta["training"]["replicas"])
        print("ACCURACY", bundle.meta["metrics"]["validation"]["accuracy"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REPLICAS 2" in out.stdout
    assert (tmp_path / "b" / "model.keras").is_file()


def test_init_from_another_bundle_at_another_size(trained_bundle, noncontiguous_dir, digits_dir, tmp_path):
    from edgeclf.train.evaluate import load_keras_model

    bundle = train(TrainConfig(
        data=noncontiguous_dir, out=tmp_path / "b96", image_size=96, weights=None, init_from=trained_bundle.path,
        epochs_frozen=1, epochs_finetune=0, seed=0, verbose=0,
    ))
    assert bundle.image_size == (96, 96)
    assert bundle.meta["backbone"]["weights"] == {"init_from": str(trained_bundle.path),
                                                  "sha256": trained_bundle.meta["model"]["sha256"],
                                                  "image_size": [75, 75]}
    source, started = load_keras_model(trained_bundle), load_keras_model(bundle)
    convs = lambda m: [w for w in m.weights if "conv2d" in w.path and "kernel" in w.path]  # noqa: E731
    # Phase 1 trains only the head: the backbone's convolutions are the source bundle's.
    for a, b in zip(convs(source), convs(started), strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    with pytest.raises(InvalidInputError, match="same backbone and labels.*labels \\[-2, 3, 10\\].*\\[0, 1"):
        train(TrainConfig(data=digits_dir / "train", out=tmp_path / "x", image_size=75, weights=None,
                          init_from=trained_bundle.path, epochs_frozen=1, epochs_finetune=0, verbose=0))
    with pytest.raises(BundleError, match="not found"):
        TrainConfig(data=noncontiguous_dir, out=tmp_path / "y", init_from=tmp_path / "nothing").check()
