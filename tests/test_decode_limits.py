"""Every decode is bounded before it allocates: images, deeper-than-8-bit images, the verification set.

Hostile files are built at test time (no binary blobs): a 344 KB PNG declaring 9400x9400, GIFs
whose first frame outgrows their screen, real 16-bit PNG and TIFF files written by Pillow (and a
48-bit PNG written by hand, which Pillow cannot write), .npy headers whose shape overflows int64,
and a 2 MB verification.npz that decompresses to 2 GiB. All but the last test need no model.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeclf.bundle import Bundle
from edgeclf.errors import BundleError, ImageDecodeError, InvalidInputError
from edgeclf import limits
from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS, PILLOW_LIMIT, load_image
from edgeclf.verification import (MAX_VERIFICATION_BYTES, VerificationSet, check_verification_size,
                                  load_verification_set, write_verification_set)
from tests.conftest import HANG_S, run_cli

# -- hand-made image files -----------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows) -> bytes:
    """A PNG of ``rows`` (bytes of one row each, filter byte added here), compressed as a stream:
    a 9400x9400 RGBA image of zeros is built without ever holding its 353 MB."""
    compressor, parts = zlib.compressobj(6), []
    for row in rows:
        parts.append(compressor.compress(b"\0" + row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


def _bomb_png() -> bytes:
    """The issue's case: 9400x9400 RGBA, 344 KB on disk, 353 MB of pixels (Pillow took 1.87 GB)."""
    row = bytes(9400 * 4)
    return _png(9400, 9400, 8, 6, (row for _ in range(9400)))


