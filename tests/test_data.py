"""Data loading on real image files written from scikit-learn's digits."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from edgeclf.errors import DataError, ImageDecodeError
from edgeclf.train.data import (
    ImageSet, LabelMap, from_arrays, load_csv, load_dataset, load_digits_set, load_folder,
    split_stratified,
)

SIZE = (75, 75)


def test_label_map_round_trip_noncontiguous():
    label_map = LabelMap.from_values([10, -2, 3, 3, 10])
    assert label_map.labels == (-2, 3, 10)
    values = np.array([3, -2, 10, 10, -2])
    indices = label_map.encode(values)
    assert indices.tolist() == [1, 0, 2, 2, 0]
    assert label_map.decode(indices).tolist() == values.tolist()


def test_label_map_declared_labels_and_unknown_values():
    assert LabelMap.from_values([3, 5], labels=[7, 3, 4, 5, 6]).labels == (3, 4, 5, 6, 7)
    with pytest.raises(DataError, match=r"labels \[9\]"):
        LabelMap.from_values([3, 9], labels=[3, 4])
    with pytest.raises(DataError, match="not labels"):
        LabelMap((0, 1)).encode([2])
    with pytest.raises(DataError, match="two distinct"):
        LabelMap((1, 1))


def test_folder_loader_reads_real_pngs(digits_dir):
    data = load_folder(digits_dir / "train", SIZE)
    assert data.images.shape == (len(data), 75, 75, 3)
    assert data.images.dtype == np.uint8
    assert sorted(set(data.values.tolist())) == list(range(10))
    assert len(data) == 1437 and not data.skipped
    # The folder a file sits in is its label.
    for source, value in zip(data.sources[:50], data.values[:50], strict=True):
        assert source.split("/")[-2] == str(value)
    # Handwriting, not a blank: the ink is bright on a dark background.
    assert data.images.max() > 200 and data.images.min() < 30


def test_csv_loader_matches_folder_loader(digits_dir, tmp_path):
    folder = load_folder(digits_dir / "test", SIZE)
    csv_path = digits_dir / "test.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for source, value in zip(folder.sources, folder.values, strict=True):
            writer.writerow([str(source).replace(str(digits_dir) + "/", ""), int(value)])
    data = load_dataset(csv_path, SIZE)
    np.testing.assert_array_equal(data.values, folder.values)
    np.testing.assert_array_equal(data.images, folder.images)


def test_csv_bad_label_names_the_line(tmp_path, digits_dir):
    path = tmp_path / "bad.csv"
    png = next((digits_dir / "test" / "0").iterdir())
    path.write_text(f"{png},0\n{png},seven\n")
    with pytest.raises(DataError, match=r"'seven' in .*bad.csv:2"):
        load_csv(path, SIZE)


def test_csv_with_bom_comment_and_header(tmp_path, digits_dir):
    png = next((digits_dir / "test" / "4").iterdir())
    path = tmp_path / "data.csv"
    path.write_text(f"# exported from a spreadsheet\npath,label\n{png},4\n\n{png},4\n", encoding="utf-8-sig")
    data = load_csv(path, SIZE)
    assert data.values.tolist() == [4, 4]
    path.write_bytes(b"\xff\xfe bad bytes,1\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_csv(path, SIZE)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "data" / "0"
    root.mkdir(parents=True)
    values = np.full((10, 10), 32768, dtype=np.uint16)
    Image.fromarray(values).save(root / "deep.png")
    Image.fromarray(values).save(root / "deep2.png")
    data = load_folder(tmp_path / "data", SIZE)
    assert 120 <= int(data.images.mean()) <= 135  # half of full scale, not 255


def test_grayscale_and_rgba_become_rgb(tmp_path):
    root = tmp_path / "data"
    for label, mode in ((0, "L"), (1, "RGBA"), (2, "P")):
        (root / str(label)).mkdir(parents=True)
        for i in range(2):
            Image.new(mode, (20, 30)).save(root / str(label) / f"img{i}.png")
    Image.new("RGB", (20, 30), (10, 20, 30)).save(root / "2" / "img2.bmp")
    Image.new("RGB", (20, 30), (10, 20, 30)).save(root / "2" / "img3.gif")
    Image.new("RGB", (20, 30), (10, 20, 30)).save(root / "2" / "img4.jpg")
    data = load_folder(root, SIZE)
    assert data.images.shape == (9, 75, 75, 3)
    # Fully transparent RGBA pixels are composited over white, as a viewer shows them.
    rgba = data.images[data.values == 1]
    assert (rgba == 255).all()


def test_exif_orientation_is_applied_as_a_viewer_shows_the_photo(tmp_path):
    """README: decoding applies EXIF orientation. A phone stores a portrait photo landscape,
    with Orientation 6 ("rotate 90 clockwise to view"); training and the runtime must see it upright."""
    from edgeclf.images import load_image

    upright = np.zeros((40, 20, 3), np.uint8)  # tall: 40 high, 20 wide
    upright[:10] = (255, 0, 0)  # red band at the top
    # As the camera stores it: the upright picture turned 90 degrees counter-clockwise.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "photo.jpg").size == (40, 20)  # stored landscape

    decoded = load_image(tmp_path / "photo.jpg")
    assert decoded.shape == (40, 20, 3)
    assert decoded[:8, :, 0].mean() > 200 and decoded[:8, :, 1:].mean() < 60  # red on top, as viewed
    assert decoded[-8:].mean() < 30
    resized = load_image((tmp_path / "photo.jpg").read_bytes(), (75, 75))  # bytes as well as files
    assert resized[:10, :, 0].mean() > 200 and resized[-10:].mean() < 30


def test_digits_builtin_dataset():
    data = load_digits_set(SIZE)
    assert data.images.shape == (1797, 75, 75, 3)
    assert np.bincount(data.values).min() >= 170


def test_digits_names_the_builtin_set_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """README: `digits` is the built-in set; `./digits` is the folder."""
    for label in (4, 5):
        (tmp_path / "digits" / str(label)).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (label * 40,) * 3).save(tmp_path / "digits" / str(label) / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    builtin = load_dataset("digits", (32, 32))
    assert len(builtin) == 1797 and sorted(set(builtin.values.tolist())) == list(range(10))
    folder = load_dataset("./digits", (32, 32))
    assert len(folder) == 4 and sorted(set(folder.values.tolist())) == [4, 5]


def test_from_arrays_accepts_grayscale_float_and_checks_shapes():
    gray = np.random.default_rng(0).uniform(0, 255, size=(4, 8, 8))
    data = from_arrays(gray, [1, 2, 1, 2], SIZE)
    assert data.images.shape == (4, 75, 75, 3) and data.images.dtype == np.uint8
    with pytest.raises(DataError, match="one label per image"):
        from_arrays(gray, [1, 2])
    with pytest.raises(DataError, match=r"C in 1, 3, 4.*shape=\(4, 8, 8, 2\)"):
        from_arrays(np.zeros((4, 8, 8, 2), np.uint8), [1, 2, 1, 2])
    with pytest.raises(DataError, match="0..255"):
        from_arrays(gray * 10, [1, 2, 1, 2])
    with pytest.raises(DataError, match=r"at least one image.*shape=\(0, 8, 8\)"):
        from_arrays(np.zeros((0, 8, 8)), np.zeros(0, np.int64))
    with pytest.raises(DataError, match="integers"):
        from_arrays(gray, [1.5, 2, 1, 2])


def test_stratified_split_is_reproducible(digits_dir):
    data = load_folder(digits_dir / "test", SIZE)
    a_train, a_val = split_stratified(data, 0.25, seed=3)
    b_train, b_val = split_stratified(data, 0.25, seed=3)
    assert a_val.sources == b_val.sources
    assert set(a_val.values.tolist()) == set(range(10))
    assert len(a_train) + len(a_val) == len(data)


# --- bad input --------------------------------------------------------------------------


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_folder(tmp_path / "nope", SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="it is empty"):
        load_folder(tmp_path / "empty", SIZE)
    (tmp_path / "noimages" / "3").mkdir(parents=True)
    (tmp_path / "noimages" / "3" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no JPEG/PNG/BMP/GIF images"):
        load_folder(tmp_path / "noimages", SIZE)


def test_non_integer_subfolder(digits_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_dir / "test" / "1", root / "1")
    shutil.copytree(digits_dir / "test" / "2", root / "two")
    with pytest.raises(DataError, match=r"integer.*'two'"):
        load_folder(root, SIZE)


def test_duplicate_label_folders(digits_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_dir / "test" / "3", root / "3")
    shutil.copytree(digits_dir / "test" / "3", root / "03")
    with pytest.raises(DataError, match="both mean label 3"):
        load_folder(root, SIZE)


def test_top_level_files_without_label_folders(digits_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_dir / "test" / "3", root)
    with pytest.raises(DataError, match=r"no label folders \(it holds 3\d file\(s\) but no subfolders\)"):
        load_folder(root, SIZE)


def test_empty_label_folder_is_reported_not_dropped(digits_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_dir / "test" / "1", root / "1")
    shutil.copytree(digits_dir / "test" / "2", root / "2")
    (root / "7").mkdir()
    data = load_folder(root, SIZE)
    assert data.all_labels == [1, 2, 7]
    with pytest.raises(DataError, match="label 7: 0"):
        data.check_classes(LabelMap.from_values(data.all_labels))


def test_class_with_fewer_than_two_images(digits_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_dir / "test" / "1", root / "1")
    (root / "5").mkdir()
    shutil.copy(next((digits_dir / "test" / "5").iterdir()), root / "5")
    data = load_folder(root, SIZE)
    with pytest.raises(DataError, match="label 5: 1"):
        data.check_classes(LabelMap.from_values(data.values))


def _corrupt_folder(digits_dir, tmp_path):
    root = tmp_path / "data"
    for label in ("1", "2"):
        shutil.copytree(digits_dir / "test" / label, root / label)
    (root / "1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "2" / "empty.jpg").write_bytes(b"")
    good = next((digits_dir / "test" / "2").iterdir()).read_bytes()
    (root / "2" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_corrupt_images_are_skipped_and_listed(digits_dir, tmp_path):
    root = _corrupt_folder(digits_dir, tmp_path)
    with pytest.warns(UserWarning, match="skipped 3 unreadable") as record:
        data = load_folder(root, SIZE)
    message = str(record[0].message)
    for name in ("corrupt.png", "empty.jpg", "truncated.png"):
        assert name in message
    assert sorted(s.rsplit("/", 1)[-1] for s, _ in data.skipped) == ["corrupt.png", "empty.jpg", "truncated.png"]
    assert not any(s.endswith(("corrupt.png", "empty.jpg", "truncated.png")) for s in data.sources)


def test_corrupt_images_fail_in_strict_mode(digits_dir, tmp_path):
    root = _corrupt_folder(digits_dir, tmp_path)
    with pytest.raises(ImageDecodeError, match="Received: .*(corrupt|empty|truncated)"):
        load_folder(root, SIZE, strict=True)


def test_all_images_unreadable(tmp_path):
    root = tmp_path / "data"
    (root / "0").mkdir(parents=True)
    (root / "0" / "a.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 1 image files"):
        load_folder(root, SIZE)


def test_imageset_subset_keeps_alignment():
    data = ImageSet(np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3),
                    np.array([5, 6, 7, 8]), ["a", "b", "c", "d"])
    sub = data.subset(np.array([3, 1]))
    assert sub.sources == ["d", "b"] and sub.values.tolist() == [8, 6]
    np.testing.assert_array_equal(sub.images[0], data.images[3])
