"""From a camera's picture to the integer: the reduced JPEG decode, the one resize that files and
arrays share, and decoding beside inference (lists, folders, streams), bounded and in order."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest
from PIL import Image

from edgeclf.errors import ImageDecodeError, InvalidInputError
from edgeclf import images
from edgeclf.images import DRAFT_GAP, REDUCING_GAP, load_image, resize_to
from edgeclf.runtime.decode_ahead import decode_ahead
from edgeclf.runtime.inputs import image_frames
from edgeclf.benchmarks.end_to_end import camera_picture, drawn_picture


@pytest.fixture(scope="module")
def camera_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("camera") / "picture.jpg"
    camera_picture((1600, 1200), seed=0).save(path, quality=92)
    return path


def test_a_large_jpeg_is_decoded_at_a_reduced_dct_scale_close_to_the_full_decode(camera_jpeg):
    size = (75, 75)
    fast = load_image(camera_jpeg, size)
    # libjpeg decodes at 1/8 here: 200x150 still holds DRAFT_GAP x 75 on both sides.
    with Image.open(camera_jpeg) as img:
        img.draft(None, (DRAFT_GAP * 75, DRAFT_GAP * 75))
        assert img.size == (200, 150)
        drafted = np.asarray(resize_to(img.convert("RGB"), size))
    np.testing.assert_array_equal(fast, drafted)
    # Against the whole picture decoded and filtered down in one step: a few levels at most.
    with Image.open(camera_jpeg) as img:
        exact = np.asarray(img.convert("RGB").resize((75, 75), Image.Resampling.BILINEAR), dtype=np.int16)
    difference = np.abs(fast.astype(np.int16) - exact)
    assert difference.mean() < 2.0 and np.percentile(difference, 99) < 12


def test_arrays_and_files_give_the_same_pixels(tmp_path):
    picture = camera_picture((1280, 720), seed=3)
    path = tmp_path / "frame.png"  # lossless, and no DCT scaling: the same pixels as the array
    picture.save(path)
    np.testing.assert_array_equal(image_frames(np.asarray(picture), (75, 75), "frame")[0], load_image(path, (75, 75)))


def _pillow_filters_across_first(source: tuple[int, int], target: tuple[int, int]) -> bool:
    """Whether Pillow's one resize call filters across first (always before Pillow 13; from 13,
    unless the reduced height shrinks by more than twice what the width does)."""
    (w, h), (tw, th) = source, target
    factor_x, factor_y = int(w / tw / REDUCING_GAP) or 1, int(h / th / REDUCING_GAP) or 1
    shrink_w, shrink_h = -(-w // factor_x) - tw, -(-h // factor_y) - th
    return not (shrink_h > 0 and shrink_h > 2 * shrink_w)


def test_the_resize_in_bands_on_threads_gives_pillows_pixels(monkeypatch):
    rng = np.random.default_rng(7)
    monkeypatch.setattr(images, "BAND_MIN_PIXELS", 0)  # bands even for these small images
    compared = 0
    for _ in range(60):
        source = (int(rng.integers(1, 700)), int(rng.integers(1, 700)))
        target = (int(rng.integers(1, 120)), int(rng.integers(1, 120)))
        img = Image.fromarray(rng.integers(0, 256, (source[1], source[0], 3), dtype=np.uint8))
        results = []
        for threads in (1, 2, 3):
            monkeypatch.setattr(images, "RESIZE_THREADS", threads)
            results.append(np.asarray(resize_to(img, (target[1], target[0]))))
        # Bands or not, the same pixels; and Pillow's own wherever it takes the same pass order.
        assert all(np.array_equal(results[0], r) for r in results[1:]), (source, target)
        if _pillow_filters_across_first(source, target):
            pillow = img.resize(target, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
            np.testing.assert_array_equal(results[0], np.asarray(pillow), err_msg=f"{source} -> {target}")
            compared += 1
    assert compared >= 30


def test_a_device_without_scikit_learn_draws_its_pictures_from_the_seed():
    picture = np.asarray(drawn_picture((320, 240), seed=4))
    assert picture.shape == (240, 320, 3) and (picture == np.asarray(drawn_picture((320, 240), seed=4))).all()
    # Photo-like: smooth regions and edges, not noise (neighbouring pixels close, the picture varied).
    assert np.abs(np.diff(picture.astype(np.int16), axis=1)).mean() < 12 and picture.std() > 20


def test_decode_ahead_keeps_order_reports_errors_and_bounds_the_work_in_flight():
    started, lock, peak, active = [], threading.Lock(), [0], [0]

    def decode(i: int) -> int:
        with lock:
            started.append(i)
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.002)
        with lock:
            active[0] -= 1
        if i == 3:
            raise ImageDecodeError("image 3 is broken")
        return i * 10

    out = list(decode_ahead(range(12), decode, threads=3, ahead=4))
    assert [item for item, _ in out] == list(range(12))
    assert [r for _, r in out if not isinstance(r, Exception)] == [i * 10 for i in range(12) if i != 3]
    assert isinstance(out[3][1], ImageDecodeError) and peak[0] <= 3
    # An endless stream is read lazily: closing after 5 results leaves at most `ahead` more begun.
    started.clear()
    stream = decode_ahead(itertools.count(), decode, threads=2, ahead=3)
    assert [next(stream)[0] for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert len(started) <= 5 + 3 + 1


def test_a_bug_in_decoding_is_not_swallowed():
    def decode(i: int) -> int:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        list(decode_ahead(range(3), decode, threads=2, ahead=2))


def test_lists_folders_and_streams_decode_ahead_and_agree_with_one_by_one(tiny_exported, digits_dir, tmp_path):
    from edgeclf.runtime import Predictor
    from edgeclf.runtime.files import predict_paths

    bundle, _ = tiny_exported
    files = sorted((digits_dir / "test").rglob("*.png"))[:7]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with Predictor.load(bundle.path, "onnx", batch_size=3, decode_threads=2) as predictor:
        alone = [predictor.predict(f) for f in files]
        assert predictor.predict(files) == alone  # a list: decoded ahead, inferred 3 at a time
        with pytest.raises(ImageDecodeError, match="broken.jpg"):
            predictor.predict([*files[:4], broken, *files[4:]])
        streamed = list(predictor.stream([*files[:2], broken, np.zeros((2, 8, 8, 3), np.uint8), *files[2:]]))
        assert [p for _, p in streamed[:2] + streamed[4:]] == alone
        assert isinstance(streamed[2][1], ImageDecodeError) and isinstance(streamed[3][1], InvalidInputError)
        records = list(predict_paths(predictor, [*files[:4], broken, *files[4:]]))
        assert [r["label"] for r in records if "label" in r] == [p.label for p in alone]
        assert records[4]["file"] == str(broken) and "error" in records[4]
    with pytest.raises(InvalidInputError, match="decode_threads"):
        Predictor.load(bundle.path, "onnx", decode_threads=0)