def _gif(screen: tuple[int, int], frames: list[tuple[tuple[int, int], int]]) -> bytes:
    """A GIF of ``frames`` ((width, height), palette index) on a 2-colour (red, blue) screen, each
    frame one colour (LZW: clear code, then the index repeated by the decoder's own run)."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\xff\x00\x00\x00\x00\xff"
    out += b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop: an animation
    for (width, height), index in frames:
        out += b"!\xf9\x04\x00\x0a\x00\x00\x00"  # 0.1 s a frame
        out += b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
        out += _lzw_fill(index, width * height)
    return out + b";"


def _lzw_fill(index: int, count: int) -> bytes:
    """GIF LZW data (2-bit colours) for ``count`` pixels of palette ``index``, written plainly:
    a clear code before every code keeps the code width at 3 bits."""
    clear, end, bits, nbits = 4, 5, 0, 0
    out = bytearray()
    for code in [c for _ in range(count) for c in (clear, index)] + [end]:
        bits |= code << nbits
        nbits += 3
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8
    if nbits:
        out.append(bits)
    blocks = b"".join(bytes([len(out[i:i + 255])]) + out[i:i + 255] for i in range(0, len(out), 255))
    return b"\x02" + blocks + b"\x00"


# -- pixel budget ---------------------------------------------------------------------------------------

_PEAK = """
import resource, sys
from edgeclf.errors import ImageDecodeError
from edgeclf.images import load_image
load_image(sys.argv[2], (32, 32))  # warm: Pillow's PNG plugin and numpy's code are loaded
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_image(sys.argv[1], (32, 32))
except ImageDecodeError as exc:
    print(exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_344_kb_png_declaring_9400x9400_is_refused_before_it_allocates(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png())
    assert bomb.stat().st_size < 400_000
    with Image.open(bomb) as img:  # a real image Pillow would decode (its limit is 89 M pixels)
        assert img.size == (9400, 9400) and img.mode == "RGBA"
    # In a fresh process: the peak resident memory does not move (decoded, it is 353 MB at least).
    out = subprocess.run([sys.executable, "-c", _PEAK, str(bomb), str(_small_png(tmp_path))], capture_output=True,
                         text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr
    message, grown_kb = out.stdout.strip().splitlines()
    assert message == (f"image is too large to decode safely: 9400x9400 is 88,360,000 pixels, over the budget of "
                       f"25,000,000 (max_image_pixels, --max-image-pixels; at most 89,478,485). Received: {bomb}")
    assert int(grown_kb) < 32 * 1024, f"peak RSS grew by {int(grown_kb) / 1024:.0f} MB"


def _small_png(tmp_path: Path) -> Path:
    path = tmp_path / "small.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(path)
    return path


def test_the_pixel_budget_is_an_option_with_a_range(tmp_path):
    small = _small_png(tmp_path)  # 40x40 = 1,600 pixels
    assert load_image(small, max_pixels=1600).shape == (40, 40, 3)
    with pytest.raises(ImageDecodeError, match=r"40x40 is 1,600 pixels, over the budget of 1,599"):
        load_image(small.read_bytes(), max_pixels=1599)
    with pytest.raises(ImageDecodeError, match="over the budget"):  # a PIL image is held to it too
        load_image(Image.open(small), max_pixels=100)
    assert DEFAULT_MAX_IMAGE_PIXELS < PILLOW_LIMIT == 89_478_485
    for bad in (0, -1, PILLOW_LIMIT + 1, 1.5, float("nan"), True):
        with pytest.raises(InvalidInputError, match="max_image_pixels must be an integer >= 1"):
            limits.check("image_pixels", bad, "max_image_pixels")
    from edgeclf.runtime import Predictor

    with pytest.raises(InvalidInputError, match="max_image_pixels"):  # before anything is loaded
        Predictor.load(tmp_path / "no-such-bundle", max_image_pixels=0)
    out = run_cli("predict", str(tmp_path / "no-such-bundle"), str(small), "--max-image-pixels", "1e9")
    assert out.returncode == 2 and "--max-image-pixels" in out.stderr and "Traceback" not in out.stderr


def test_pillows_decompression_bomb_warning_and_error_become_the_typed_error(tmp_path, monkeypatch):
    small = _small_png(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: Pillow only warns; 2,500: it raises
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(big)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in (small, big):
            with pytest.raises(ImageDecodeError, match=r"too large to decode safely \(Image size .* could be "
                                                       r"decompression bomb"):
                load_image(path, max_pixels=10_000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters  # the process's warning filters are as they were


def test_only_the_first_frame_of_an_animation_is_decoded(tmp_path):
    animated = _gif((4, 4), [((4, 4), 0), ((4, 4), 1)])  # red, then blue
    with Image.open(io.BytesIO(animated)) as img:
        assert img.n_frames == 2
    assert load_image(animated).reshape(-1, 3).tolist() == [[255, 0, 0]] * 16
    # A first frame larger than its screen enlarges the image (Pillow): the budget sees the real size.
    outgrown = _gif((2, 2), [((300, 300), 1)])
    with pytest.raises(ImageDecodeError, match=r"300x300 is 90,000 pixels, over the budget of 10,000"):
        load_image(outgrown, max_pixels=10_000)
    assert load_image(outgrown, (8, 8), max_pixels=90_000).reshape(-1, 3).tolist() == [[0, 0, 255]] * 64


# -- deeper than 8 bits ---------------------------------------------------------------------------------

#: 16-bit samples and their 8-bit values by hand: the high byte (v >> 8), as Pillow itself gives for
#: 16-bit RGB files; Pillow's convert("L") would give 0, 255, 255, 255, ... (clipped at 255).
SIXTEEN = [0, 255, 256, 257, 1000, 4095, 32767, 32768, 65279, 65280, 65535]
SIXTEEN_AS_8 = [0, 0, 1, 1, 3, 15, 127, 128, 254, 255, 255]


def _file(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["png I;16", "tiff I;16", "tiff I;16B", "png 48-bit RGB", "png 16-bit grey+alpha",
                                  "pgm 16-bit"])
def test_16_bit_files_keep_their_high_byte(kind):
    values = np.array([SIXTEEN], np.uint16)
    if kind == "png I;16":
        data = _file(Image.fromarray(values), "PNG")
    elif kind == "tiff I;16":
        data = _file(Image.fromarray(values), "TIFF")
    elif kind == "tiff I;16B":
        data = _file(Image.fromarray(values.astype(">u2")), "TIFF")
    elif kind == "png 48-bit RGB":  # grey in three channels: the same pixels as the grey file
        data = _png(len(SIXTEEN), 1, 16, 2, [np.repeat(values[0], 3).astype(">u2").tobytes()])
    elif kind == "png 16-bit grey+alpha":
        opaque = np.stack([values[0], np.full_like(values[0], 65535)], axis=-1).astype(">u2")
        data = _png(len(SIXTEEN), 1, 16, 4, [opaque.tobytes()])
    else:
        data = b"P5\n%d 1\n65535\n" % len(SIXTEEN) + values.astype(">u2").tobytes()
    with Image.open(io.BytesIO(data)) as img:  # really a 16-bit file, as read back
        img.load()
        expected_mode = {"png I;16": "I;16", "tiff I;16": "I;16", "tiff I;16B": "I;16B", "pgm 16-bit": "I"}
        if kind in expected_mode:
            assert img.mode == expected_mode[kind]
            assert np.asarray(img).tolist() == [SIXTEEN]
    decoded = load_image(data)
    assert decoded.shape == (1, len(SIXTEEN), 3)
    assert decoded[..., 0].tolist() == decoded[..., 2].tolist() == [SIXTEEN_AS_8]
    if kind == "png I;16":  # what the conversion replaces: Pillow's own clips every value above 255
        with Image.open(io.BytesIO(data)) as img:
            assert np.asarray(img.convert("L")).tolist() == [[min(v, 255) for v in SIXTEEN]]


def test_float_images_are_scaled_from_0_1_or_refused_with_the_reason():
    values = np.array([[0.0, 0.25, 0.5, 0.75, 1.0, 0.001, 0.999]], np.float32)
    data = _file(Image.fromarray(values), "TIFF")
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "F"
    assert load_image(data)[..., 1].tolist() == [np.rint(values[0] * 255).astype(int).tolist()]
    assert load_image(data)[..., 1].tolist() == [[0, 64, 128, 191, 255, 0, 255]]
    for bad, reason in ((np.array([[0.0, 2.0]], np.float32), r"values 0\.\.2; expected 0\.\.1"),
                        (np.array([[0.0, 255.0]], np.float32), r"values 0\.\.255; expected 0\.\.1"),
                        (np.array([[-0.5, 0.5]], np.float32), r"values -0\.5\.\.0\.5"),
                        (np.array([[np.nan, 0.5]], np.float32), "NaN or infinite")):
        with pytest.raises(ImageDecodeError, match=reason) as info:
            load_image(_file(Image.fromarray(bad), "TIFF"))
        assert "Received: <" in str(info.value) and "\n" not in str(info.value)


def test_32_bit_integer_images_of_unknown_range_are_refused():
    data = _file(Image.fromarray(np.array([[0, 70000, 3]], np.int32)), "TIFF")
    with pytest.raises(ImageDecodeError, match=r"32-bit integer pixels \(0\.\.70000\).*does not say their range"):
        load_image(data)
    with pytest.raises(ImageDecodeError, match="32-bit integer pixels"):
        load_image(Image.fromarray(np.array([[0, 100]], np.int32)))  # a PIL image says nothing either


# -- the verification set --------------------------------------------------------------------------------

N, SIDE, LABELS = 5, 8, [-2, 3, 10]


@pytest.fixture
def small_bundle(tmp_path) -> Path:
    """A bundle without a model (none is needed to read a verification set) holding a real one,
    written by export's own writer: 5 images of 8x8, 3 classes."""
    path = tmp_path / "bundle"
    path.mkdir()
    meta = {"format": "edgeclf-bundle/1", "labels": LABELS, "backbone": "mobilenet_v3_small",
            "input": {"height": SIDE, "width": SIDE, "channels": 3}, "preprocessing": {}}
    (path / "bundle.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    reference = VerificationSet(rng.integers(0, 256, (N, SIDE, SIDE, 3), dtype=np.uint8),
                                np.array([-2, 3, 10, 3, -2]), rng.normal(size=(N, 3)).astype(np.float32))
    write_verification_set(path, reference, {"from": "test"})
    return path


def _npy_header(shape: tuple, descr: str) -> bytes:
    """A version 1.0 .npy header, as numpy writes it, for any shape (an overflowing one too)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode() + b" "
    text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _zeros_deflated(prefix: bytes, zeros: int) -> tuple[bytes, int]:
    """(raw deflate stream, CRC-32) of ``prefix`` and ``zeros`` zero bytes, made in milliseconds: after
    a full flush the compressor starts afresh, so the block of 1 MiB of zeros is the same every time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    mib, (full, rest) = 1 << 20, divmod(zeros, 1 << 20)
    block = compressor.compress(bytes(mib)) + compressor.flush(zlib.Z_FULL_FLUSH) if full else b""
    tail = compressor.compress(bytes(rest)) + compressor.flush(zlib.Z_FINISH)
    crc, chunk = zlib.crc32(prefix), bytes(mib)
    for _ in range(full):
        crc = zlib.crc32(chunk, crc)
    return head + block * full + tail, zlib.crc32(bytes(rest), crc)


def _zip(members: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip of already-deflated members (name, stream, crc, uncompressed size), as zipfile reads it."""
    local, central = b"", b""
    for name, stream, crc, size in members:
        fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0x21, crc, len(stream), size)
        central += (b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0,
                                                                               len(local)) + name.encode())
        local += b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name.encode() + stream
    count = len(members)
    return local + central + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, count, count, len(central), len(local), 0)


def _member(name: str, shape: tuple, descr: str, data: bytes | int = b"") -> tuple[str, bytes, int, int]:
    """A member holding ``shape``'s header and ``data`` (or that many zero bytes)."""
    header = _npy_header(shape, descr)
    if isinstance(data, int):
        stream, crc = _zeros_deflated(header, data)
        return name, stream, crc, len(header) + data
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return name, compressor.compress(header + data) + compressor.flush(), zlib.crc32(header + data), \
        len(header) + len(data)


def _forge(bundle: Path, data: bytes, images: int | None = None) -> None:
    """Replace verification.npz as a hostile user with write access would: bundle.json's record
    (sha256, size, image count) updated to match, so only the contents can give it away."""
    (bundle / "verification.npz").write_bytes(data)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["verification_set"].update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    if images is not None:
        meta["verification_set"]["images"] = images
    (bundle / "bundle.json").write_text(json.dumps(meta))


def _good(n: int = N) -> list[tuple[str, bytes, int, int]]:
    rng = np.random.default_rng(1)
    return [_member("pixels.npy", (n, SIDE, SIDE, 3), "|u1", rng.integers(0, 256, n * SIDE * SIDE * 3,
                                                                            dtype=np.uint8).tobytes()),
            _member("labels.npy", (n,), "<i8", np.resize(np.array(LABELS, np.int64), n).tobytes()),
            _member("logits.npy", (n, 3), "<f4", rng.normal(size=n * 3).astype(np.float32).tobytes())]


def _refused(bundle: Path, match: str) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=match) as info:
            load_verification_set(Bundle.load(bundle))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MB allocated before refusing"
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_real_verification_set_reads_back(small_bundle):
    loaded = load_verification_set(Bundle.load(small_bundle))
    assert len(loaded) == N and loaded.images.shape == (N, SIDE, SIDE, 3) and loaded.logits.dtype == np.float32
    _forge(small_bundle, _zip(_good()))  # a set made by hand the way numpy writes one reads too
    assert load_verification_set(Bundle.load(small_bundle)).values.tolist() == [-2, 3, 10, -2, 3]


def test_an_npy_header_whose_shape_overflows_int64_is_one_typed_line(small_bundle):
    # The hostile case that gave numpy's _ArrayMemoryError for 6.74 EiB.
    huge = (2**40, 2**40, SIDE, 3)
    members = _good()
    members[0] = _member("pixels.npy", huge, "|u1")
    _forge(small_bundle, _zip(members))
    message = _refused(small_bundle, rf"member pixels.npy's header declares uint8 \[1099511627776, 1099511627776, 8, "
                                     rf"3\], {math.prod(huge):,} bytes of data, but the zip declares 0:")
    # A negative size in the header, or one the zip agrees with but the model does not take.
    members[0] = _member("pixels.npy", (-N, SIDE, SIDE, 3), "|u1")
    _forge(small_bundle, _zip(members))
    _refused(small_bundle, "declares a negative shape")
    assert "Received:" in message


@pytest.mark.parametrize("case", ["pixels float32", "labels float", "logits int", "pixels of another size",
                                  "4 channels", "fewer labels", "logits for 2 classes", "object dtype"])
def test_wrong_dtypes_and_shapes_are_refused_from_the_headers(small_bundle, case):
    members = _good()
    pixels = (N, SIDE, SIDE, 3)
    change = {
        "pixels float32": (0, _member("pixels.npy", pixels, "<f4", bytes(4 * int(np.prod(pixels))))),
        "labels float": (1, _member("labels.npy", (N,), "<f8", bytes(8 * N))),
        "logits int": (2, _member("logits.npy", (N, 3), "<i4", bytes(12 * N))),
        "pixels of another size": (0, _member("pixels.npy", (N, 16, 16, 3), "|u1", bytes(N * 16 * 16 * 3))),
        "4 channels": (0, _member("pixels.npy", (N, SIDE, SIDE, 4), "|u1", bytes(N * SIDE * SIDE * 4))),
        "fewer labels": (1, _member("labels.npy", (N - 1,), "<i8", bytes(8 * (N - 1)))),
        "logits for 2 classes": (2, _member("logits.npy", (N, 2), "<f4", bytes(8 * N))),
        "object dtype": (1, _member("labels.npy", (N,), "|O", bytes(8 * N))),
    }[case]
    members[change[0]] = change[1]
    _forge(small_bundle, _zip(members))
    _refused(small_bundle, r"does not fit this model: expected pixels uint8 \[N, 8, 8, 3\], labels int \[N\] and "
                           r"logits float32 \[N, 3\]|header declares object")


def test_members_are_exactly_pixels_labels_and_logits(small_bundle):
    good = _good()
    for members, match in ((good[:2], "must hold exactly"), (good + [_member("evil.npy", (1,), "<i8", bytes(8))],
                                                             "must hold exactly"),
                           (good + [good[0]], "must hold exactly")):
        _forge(small_bundle, _zip(members))
        _refused(small_bundle, match)
    # Not the image count bundle.json records (both written together by export).
    _forge(small_bundle, _zip(_good(n=N + 1)), images=N)
    _refused(small_bundle, "holds 6 images, but bundle.json records 5")
    # A zip entry compressed with another method (bzip2 here) is not one numpy writes.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_BZIP2) as archive:
        for name, *_ in good:
            archive.writestr(name, b"x")
    _forge(small_bundle, buffer.getvalue())
    _refused(small_bundle, "compressed with method 12")


def test_non_finite_logits_and_a_member_shorter_than_declared_are_refused(small_bundle):
    members = _good()
    members[2] = _member("logits.npy", (N, 3), "<f4", np.full(N * 3, np.nan, np.float32).tobytes())
    _forge(small_bundle, _zip(members))
    _refused(small_bundle, "NaN or infinite")
    name, stream, crc, size = _good()[0]
    members = _good()
    members[0] = (name, stream[: len(stream) // 2], crc, size)  # the data cut short, its sizes left as declared
    _forge(small_bundle, _zip(members))
    _refused(small_bundle, "cannot read the verification set")


def test_a_2_mb_verification_set_that_decompresses_to_2_gib_is_refused_before_decompressing(small_bundle):
    n = (2 << 30) // (SIDE * SIDE * 3)  # 2 GiB of pixels, consistent in every member and in bundle.json
    members = [_member("pixels.npy", (n, SIDE, SIDE, 3), "|u1", n * SIDE * SIDE * 3),
               _member("labels.npy", (n,), "<i8", 8 * n), _member("logits.npy", (n, 3), "<f4", 12 * n)]
    data = _zip(members)
    assert len(data) < 3 << 20
    _forge(small_bundle, data, images=n)
    declared = sum(size for *_, size in members)
    assert declared > 2 << 30
    with zipfile.ZipFile(small_bundle / "verification.npz") as archive:  # a real zip, and what it declares
        assert sum(info.file_size for info in archive.infolist()) == declared
    message = _refused(small_bundle, rf"declares {declared:,} bytes once decompressed, over the verification "
                                     rf"set's budget of 1,073,741,824 bytes")
    assert "refused before decompressing" in message
    # The writer holds sets to the same budget, so export never writes one verify refuses.
    with pytest.raises(InvalidInputError, match="keep at most 4002 images"):
        check_verification_size(5000, 299, 299, 10)
    check_verification_size(2000, 299, 299, 10)  # the default count at InceptionV3's usual size fits
    assert MAX_VERIFICATION_BYTES == 1 << 30


def test_predict_refuses_the_bomb_in_one_line_and_predicts_the_rest(tiny_exported, tmp_path):
    bundle, _ = tiny_exported
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png())
    good = _small_png(tmp_path)
    out = run_cli("predict", str(bundle.path), str(bomb), str(good), "--backend", "onnx")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bomb}: image is too large to decode safely: 9400x9400 is 88,360,000 pixels, over the "
                      f"budget of 25,000,000 (max_image_pixels, --max-image-pixels; at most 89,478,485). "
                      f"Received: {bomb}"]
    assert out.stdout.startswith(f"{good}\t")
    low = run_cli("predict", str(bundle.path), str(good), "--backend", "onnx", "--max-image-pixels", "1000")
    assert low.returncode == 1 and "40x40 is 1,600 pixels, over the budget of 1,000" in low.stderr


def test_serves_image_model_decodes_within_the_predictors_budget(tmp_path):
    """``serve --max-image-pixels`` reaches NAME_image's decoder through the Predictor (no Triton
    needed to see it: the refusal comes before the pixels would be sent on)."""
    from types import SimpleNamespace

    from edgeclf.serve.server import ServeOptions, _Models

    assert ServeOptions().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    predictor = SimpleNamespace(image_size=(32, 32), max_image_pixels=1000)
    models = _Models(predictor, "edgeclf", "127.0.0.1:1")
    request = np.array([[_small_png(tmp_path).read_bytes()]], dtype=np.object_)
    with pytest.raises(ImageDecodeError, match=r"40x40 is 1,600 pixels, over the budget of 1,000"):
        models.image(request)
    predictor.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match=r"9400x9400 is 88,360,000 pixels, over the budget of 25,000,000"):
        models.image(np.array([[_bomb_png()]], dtype=np.object_))
