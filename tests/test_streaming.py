"""Streaming input: images decoded batch by batch from their files, as the in-memory path sees them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgeclf.errors import DataError
from edgeclf.train.data import ImageFiles, ImageSet, load_dataset, load_folder, streams
from edgeclf.train.pipeline import epoch_order, steps_per_epoch, training_batches, validation_batches

SIZE = (40, 40)


@pytest.fixture(scope="module")
def both(noncontiguous_dir):
    """The same folder loaded into memory and as a list of files to stream."""
    return load_folder(noncontiguous_dir, SIZE), load_folder(noncontiguous_dir, SIZE, lazy=True)


def test_lazy_loading_keeps_the_list_and_labels_but_no_pixels(both):
    memory, files = both
    assert isinstance(memory, ImageSet) and isinstance(files, ImageFiles)
    assert files.sources == memory.sources and np.array_equal(files.values, memory.values)
    assert files.named_labels == memory.named_labels and files.image_size == SIZE
    assert not hasattr(files, "images")
    idx = np.asarray([5, 0, 17, 5])
    assert np.array_equal(files.pixels(idx), memory.pixels(idx))


def test_streaming_and_in_memory_pipelines_give_identical_batches(both):
    memory, files = both
    y = memory.values
    epochs, batch = 2, 32
    streamed = list(training_batches(files, y, batch, seed=7, augment=None, epochs=epochs))
    in_memory = list(training_batches(memory, y, batch, seed=7, augment=None, epochs=epochs))
    assert len(streamed) == len(in_memory) == epochs * steps_per_epoch(len(memory), batch)
    for (xs, ys), (xm, ym) in zip(streamed, in_memory, strict=True):
        assert np.array_equal(xs.numpy(), xm.numpy()) and np.array_equal(ys.numpy(), ym.numpy())
    # Each epoch is a permutation that depends on (seed, epoch) alone: the second epoch of a run
    # is what a run starting at epoch 1 reads first.
    order = np.concatenate([epoch_order(len(memory), 7, e) for e in range(epochs)])
    assert np.array_equal(np.concatenate([t.numpy() for _, t in in_memory]), y[order])
    later = list(training_batches(memory, y, batch, seed=7, augment=None, first_epoch=1, epochs=epochs))
    first_of_second = in_memory[steps_per_epoch(len(memory), batch)]
    assert np.array_equal(later[0][0].numpy(), first_of_second[0].numpy())
    val_s = np.concatenate([x.numpy() for x, _ in validation_batches(files, y, batch)])
    val_m = np.concatenate([x.numpy() for x, _ in validation_batches(memory, y, batch)])
    assert np.array_equal(val_s, val_m) and val_s.shape == (len(memory), *SIZE, 3)


def test_unreadable_files_are_found_before_streaming_starts(noncontiguous_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(noncontiguous_dir, root)
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match="broken.png"):
        files = load_dataset(root, SIZE, input_mode="stream")
    assert [s for s, _ in files.skipped] == [str(root / "3" / "broken.png")]
    assert str(root / "3" / "broken.png") not in files.sources
    with pytest.raises(Exception, match="broken.png"):
        load_dataset(root, SIZE, strict=True, input_mode="stream")


def test_auto_streams_only_what_would_not_fit_the_memory_bound():
    assert not streams("auto", 1_000, (299, 299))       # 268 MB of pixels
    assert streams("auto", 100_000, (299, 299))         # 27 GB
    assert streams("stream", 10, (8, 8)) and not streams("memory", 10**7, (299, 299))
    with pytest.raises(DataError, match="input mode"):
        load_dataset("digits", SIZE, input_mode="lazy")
