"""The model builder: structure, freezing, weights handling (real Keras InceptionV3)."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

from edgeclf.errors import InvalidInputError, WeightsError, WeightsUnavailableError
from edgeclf.train import model as model_lib
from edgeclf.train.backbones import BACKBONES, get_backbone
from edgeclf.train.data import load_folder
from tests.conftest import HANG_S

SIZE = (75, 75)

#: Builds and trains real InceptionV3 networks.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return model_lib.build_model(3, SIZE, weights=None)


def test_structure_logits_head(model):
    assert model.input_shape == (None, 75, 75, 3)
    assert model.output_shape == (None, 3)
    names = [layer.name for layer in model.layers]
    assert names[-4:] == ["avg_pool", "head_dense", "head_dropout", "logits"]
    assert model.get_layer("head_dense").units == 1024
    assert model.get_layer("head_dense").activation.__name__ == "relu"
    assert model.get_layer("head_dropout").rate == 0.5
    # The output is linear: raw logits, not probabilities.
    assert model.get_layer("logits").activation.__name__ == "linear"
    # InceptionV3's x / 127.5 - 1 lives inside the model, so it takes raw 0..255 pixels.
    pre = model.get_layer("preprocess")
    assert pre.scale == pytest.approx(1 / 127.5) and pre.offset == pytest.approx(-1.0)
    assert len(model_lib.backbone_of(model).layers) == 311


def test_loss_is_from_logits(model):
    model_lib.compile_model(model, 1e-3)
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    assert model.loss.from_logits is True


def test_default_unfreeze_point_is_layer_249(model):
    base = model_lib.backbone_of(model)
    index = model_lib.resolve_unfreeze_index(base, get_backbone("inception_v3"), None)
    assert index == 249
    assert base.layers[index - 1].name == "mixed8"
    assert base.layers[-1].name == "mixed10"
    with pytest.raises(InvalidInputError, match="between 0 and 311"):
        model_lib.resolve_unfreeze_index(base, get_backbone("inception_v3"), 400)


def _weights_by_layer(base):
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in base.layers}


def test_phase1_trains_only_the_head(digits_dir):
    model = model_lib.build_model(10, SIZE, weights=None)
    model_lib.freeze_backbone(model)
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable == {"head_dense", "logits"}


def test_phase2_unfreezes_from_249_with_batchnorm_in_inference_mode(digits_dir):
    data = load_folder(digits_dir / "test", SIZE)
    model = model_lib.build_model(10, SIZE, weights=None)
    base = model_lib.backbone_of(model)
    model_lib.unfreeze_top(model, 249)
    for i, layer in enumerate(base.layers):
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable
        elif layer.weights:
            assert layer.trainable == (i >= 249), layer.name

    before = _weights_by_layer(base)
    model_lib.compile_model(model, 1e-3)
    model.fit(data.images[:64].astype("float32"), data.values[:64], batch_size=32, epochs=1, verbose=0)
    after = _weights_by_layer(base)

    changed = {name for name in before if any(
        not np.array_equal(a, b) for a, b in zip(before[name], after[name], strict=True))}
    index = {layer.name: i for i, layer in enumerate(base.layers)}
    assert changed, "phase 2 must update the top blocks"
    assert all(index[name] >= 249 for name in changed), sorted(changed)
    # No BatchNormalization statistic (or scale) moved: inference mode throughout.
    assert not any(isinstance(base.get_layer(n), keras.layers.BatchNormalization) for n in changed)
    assert any(isinstance(base.get_layer(n), keras.layers.Conv2D) for n in changed)


def test_batchnorm_calibration_only_changes_statistics(digits_dir):
    data = load_folder(digits_dir / "test", SIZE)
    model = model_lib.build_model(10, SIZE, weights=None)
    bn = [l for l in model_lib.backbone_of(model).layers if isinstance(l, keras.layers.BatchNormalization)][-1]
    assert np.allclose(np.array(bn.moving_variance), 1.0)
    model_lib.calibrate_batchnorm(model, data.images[:64].astype("float32"))
    assert not np.allclose(np.array(bn.moving_variance), 1.0)
    assert bn.momentum == 0.99 and not bn.trainable
    features = model_lib.feature_extractor(model).predict(data.images[:64].astype("float32"), verbose=0)
    assert features.std() > 0.05  # before calibration random features collapse to ~1e-3


def test_tapped_model_gives_the_logits_and_each_block_pooled(model):
    x = np.random.default_rng(0).uniform(0, 255, (2, *SIZE, 3)).astype(np.float32)
    logits, mixed0, head_input = (np.asarray(a) for a in model_lib.tapped_model(model, ("mixed0", "avg_pool"))(x))
    np.testing.assert_allclose(logits, np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head_input, np.asarray(model_lib.feature_extractor(model)(x)), rtol=1e-5, atol=1e-6)
    base = model_lib.backbone_of(model)
    inner = keras.Model(base.input, base.get_layer("mixed0").output)(model.get_layer("preprocess")(x))
    np.testing.assert_allclose(mixed0, np.asarray(inner).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    assert mixed0.shape == (2, 256)
    # One block: what the exported graphs' embedding is.
    both = model_lib.embedding_model(model, None)
    assert [tuple(o.shape) for o in both.outputs] == [(None, 3), (None, 2048)]
    with pytest.raises(InvalidInputError, match=r"no layers named \['mixed99'\]"):
        model_lib.tapped_model(model, ("mixed99",))


def test_image_size_below_75_is_refused():
    with pytest.raises(InvalidInputError, match=r"at least 75x75.*\(74, 74\)"):
        model_lib.build_model(3, (74, 74), weights=None)


def test_other_backbones_build():
    for name in ("mobilenet_v3_small", "efficientnet_b0", "mobilenet_v2"):
        spec = BACKBONES[name]
        model = model_lib.build_model(4, (64, 64), backbone=name, weights=None)
        assert model.output_shape == (None, 4)
        base = model_lib.backbone_of(model)
        index = model_lib.resolve_unfreeze_index(base, spec, None)
        assert 0 < index < len(base.layers)
        # Every familiarity candidate is a layer of this Keras version's backbone, and tappable.
        tapped = model_lib.tapped_model(model, (*spec.familiarity_candidates, model_lib.HEAD_INPUT))
        assert len(tapped.outputs) == len(spec.familiarity_candidates) + 2
    with pytest.raises(InvalidInputError, match="unknown backbone 'vgg'"):
        model_lib.build_model(3, SIZE, backbone="vgg", weights=None)


def test_local_weights_file_round_trip(tmp_path, model):
    path = tmp_path / "inception_notop.weights.h5"
    model_lib.backbone_of(model).save_weights(path)
    loaded = model_lib.build_model(3, SIZE, weights=path)
    for a, b in zip(model_lib.backbone_of(model).weights, model_lib.backbone_of(loaded).weights, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_weights_file_missing(tmp_path):
    with pytest.raises(WeightsError, match="not found.*nothing.h5"):
        model_lib.build_model(3, SIZE, weights=tmp_path / "nothing.h5")


def test_weights_file_of_another_architecture(tmp_path):
    other = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3))
    path = tmp_path / "mobilenet.weights.h5"
    other.save_weights(path)
    with pytest.raises(WeightsError, match="could not load weights file .*mobilenet.weights.h5 into inception_v3"):
        model_lib.build_model(3, SIZE, weights=path)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5")
    with pytest.raises(WeightsError, match="junk.h5"):
        model_lib.build_model(3, SIZE, weights=junk)


def test_imagenet_download_failure_says_how_to_pass_a_file(tmp_path):
    # A fresh KERAS_HOME has no cached weights, so Keras must download; this machine
    # (like CI) reaches no download host. Run in a subprocess so KERAS_HOME applies.
    code = (
        "from edgeclf.errors import WeightsUnavailableError\n"
        "from edgeclf.train.model import build_model\n"
        "try:\n"
        "    build_model(3, (75, 75), weights='imagenet')\n"
        "except WeightsUnavailableError as e:\n"
        "    print('MESSAGE', e)\n"
        "else:\n"
        "    print('DOWNLOADED')\n"
    )
    env = {"KERAS_HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_S)
    if "DOWNLOADED" in out.stdout:
        pytest.skip("this machine can download ImageNet weights; the failure path cannot be shown")
    assert "MESSAGE" in out.stdout, out.stderr[-2000:]
    assert "--weights /path/to/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in out.stdout
    assert issubclass(WeightsUnavailableError, OSError)
