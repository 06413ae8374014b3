"""Post-processing of probability maps into vessel masks (pure numpy/scipy)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), bool)


def disk(radius: int) -> np.ndarray:
    """bool [2r+1, 2r+1] disk structuring element."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx) <= radius * radius


def remove_small_components(mask: np.ndarray, *, min_size: int) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_size`` pixels. mask: bool [H, W]."""
    if min_size <= 1 or not mask.any():
        return mask.copy()
    labels, n = ndimage.label(mask, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def postprocess(
    prob: np.ndarray,
    *,
    threshold: float = 0.5,
    closing_radius: int = 0,
    min_size: int = 0,
    fov: np.ndarray | None = None,
) -> np.ndarray:
    """prob float [H, W] in [0, 1] -> bool [H, W] mask.

    Threshold, then morphological closing with a disk (bridges 1-2 px gaps in thin vessels), then removal
    of components smaller than ``min_size`` pixels (speckle), then the FOV.
    """
    if prob.ndim != 2:
        raise ValueError(f"postprocess expects a 2-D probability map, got shape {prob.shape}")
    mask = np.asarray(prob) >= threshold
    if closing_radius > 0:
        # Pad so the closing does not erode structures touching the border.
        r = int(closing_radius)
        padded = np.pad(mask, r, mode="edge")
        mask = ndimage.binary_closing(padded, structure=disk(r))[r:-r, r:-r]
    mask = remove_small_components(mask, min_size=int(min_size))
    if fov is not None:
        mask &= fov
    return mask
