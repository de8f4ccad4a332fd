"""What a Predictor accepts, turned into one uint8 NHWC batch at the model's size.

Accepted: file paths, encoded bytes, PIL images, and numpy arrays HWC or NHWC of RGB
pixels 0..255, alone or in a list. Files, bytes and PIL images go through the same
decoder as training (:func:`edgeclf.images.load_image`), within its pixel budget (checked
on the header, before decoding: ``max_pixels``, the Predictor's ``max_image_pixels``).
Arrays must be uint8, or an integer type holding values 0..255 (cast without loss); float
arrays are refused rather than guessed at: 0..1 and 0..255 conventions both exist, and a
wrong guess gives confident wrong answers, the train/serve skew edgeclf exists to prevent.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from edgeclf.errors import ImageDecodeError, InvalidInputError
from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS, load_image, resize_to


def is_batch(x: Any) -> bool:
    """Whether ``x`` is several inputs (a list/tuple, or a 4-D array) rather than one."""
    return isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.ndim == 4)


def describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"array dtype={x.dtype} shape={x.shape}"
    if isinstance(x, (bytes, bytearray)):
        return f"<{len(x)} bytes>"
    if isinstance(x, Image.Image):
        return f"<PIL image {x.mode} {x.size}>"
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    return f"<{type(x).__name__}>"


def _pixels(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` as uint8, refusing what cannot be converted without guessing."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        nan = " and holds NaN" if np.isnan(arr).any() else ""
        raise InvalidInputError(
            f"{name}: image array is {arr.dtype}{nan}; expected uint8 RGB pixels 0..255. Floats are not "
            f"guessed at (0..1 or 0..255?): convert with np.clip(x * 255, 0, 255).astype(np.uint8) for 0..1 "
            f"data, or x.astype(np.uint8) for 0..255. Received: dtype={arr.dtype} shape={arr.shape}"
        )
    if arr.dtype.kind in "iu":
        low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if low < 0 or high > 255:
            raise InvalidInputError(f"{name}: integer pixels must be 0..255. Received: dtype={arr.dtype} "
                                    f"values {low}..{high}")
        return arr.astype(np.uint8)
    raise InvalidInputError(f"{name}: image array must hold uint8 RGB pixels. Received: dtype={arr.dtype} "
                            f"shape={arr.shape}")


def _check_frame(arr: np.ndarray, name: str) -> None:
    if arr.ndim == 3 and arr.shape[-1] == 4:
        raise InvalidInputError(f"{name}: image array has 4 channels (RGBA, or a camera's 32-bit frame); expected "
                                f"HxWx3 RGB. Drop the fourth in your source's order: RGBA and picamera2's XBGR8888 "
                                f"frame[..., :3], OpenCV's BGRA and picamera2's XRGB8888 frame[..., 2::-1]. "
                                f"Received: shape={arr.shape}")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        channels = f"{arr.shape[-1]} channels" if arr.ndim == 3 else f"{arr.ndim} dimensions"
        raise InvalidInputError(f"{name}: image array has {channels}; expected HxWx3 RGB (or NxHxWx3). "
                                f"Received: shape={arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInputError(f"{name}: image has 0 pixels. Received: shape={arr.shape}")


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if frame.shape[:2] == size:
        return frame
    # The decoder's resize, so arrays and files give the same pixels.
    return np.asarray(resize_to(Image.fromarray(np.ascontiguousarray(frame)), size))


def image_frames(x: Any, size: tuple[int, int], name: str,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """One input as an NHWC uint8 array at ``size`` (N is 1 except for a 4-D array).

    ``max_pixels``: the pixel budget of a file, bytes or PIL image, checked on its header
    before it is decoded (arrays are already in memory).

    Raises:
        ImageDecodeError: a file or buffer that is missing, empty, truncated, not an image or
            over the pixel budget.
        InvalidInputError: an array of the wrong dtype, channels or size; another type.
    """
    if isinstance(x, np.ndarray):
        arr = _pixels(x, name)
        if arr.ndim == 2:
            raise InvalidInputError(f"{name}: image array has 2 dimensions (grayscale?); expected HxWx3 RGB: "
                                    f"np.repeat(x[..., None], 3, axis=-1) makes one. Received: shape={arr.shape}")
        frames = arr if arr.ndim == 4 else arr[np.newaxis]
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise InvalidInputError(f"{name}: expected an HxWx3 image or an NxHxWx3 batch with N >= 1. "
                                    f"Received: shape={x.shape}")
        _check_frame(frames[0], name)
        if frames.shape[1:3] == size:
            return np.ascontiguousarray(frames)
        return np.stack([_resize(f, size) for f in frames])
    if isinstance(x, (str, os.PathLike, bytes, bytearray, Image.Image)):
        try:
            return load_image(x, size, max_pixels)[np.newaxis]
        except ImageDecodeError:
            raise
        except Exception as exc:  # a PIL image in an odd mode, an unreadable path...
            raise ImageDecodeError(f"{name}: cannot decode ({exc}). Received: {describe(x)}") from None
    raise InvalidInputError(f"{name}: expected a file path, bytes, a PIL image or a uint8 numpy array. "
                            f"Received: {describe(x)}")


def to_batch(x: Any, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """One input or many as one uint8 NHWC batch at ``size``; an empty batch is an error."""
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    if not items or (isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[0] == 0):
        raise InvalidInputError(f"empty batch: nothing to predict. Received: {describe(x)}")
    frames = [image_frames(item, size, f"input {i}" if len(items) > 1 else "input", max_pixels)
              for i, item in enumerate(items)]
    return frames[0] if len(frames) == 1 else np.concatenate(frames)
