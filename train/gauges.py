"""An ordinal dataset that ships with edgeclf: analogue gauges whose needle points at 0..10.

The classes are ordered in the images themselves: a needle at 4 looks like one at 3 or 5,
and nothing like one at 9, which is what an ordinal loss and median decoding are for (a
meter reading, the product's own use). Each image is drawn with Pillow, deterministically
from its index and the seed: a dial of random size and place, its whole scale rotated,
11 ticks over a 270 degree arc, the needle at the reading plus up to a third of a step of
play, clutter behind the dial, uneven lighting, blur and sensor noise. numpy and Pillow only.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from edgeclf import limits
from edgeclf.errors import DataError

#: The readings, one class each.
READINGS = tuple(range(11))
#: Each gauge is drawn at this many times its side, then reduced with LANCZOS (anti-aliased).
DRAWN_AT = 4
#: The scale's arc, in degrees clockwise from straight up: the reading 0 at START (lower left),
#: each step STEP further, 10 at +135 (lower right).
START, STEP = -135.0, 27.0


def gauge_image(reading: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One gauge showing ``reading``, drawn at 4x and reduced to ``size`` (anti-aliased)."""
    big = size * DRAWN_AT
    background = tuple(int(v) for v in rng.integers(40, 220, 3))
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):  # clutter: boxes and lines behind the dial
        x0, y0 = rng.integers(0, big, 2)
        x1, y1 = x0 + rng.integers(10, big // 2), y0 + rng.integers(10, big // 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((int(x0), int(y0), int(x1), int(y1)), fill=colour)
        else:
            draw.line((int(x0), int(y0), int(x1), int(y1)), fill=colour, width=int(rng.integers(2, 8)))
    radius = big * rng.uniform(0.30, 0.46)
    cx, cy = big / 2 + rng.uniform(-1, 1) * (big / 2 - radius), big / 2 + rng.uniform(-1, 1) * (big / 2 - radius)
    face = tuple(int(v) for v in rng.integers(200, 256, 3))
    rim = tuple(int(v) for v in rng.integers(0, 90, 3))
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=face, outline=rim,
                 width=max(2, int(radius * 0.06)))
    turn = rng.uniform(-25, 25)  # the whole scale, as a dial mounted askew

    def point(angle_deg: float, r: float) -> tuple[float, float]:
        a = math.radians(angle_deg + turn)
        return cx + r * math.sin(a), cy - r * math.cos(a)

    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    for tick in READINGS:
        angle = START + tick * STEP
        draw.line((*point(angle, radius * 0.72), *point(angle, radius * 0.9)), fill=ink,
                  width=max(2, int(radius * (0.05 if tick % 5 == 0 else 0.025))))
    needle = START + (reading + rng.uniform(-1 / 3, 1 / 3)) * STEP
    colour = (int(rng.integers(150, 256)), int(rng.integers(0, 60)), int(rng.integers(0, 60)))
    draw.line((*point(needle + 180, radius * 0.15), *point(needle, radius * 0.82)), fill=colour,
              width=max(3, int(radius * 0.06)))
    hub = radius * 0.08
    draw.ellipse((cx - hub, cy - hub, cx + hub, cy + hub), fill=ink)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2)))
    pixels = np.asarray(img, dtype=np.float32)
    ramp = np.linspace(rng.uniform(0.55, 1.0), rng.uniform(0.8, 1.25), size, dtype=np.float32)
    lighting = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]  # light from one side
    pixels = pixels * lighting[..., None] + rng.normal(0, rng.uniform(2, 10), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_gauges_folder(out: str | Path, per_class: int = 200, holdout: float = 0.2, seed: int = 0,
                        size: int = 64, overwrite: bool = False) -> dict[str, int]:
    """Write ``per_class`` gauges per reading as PNG files: ``out/train/<reading>/`` and ``out/test/<reading>/``.

    Deterministic: the same arguments write the same pixels. Returns the number of files per split.
    """
    from edgeclf.fsio import staged_directory

    if not 0.0 < holdout < 1.0:
        raise DataError(f"holdout must be between 0 and 1 (exclusive). Received: {holdout}")
    limits.check("per_class", per_class, "per_class")
    limits.check_dataset_pixels(per_class * len(READINGS), size, "dataset gauges", canvas_scale=DRAWN_AT)
    test_count = max(1, round(per_class * holdout))
    counts = {"train": 0, "test": 0}
    with staged_directory(out, overwrite=overwrite) as stage:
        for reading in READINGS:
            for i in range(per_class):
                rng = np.random.default_rng([seed, reading, i])
                split = "test" if i < test_count else "train"
                folder = stage / split / str(reading)
                folder.mkdir(parents=True, exist_ok=True)
                gauge_image(reading, rng, size).save(folder / f"gauge_{reading:02d}_{i:05d}.png")
                counts[split] += 1
    print(f"wrote {counts['train']} train and {counts['test']} test gauge images to {out}", file=sys.stderr)
    return counts
