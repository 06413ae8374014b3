"""Mask morphology: the SFT targets of the prompt-conditioned segmenter, one per prompt kind."""

from __future__ import annotations

import numpy as np


def target_mask(mask: np.ndarray, kind: str) -> np.ndarray:
    """The SFT target for a prompt of ``kind`` (see raysys.config.PROMPT_TARGETS)."""
    from scipy import ndimage
    from skimage.morphology import disk, skeletonize

    m = np.array(mask, dtype=bool)  # a writable copy (dataset arrays are read-only)
    if kind == "vessels":
        return m
    if kind == "dilated":
        return ndimage.binary_dilation(m, disk(1))
    if kind == "wide":
        return ndimage.binary_dilation(m, disk(2))
    if kind == "core":
        return ndimage.binary_erosion(m, disk(1)) | skeletonize(m)  # 1-2 px vessels keep their centreline
    if kind == "thick":
        return ndimage.binary_opening(m, disk(1))
    if kind == "thin":
        return m & ~ndimage.binary_opening(m, disk(1))
    if kind == "centerline":
        return skeletonize(m)
    raise ValueError(f"unknown prompt target kind {kind!r}")
