"""The range of every number edgeclf takes from a user, and the one check they all pass.

Options, config keys and the library's dataclasses check their numbers here, so
``--duration nan``, ``--threads 0`` or ``lr-frozen = inf`` are refused where they are
parsed, with the range in the message. NaN fails every comparison, so a plain
``value > 0`` lets it through: :meth:`Range.check` asks for a finite number first.

Batch sizes are also weighed against memory (:func:`check_batch_memory`): a batch the
machine cannot hold is refused with the estimate and the limit, before it allocates.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Callable

from edgeclf.errors import InvalidInputError


@dataclass(frozen=True)
class Range:
    """Finite numbers from ``low`` to ``high`` (``low`` excluded when ``low_open``)."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False
    unit: str = ""

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low = f"> {_number(self.low)}" if self.low_open else f">= {_number(self.low)}"
        return f"{kind} {low} and <= {_number(self.high)}{' ' + self.unit if self.unit else ''}"

    def check(self, value: object, name: str) -> int | float:
        """``value`` if it is in range, else an InvalidInputError naming ``name`` and the range."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and self.integer and not isinstance(value, int):
            ok = False
        if ok:
            ok = math.isfinite(value) and (value > self.low if self.low_open else value >= self.low) \
                and value <= self.high
        if not ok:
            raise InvalidInputError(f"{name} must be {self.describe()}. Received: {value!r}")
        return value

    def parse(self, text: str, name: str) -> int | float:
        """``text`` (an option's value) as a number in range."""
        try:
            value: int | float = int(text) if self.integer else float(text)
        except (TypeError, ValueError):
            raise InvalidInputError(f"{name} must be {self.describe()}. Received: {text!r}") from None
        return self.check(value, name)


def _number(value: float) -> str:
    """89478485, not 8.94785e+07; 0.95 and 1e-05 as they are."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


#: Sane bounds: far beyond any real use, small enough that nothing runs for days or
#: allocates past a machine's memory before a finer check (memory, layer count) applies.
RANGES: dict[str, Range] = {
    # train
    "epochs": Range(0, 10_000, integer=True),
    "train_batch": Range(1, 4096, integer=True),
    "learning_rate": Range(0, 10, low_open=True),
    "ordinal_alpha": Range(0, 100, low_open=True),
    "patience": Range(0, 10_000, integer=True),
    "val_split": Range(0, 0.95, low_open=True),
    "seed": Range(0, 2**32 - 1, integer=True),
    "layer_index": Range(0, 100_000, integer=True),
    "peer_timeout": Range(0, 86_400, low_open=True, unit="seconds"),
    # inference: bench, predict, serve
    "batch": Range(1, 65_536, integer=True),
    "duration": Range(0, 3600, low_open=True, unit="seconds"),
    "warmup": Range(0, 600, unit="seconds"),
    "threads": Range(1, 1024, integer=True),
    # each decodes one image at a time, up to ~200 MB at the default pixel budget
    "decode_threads": Range(1, 16, integer=True),
    "top_k": Range(1, 10_000, integer=True),
    "instances": Range(1, 256, integer=True),
    "queue_delay_us": Range(0, 10_000_000, integer=True, unit="microseconds"),
    "request_mb": Range(0, 4096, low_open=True, unit="MB"),
    "timeout": Range(0, 86_400, low_open=True, unit="seconds"),
    "clients": Range(1, 10_000, integer=True),
    "requests": Range(1, 10_000_000, integer=True),
    "every": Range(0, 10_000_000, integer=True),
    "images": Range(1, 1_000_000, integer=True),
    # Pillow's own limit (Image.MAX_IMAGE_PIXELS = 1024**3 // 4 // 3): the budget may be raised up to it
    "image_pixels": Range(1, 1024**3 // 4 // 3, integer=True, unit="pixels"),
    "connections": Range(1, 65_536, integer=True),
    "serve_timeout": Range(0, 3600, low_open=True, unit="seconds"),
    # trust: the false-alarm rate of the familiarity check, the coverage of an interval
    "alpha": Range(0, 0.5, low_open=True),
    "coverage": Range(0.5, 0.999),
    # export
    "opset": Range(13, 23, integer=True),
    "workspace_mib": Range(1, 1 << 20, integer=True, unit="MiB"),
    "fraction": Range(0, 1),
    "agreement": Range(0, 1, low_open=True),
    "trials": Range(0, 10_000, integer=True),
    "search_seconds": Range(0, 86_400, low_open=True, unit="seconds"),
    "logits": Range(0, 1e4, unit="logits"),
    "scale": Range(0, 1e3, low_open=True),
    # dataset
    "image_side": Range(8, 4096, integer=True, unit="pixels"),
    "per_class": Range(2, 100_000, integer=True),
}

#: What one dataset command may write, images times pixels each: 11 gauge readings x 200 at 1024 px, or
#: the 1,797 digits at 386 px. 2 gauges per reading at 4096 px would be 369 million.
MAX_DATASET_PIXELS = 1 << 28
#: Gauges are drawn at 4 times their side, then reduced: one canvas of at most this many pixels (192 MB in RGB).
MAX_CANVAS_PIXELS = 1 << 26

#: At most this many classes: a label range's size is checked against it before it is expanded.
MAX_CLASSES = 10_000
#: Labels are int64 in every graph's output; this keeps them (and their differences) exact.
MAX_LABEL = 2**53


def is_int(value: object) -> bool:
    """An integer as JSON and the records hold it: an ``int`` that is not a ``bool`` (True is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check(kind: str, value: object, name: str) -> int | float:
    """``value`` checked against ``RANGES[kind]``; ``name`` is what the user called it."""
    return RANGES[kind].check(value, name)


def option(kind: str) -> Callable[[str], int | float]:
    """An argparse ``type=`` that parses and checks one number (its error keeps our message)."""
    bound = RANGES[kind]

    def parse(text: str) -> int | float:
        try:
            return bound.parse(text, "the value")
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = kind  # argparse names the type in some messages
    return parse


def check_dataset_pixels(images: int, side: int, what: str, canvas_scale: int = 1) -> None:
    """Refuse a dataset whose images together (or whose drawing canvas, ``canvas_scale`` times the side)
    exceed MAX_DATASET_PIXELS (MAX_CANVAS_PIXELS), before the first image is made."""
    total, canvas = images * side * side, (canvas_scale * side) ** 2
    if total > MAX_DATASET_PIXELS:
        raise InvalidInputError(f"{what}: {images:,} images of {side}x{side} are {total:,} pixels, over the "
                                f"{MAX_DATASET_PIXELS:,} a dataset command writes; ask for fewer or smaller images")
    if canvas > MAX_CANVAS_PIXELS:
        raise InvalidInputError(f"{what}: each {side}x{side} image is drawn on a canvas of {canvas:,} pixels, over "
                                f"the {MAX_CANVAS_PIXELS:,} allowed; the largest side is "
                                f"{int(MAX_CANVAS_PIXELS ** 0.5) // canvas_scale}")


def check_label_count(count: int, text: object) -> None:
    """Refuse a label set larger than MAX_CLASSES before it is built."""
    if count > MAX_CLASSES:
        raise InvalidInputError(f"at most {MAX_CLASSES} labels are supported (one output per label); this asks "
                                f"for {count}. Received: {text!r}")


def available_memory_bytes() -> int | None:
    """Memory this process could still take (Linux MemAvailable; else physical memory), None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: Peak working set of one image, in multiples of its float32 input. Measured on InceptionV3
#: at 150 px: ONNX Runtime's peak grew by 3.2 MB an image from batch 1 to 128, 12 times the
#: float input (its layers' outputs summed are 98 times); 32 leaves room for heavier runtimes.
ACTIVATION_FACTOR = 32
#: The share of available memory one batch may take.
MEMORY_SHARE = 0.5


def batch_memory_bytes(batch: int, height: int, width: int, channels: int = 3) -> int:
    """Estimated peak bytes of running a batch: uint8 input, its float copy and the activations."""
    pixels = batch * height * width * channels
    return pixels * (1 + 4 + 4 * ACTIVATION_FACTOR)


def check_batch_memory(batch: int, size: tuple[int, int], name: str) -> None:
    """Refuse a batch whose estimated working set exceeds MEMORY_SHARE of available memory."""
    needed = batch_memory_bytes(batch, *size)
    available = available_memory_bytes()
    if available is None:
        return
    limit = int(available * MEMORY_SHARE)
    if needed > limit:
        largest = max(1, limit // batch_memory_bytes(1, *size))
        raise InvalidInputError(
            f"{name} {batch} at {size[0]}x{size[1]} would need about {needed / 2**30:.1f} GiB, over the limit of "
            f"{limit / 2**30:.1f} GiB ({MEMORY_SHARE:.0%} of the memory available now); at most about {largest} "
            f"fit. Received: {batch}")
