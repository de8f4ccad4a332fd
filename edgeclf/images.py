"""Image decoding shared by training and the device runtime.

One decoder for both sides is what keeps training and serving from drifting apart: the
same EXIF orientation, colour conversion and resize filter are applied everywhere.
Needs only numpy and Pillow.

Bounded before it allocates: ``Image.open`` reads only the header, so the declared size
is checked against a pixel budget (:data:`DEFAULT_MAX_IMAGE_PIXELS`) before any pixel is
decoded. Only the first frame of an animated GIF or APNG is decoded (Pillow's ``load``
decodes the current frame, and nothing here seeks), so a file's work is bounded by its
declared size whatever the number of frames.

Deeper than 8 bits: 16-bit images keep their high byte (``v >> 8``), which is what Pillow
itself does for 16-bit RGB, RGBA and grey+alpha PNG and TIFF files, so a 16-bit grey image
and the same image in 48-bit RGB give the same pixels; Pillow's ``convert("L")`` would
clip every 16-bit value above 255 to white instead. Float images are read as 0.0 = black,
1.0 = white (the convention of float image files) and refused outside 0..1, NaN included;
32-bit integer images are refused unless the file says its samples are 16-bit (PGM/PPM,
which Pillow scales to 0..65535, a 16-bit TIFF): their range is not known.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgeclf.errors import ImageDecodeError
from edgeclf import limits

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})

#: Pillow's own default limit (``Image.MAX_IMAGE_PIXELS`` = 1024**3 // 4 // 3 = 89,478,485 pixels),
#: where it only warns, up to twice that. The budget may be raised up to it, never past it.
PILLOW_LIMIT = int(limits.RANGES["image_pixels"].high)
#: The default pixel budget of one decoded image: 25 megapixels covers the largest frames an
#: edge camera sends (a 24 MP, 6000x4000, camera; 4K video is 8.3 MP; phones save 12 MP by
#: default) and keeps one decode near 200 MB (measured at 25 MP: RGBA PNG 207 MB, RGB 97 MB,
#: 16-bit grey 167 MB; Pillow holds RGB and RGBA at 4 bytes a pixel), so ``serve``'s 4
#: concurrent image decodes stay under 1 GB. Pillow's own limit allows 3.6 times as much: a
#: 344 KB PNG of 9400x9400 took 1.87 GB in ``predict``.
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000

#: A JPEG is decoded at the smallest DCT scale that keeps both its sides at least this many
#: times the target's longer side (DECODE_SPEC["jpeg_scale"]).
DRAFT_GAP = 2
#: The resize first box-reduces by whole factors while at least this many times the target is
#: left, then filters bilinearly (Pillow's ``reducing_gap``; DECODE_SPEC["reduce"]).
REDUCING_GAP = 3.0

#: Threads a large resize is shared across (:func:`resize_to`): one per core, at most 4.
RESIZE_THREADS = max(1, min(4, os.cpu_count() or 1))
#: Below this many source pixels one call is as fast as bands on threads (a 1000x750 drafted
#: JPEG gains 0.8 ms of 3.7; an 800x600 image nothing).
BAND_MIN_PIXELS = 500_000

#: How pixels reach the model; recorded in bundle.json so every consumer can check it.
DECODE_SPEC = {
    "decoder": "Pillow",
    "exif_orientation": "applied",
    "color": "RGB (grayscale expanded; alpha composited over white)",
    "depth": "16-bit samples keep their high byte (v >> 8); float samples 0..1 are scaled by 255 and rounded",
    "resize": "bilinear, to exactly height x width (aspect ratio not kept); across, then down, 8 bits between",
    # A camera's JPEG is 100 times the pixels a model takes: decoding it whole and filtering it
    # down cost 30 times the model (issue 36). libjpeg's reduced DCT scaling and an integer box
    # reduction do most of the shrinking at a fraction of the cost.
    "jpeg_scale": f"decoded at libjpeg's smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least "
                  f"{DRAFT_GAP}x the target's longer side",
    "reduce": f"box-reduced by whole factors first, to at least {REDUCING_GAP:g}x the target (Pillow reducing_gap)",
    "dtype": "uint8",
}

ImageSource = Union[str, os.PathLike, bytes, Image.Image]

_16_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
#: Pixels composited over white at a time (:func:`_over_white`).
_BAND_PIXELS = 1 << 20
#: Image.open runs Pillow's decompression-bomb check, which only warns between its limit and
#: twice it: the warning is made an error for the header read, one thread at a time (warning
#: filters are process-wide).
_OPEN_LOCK = threading.Lock()
_BAND_POOL: ThreadPoolExecutor | None = None
_BAND_POOL_LOCK = threading.Lock()


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size}>"
    return str(source)


def check_pixel_budget(size: tuple[int, int], max_pixels: int, name: str) -> None:
    """Refuse an image whose declared ``size`` (width, height) exceeds ``max_pixels``, before it decodes."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has 0 pixels. Received: {name} size={width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is too large to decode safely: {width}x{height} is {width * height:,} pixels, over the budget "
            f"of {max_pixels:,} (max_image_pixels, --max-image-pixels; at most {PILLOW_LIMIT:,}). Received: {name}")


