"""Plainly foreign inputs every artifact must flag as unfamiliar: what a covered lens, a dead
sensor or a broken cable gives. numpy only (``edgeclf verify`` makes them on the device)."""

from __future__ import annotations

import numpy as np

#: The kinds of frame the probe holds, in order.
KINDS = ("uniform noise", "constant frame")


def foreign_probe(height: int, width: int, count: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` uint8 RGB frames [count, height, width, 3] of each kind in KINDS.

    Constant frames run from black to white through greys and saturated colours (the first is
    black, the second white); noise is uniform over 0..255 in every pixel and channel.
    """
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    colours = rng.integers(0, 256, (count, 3))
    colours[0], colours[1] = 0, 255
    greys = np.linspace(0, 255, max(count // 4, 2)).round().astype(int)
    colours[2:2 + len(greys)] = greys[:max(0, count - 2), None]
    constant = np.broadcast_to(colours[:, None, None, :].astype(np.uint8), (count, height, width, 3)).copy()
    return {"uniform noise": noise, "constant frame": constant}
