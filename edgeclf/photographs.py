"""The real photographs that ship inside scikit-learn (china.jpg, flower.jpg) and matplotlib
(grace_hopper.jpg): foreign images for the familiarity check's choice and the pictures bench
makes its camera files from. Nothing is downloaded; scikit-learn is needed, matplotlib adds one."""

from __future__ import annotations

import numpy as np


def sample_photographs() -> list[np.ndarray]:
    """The photographs as uint8 RGB arrays [height, width, 3], scikit-learn's first.

    Raises:
        ImportError: scikit-learn is not installed (a device: bench then draws its pictures).
    """
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    try:
        from matplotlib import cbook
        from PIL import Image
    except ImportError:
        return photos
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        photos.append(np.asarray(Image.open(fh).convert("RGB")))
    return photos