def _open(fh) -> Image.Image:
    """``Image.open`` (the header only), Pillow's decompression-bomb warning raised as an error."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(fh)


def _sixteen_bit_int(img: Image.Image) -> bool:
    """Whether a mode "I" (32-bit integer) image holds 16-bit samples, as its file says."""
    if img.format in ("PPM", "PNG"):  # Pillow scales PGM/PPM to 0..65535; older Pillows opened 16-bit PNG as "I"
        return True
    if img.format == "TIFF":
        bits = getattr(img, "tag_v2", {}).get(258)  # BitsPerSample
        return (bits if isinstance(bits, tuple) else (bits,)) == (16,)
    return False


def _pixel_range(values: np.ndarray) -> str:
    return f"{values.min():g}..{values.max():g}" if values.size else "none"


def to_8_bit(img: Image.Image, name: str = "image", int_is_16_bit: bool | None = None) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit "L"; others unchanged.

    ``int_is_16_bit``: whether a mode "I" image's file declared 16-bit samples (default: asked
    of ``img``, which knows its file format only until it is copied or transposed).

    Raises:
        ImageDecodeError: float samples outside 0..1 (or NaN), 32-bit integers whose range the
            file does not state, or 16-bit-declared samples outside 0..65535.
    """
    mode = img.mode
    if mode in _16_BIT_MODES:
        little = np.asarray(img).astype("<u2", copy=False)  # a copy only for big-endian samples
        return Image.fromarray(np.ascontiguousarray(little.view(np.uint8)[:, 1::2]))  # the high bytes: v >> 8
    if mode == "I":
        values = np.asarray(img)
        if not (_sixteen_bit_int(img) if int_is_16_bit is None else int_is_16_bit):
            raise ImageDecodeError(
                f"image has 32-bit integer pixels ({_pixel_range(values)}) and its file does not say their range "
                f"(8, 12, 16 or 32 bits?); expected 8- or 16-bit samples: save it as an 8- or 16-bit image. "
                f"Received: {name} mode=I format={img.format}")
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageDecodeError(f"image declares 16-bit samples but holds values {_pixel_range(values)}; "
                                   f"expected 0..65535. Received: {name} mode=I format={img.format}")
        return Image.fromarray((values >> 8).astype(np.uint8))
    if mode == "F":
        values = np.asarray(img, dtype=np.float32)
        finite = bool(np.isfinite(values).all())
        if not finite or (values.size and (values.min() < 0.0 or values.max() > 1.0)):
            shown = "NaN or infinite values" if not finite else f"values {_pixel_range(values)}"
            raise ImageDecodeError(
                f"image has float pixels with {shown}; expected 0..1 (0 black, 1 white): floats outside it are "
                f"not guessed at (0..255? HDR?); save it as an 8- or 16-bit image. Received: {name} mode=F")
        scaled = values * np.float32(255.0)
        return Image.fromarray(np.rint(scaled, out=scaled).astype(np.uint8))
    return img


