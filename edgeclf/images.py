"""Image decoding shared by training and the device runtime.

One decoder for both sides is what keeps training and serving from drifting apart: the
same EXIF orientation, colour conversion and resize filter are applied everywhere.
Needs only numpy and Pillow.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgeclf.errors import ImageDecodeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})

#: How pixels reach the model; recorded in bundle.json so every consumer can check it.
DECODE_SPEC = {
    "decoder": "Pillow",
    "exif_orientation": "applied",
    "color": "RGB (grayscale expanded; alpha composited over white)",
    "resize": "bilinear, to exactly height x width (aspect ratio not kept)",
    "dtype": "uint8",
}

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size}>"
    return str(source)


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as RGB: grayscale expanded, alpha composited over white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        # 16-bit (or 32-bit integer) grayscale: scale to 8 bits instead of clipping.
        values = np.asarray(img, dtype=np.float64)
        depth = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        img = Image.fromarray(np.rint(values * (255.0 / depth)).clip(0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: ImageSource, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image to a uint8 RGB array, resized to ``size`` = (height, width).

    Args:
        source: a file path, encoded bytes, or a PIL image.
        size: target (height, width); ``None`` keeps the decoded size.

    Returns:
        ``np.ndarray`` of shape (height, width, 3), dtype uint8.

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, not an image, or too
            large to decode safely (decompression bomb). The message names the input.
    """
    name = _describe(source)
    try:
        if isinstance(source, Image.Image):
            img = source
        else:
            if isinstance(source, (bytes, bytearray)):
                if not source:
                    raise ImageDecodeError("image buffer is empty (0 bytes). Received: <0 bytes>")
                fh = io.BytesIO(source)
            else:
                path = Path(source)
                if path.is_dir():
                    raise ImageDecodeError(f"expected an image file, got a directory. Received: {path}")
                if not path.is_file():
                    raise ImageDecodeError(f"image file not found. Received: {path}")
                if path.stat().st_size == 0:
                    raise ImageDecodeError(f"image file is empty (0 bytes). Received: {path}")
                fh = open(path, "rb")
            with fh:
                img = Image.open(fh)
                img.load()  # decode fully now: truncated files fail here, not later
        img = ImageOps.exif_transpose(img)
        if img.width == 0 or img.height == 0:
            raise ImageDecodeError(f"image has 0 pixels. Received: {name} size={img.size}")
        img = to_rgb(img)
        if size is not None and (img.height, img.width) != tuple(size):
            img = img.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image is too large to decode safely ({exc}). Received: {name}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a readable image (expected JPEG, PNG, BMP or GIF). Received: {name}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError/ValueError.
        raise ImageDecodeError(f"image is corrupt or truncated ({exc}). Received: {name}") from None
