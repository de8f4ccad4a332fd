"""The real photographs that ship inside scikit-learn (china.jpg, flower.jpg) and matplotlib
(grace_hopper.jpg): foreign images for the familiarity check's choice and the pictures bench
makes its camera files from. Nothing is downloaded; scikit-learn is needed, matplotlib adds one."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def sample_photographs() -> tuple[np.ndarray, ...]:
    """The photographs as uint8 RGB arrays [height, width, 3], scikit-learn's first; read from disk
    once per process (bench draws a dozen pictures from them) and read-only, as they are shared.

    Raises:
        ImportError: scikit-learn is not installed (a device: bench then draws its pictures).
    """
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    try:
        from matplotlib import cbook
        from PIL import Image
    except ImportError:
        pass
    else:
        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            photos.append(np.asarray(Image.open(fh).convert("RGB")))
    for photo in photos:
        photo.flags.writeable = False
    return tuple(photos)