def to_rgb(img: Image.Image, name: str = "image", int_is_16_bit: bool | None = None) -> Image.Image:
    """Return ``img`` as RGB: grayscale expanded, alpha composited over white, deeper samples
    brought to 8 bits (:func:`to_8_bit`)."""
    if img.mode == "RGB":
        return img
    img = to_8_bit(img, name, int_is_16_bit)
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        return _over_white(img)
    return img.convert("RGB")


def _over_white(img: Image.Image) -> Image.Image:
    """``img`` (with alpha, or a palette with a transparent colour) composited over white, as RGB.

    Band by band: compositing is per pixel, so the result is the same as in one piece, while
    the whole image is never copied as RGBA three times over (476 MB at 25 megapixels; 210 here).
    """
    out = Image.new("RGB", img.size)
    rows = max(1, _BAND_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        box = (0, top, img.width, min(img.height, top + rows))
        band = img.crop(box)
        if band.mode == "La":
            band = band.convert("LA")
        if band.mode != "RGBA":
            band = band.convert("RGBA")
        white = Image.new("RGBA", band.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, band).convert("RGB"), box[:2])
    return out


def resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` resized to ``size`` = (height, width) the one way training and the device share:
    whole-factor box reduction down to REDUCING_GAP times the target (Pillow's ``reducing_gap``
    rule), then bilinear filtering across, then down, with 8 bits kept between the passes.

    The passes are made here, one by one, rather than left to ``Image.resize``: Pillow 13 began
    filtering down first where that is cheaper, which moves some pixels by one level from what
    Pillow 10 to 12 give, and training and the device may have different Pillows. The order of
    Pillow 10 to 12 is kept, so their one call gives the same pixels, as does Pillow 13's
    wherever it filters across first (every camera frame and picture bench makes).

    The reduction and the pass across go row by row, so a large image goes through them in
    bands of rows on threads (:data:`RESIZE_THREADS`): a 1080p frame to 299 px takes 4.8 ms
    instead of 7.4 on two cores (AMD EPYC Zen 5), with the same pixels.
    """
    if (img.height, img.width) == tuple(size):
        return img
    width, height = int(size[1]), int(size[0])
    if img.mode not in ("RGB", "L"):  # alpha is premultiplied by Pillow's one call: left to it
        return img.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    factor_x = int(img.width / width / REDUCING_GAP) or 1
    factor_y = int(img.height / height / REDUCING_GAP) or 1
    box_w, box_h = img.width / factor_x, img.height / factor_y  # the reduced image's exact extent

    def across(top: int, bottom: int) -> Image.Image:
        band = img if (top, bottom) == (0, img.height) else img.crop((0, top, img.width, bottom))
        if factor_x > 1 or factor_y > 1:
            band = band.reduce((factor_x, factor_y))  # whole groups of factor_y rows per band
        return band.resize((width, band.height), Image.Resampling.BILINEAR, box=(0, 0, box_w, band.height))

    groups = -(-img.height // factor_y)  # rows of the reduced image
    bands = min(RESIZE_THREADS, groups) if img.width * img.height >= BAND_MIN_PIXELS else 1
    edges = [factor_y * (groups * i // bands) for i in range(bands)] + [img.height]
    if bands == 1:
        rows = across(0, img.height)
    else:
        rows = Image.new(img.mode, (width, groups))
        for top, part in zip(edges[:-1], _band_pool().map(across, edges[:-1], edges[1:]), strict=True):
            rows.paste(part, (0, top // factor_y))
    return rows.resize((width, height), Image.Resampling.BILINEAR, box=(0, 0, width, box_h))


def _band_pool() -> ThreadPoolExecutor:
    """The threads :func:`resize_to` shares, made on first use (a band never waits on
    another, so callers on any thread, decode threads included, cannot deadlock on it)."""
    global _BAND_POOL
    with _BAND_POOL_LOCK:
        if _BAND_POOL is None:
            _BAND_POOL = ThreadPoolExecutor(max_workers=RESIZE_THREADS, thread_name_prefix="edgeclf-resize")
        return _BAND_POOL


def _draft(img: Image.Image, size: tuple[int, int]) -> None:
    """Ask libjpeg to decode ``img`` (opened, not loaded) at a reduced DCT scale, no smaller than
    DRAFT_GAP times the target's longer side on either side (whatever the EXIF orientation)."""
    if img.format == "JPEG":
        side = DRAFT_GAP * max(size)
        img.draft(None, (side, side))


def load_image(source: ImageSource, size: tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image to a uint8 RGB array, resized to ``size`` = (height, width).

    The two steps, :func:`decode_image` and :func:`resize_to`, are timed apart by ``bench``.
    Errors are those of :func:`decode_image`.
    """
    img = decode_image(source, size, max_pixels)
    try:
        return np.asarray(img if size is None else resize_to(img, size), dtype=np.uint8)
    except MemoryError:
        raise ImageDecodeError(f"image is too large to resize in the memory left. Received: {_describe(source)}") \
            from None


def decode_image(source: ImageSource, size: tuple[int, int] | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image to an RGB PIL image, a JPEG at the reduced scale ``size`` allows.

    Args:
        source: a file path, encoded bytes, or a PIL image.
        size: the target (height, width) it will be resized to, if any: a JPEG is then decoded
            at libjpeg's reduced DCT scale (DECODE_SPEC["jpeg_scale"]).
        max_pixels: the pixel budget: an image declaring more (width x height, read from its
            header) is refused before any pixel is decoded.

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, not an image, over the pixel
            budget (or Pillow's decompression-bomb limit), or of a depth that cannot be brought
            to 8 bits without guessing. The message names the input.
    """
    name = _describe(source)
    try:
        if isinstance(source, Image.Image):
            check_pixel_budget(source.size, max_pixels, name)
            int_is_16_bit = _sixteen_bit_int(source)
            img = ImageOps.exif_transpose(source)  # a copy: the caller's image is left as it was
        else:
            if isinstance(source, (bytes, bytearray)):
                if not source:
                    raise ImageDecodeError("image buffer is empty (0 bytes). Received: <0 bytes>")
                fh = io.BytesIO(source)
            else:
                path = Path(source)
                if path.is_dir():
                    raise ImageDecodeError(f"expected an image file, got a directory. Received: {path}")
                if not path.exists():
                    raise ImageDecodeError(f"image file not found. Received: {path}")
                if not path.is_file():  # a FIFO would block the read; a device never ends
                    raise ImageDecodeError(f"expected a regular image file, not a FIFO or device. Received: {path}")
                if path.stat().st_size == 0:
                    raise ImageDecodeError(f"image file is empty (0 bytes). Received: {path}")
                fh = open(path, "rb")
            with fh:
                img = _open(fh)  # the header only: nothing decoded yet
                check_pixel_budget(img.size, max_pixels, name)
                if size is not None:
                    _draft(img, size)
                img.load()  # the first frame, fully now: truncated files fail here, not later
            int_is_16_bit = _sixteen_bit_int(img)  # before the transpose, which forgets the file format
            ImageOps.exif_transpose(img, in_place=True)  # no copy of the pixels when there is nothing to turn
        return to_rgb(img, name, int_is_16_bit)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image is too large to decode safely ({exc}). Received: {name}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a readable image (expected JPEG, PNG, BMP or GIF). Received: {name}"
        ) from None
    except MemoryError:
        raise ImageDecodeError(f"image is too large to decode in the memory left. Received: {name}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError.
        raise ImageDecodeError(f"image is corrupt or truncated ({exc}). Received: {name}") from None
