"""Phase 1's feature cache on disk: reused by a later run with the same key, recomputed when
the backbone, the size or an image changes, never trusted when damaged."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras  # noqa: E402

from edgeclf.train.backbones import get_backbone  # noqa: E402
from edgeclf.train.data import load_dataset  # noqa: E402
from edgeclf.train.feature_cache import FeatureCache  # noqa: E402


def _pooling_backbone(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_an_entry_is_reused_recomputed_on_change_and_replaced_when_damaged(noncontiguous_dir, tmp_path):
    files = load_dataset(noncontiguous_dir, (16, 16), input_mode="stream")
    train_set, val_set = files.subset(np.arange(0, 40)), files.subset(np.arange(40, 60))
    spec = get_backbone("mobilenet_v3_small")
    backbone = _pooling_backbone(0)

    def cache(model=backbone, size=(16, 16), train_part=train_set):
        return FeatureCache.for_backbone(tmp_path, model, spec, size, train_part, val_set)

    first = cache()
    assert first.load() is None
    features = first.compute(backbone, {"train": train_set, "val": val_set}, batch_size=16)
    assert isinstance(features["train"], np.memmap) and features["train"].shape == (40, 4)
    expected = backbone.predict(train_set.pixels(np.arange(40)).astype(np.float32), verbose=0)
    np.testing.assert_allclose(features["train"], expected, rtol=1e-5, atol=1e-6)
    assert cache().key == first.key and cache().load() is not None  # the same inputs: a hit
    # Other weights, another size, another image list, or a changed file: another key.
    touched = train_set.sources[0]
    keys = {cache(model=_pooling_backbone(1)).key, cache(size=(16, 17)).key,
            cache(train_part=train_set.subset(np.arange(39))).key}
    os.utime(touched, ns=(os.stat(touched).st_atime_ns, os.stat(touched).st_mtime_ns + 10**9))
    keys.add(cache().key)
    assert first.key not in keys and len(keys) == 4
    # A damaged entry reads as missing, and computing it again replaces it.
    (first.path / "train.npy").write_bytes(b"not an array")
    assert first.load() is None
    first.compute(backbone, {"train": train_set, "val": val_set}, batch_size=16)
    assert first.load()["train"].shape == (40, 4)
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.slow  # two training runs
def test_a_second_run_reads_the_features_the_first_computed(noncontiguous_dir, tmp_path):
    """Two runs of the command line, as a user makes them (each its own process)."""
    import json

    from tests.conftest import run_cli

    def run(name: str, lr: str) -> dict:
        done = run_cli("train", str(noncontiguous_dir), "--out", str(tmp_path / name), "--image-size", "32",
                       "--backbone", "mobilenet_v3_small", "--weights", "none", "--epochs-frozen", "2",
                       "--epochs-finetune", "0", "--lr-frozen", lr, "--seed", "3",
                       "--feature-cache-dir", str(tmp_path / "cache"))
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((tmp_path / name / "bundle.json").read_text())["training"]["phases"][0]

    first, second = run("a", "1e-3"), run("b", "3e-3")  # another head learning rate: the same features
    assert first["feature_cache_hit"] is False and second["feature_cache_hit"] is True
    assert first["feature_cache_key"] == second["feature_cache_key"]
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 1
