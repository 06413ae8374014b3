"""Pieces of images: seeded training crops that hold enough FOV, rescaling for very large images, colour
standardisation across sites, and the overlapping sliding windows (with blending weights) that full-image
inference stitches back together.

Pure numpy (+ Pillow for resampling); every function is deterministic given its ``rng`` or arguments, so
the rollout actor, the reward actor and the learner derive the same crop from the same seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from envs.types import VesselSample

__all__ = [
    "Box",
    "blend_weights",
    "crop_box",
    "crop_sample",
    "rescale_probs",
    "rescale_sample",
    "scaled_shape",
    "standardize_sample",
    "stitch",
    "window_boxes",
]


@dataclass(frozen=True)
class Box:
    """A rectangle of an image: rows ``y0:y0+h``, columns ``x0:x0+w``."""

    y0: int
    x0: int
    h: int
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.h), slice(self.x0, self.x0 + self.w)


def crop_box(
    fov: np.ndarray, size: int, rng: np.random.Generator, *, min_fov: float = 0.5, tries: int = 16
) -> Box:
    """A random ``size`` x ``size`` box (clipped to the image) whose FOV fraction is at least ``min_fov``.

    Draws up to ``tries`` positions and returns the first that holds enough FOV, else the one that held the
    most (an image whose FOV is smaller than the crop still trains on its best crop).
    """
    height, width = fov.shape
    ch, cw = min(size, height), min(size, width)
    best, best_frac = Box(0, 0, ch, cw), -1.0
    for _ in range(max(1, tries)):
        box = Box(int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1)), ch, cw)
        frac = float(fov[box.slices].mean())
        if frac >= min_fov:
            return box
        if frac > best_frac:
            best, best_frac = box, frac
    return best


def crop_sample(sample: VesselSample, box: Box, size: int | None = None) -> VesselSample:
    """The part of ``sample`` under ``box``; padded (black image, no vessel, no FOV) to ``size`` x ``size``
    when the image is smaller than the crop, so every crop of a batch has one shape."""
    ys, xs = box.slices
    image, mask, fov = sample.image[ys, xs], sample.mask[ys, xs], sample.fov[ys, xs]
    if size is not None and (box.h < size or box.w < size):
        pad = ((0, max(0, size - box.h)), (0, max(0, size - box.w)))
        image = np.pad(image, (*pad, (0, 0)))
        mask, fov = np.pad(mask, pad), np.pad(fov, pad)
    return dataclasses.replace(
        sample,
        id=f"{sample.id}@{box.y0},{box.x0}",
        image=np.ascontiguousarray(image),
        mask=np.ascontiguousarray(mask),
        fov=np.ascontiguousarray(fov),
    )


def _resize_bool(mask: np.ndarray, height: int, width: int, *, level: float) -> np.ndarray:
    """Area-weighted resampling, then ``>= level``."""
    img = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR)) >= level


def _skeleton_on(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """The skeleton of ``mask`` drawn on a ``height`` x ``width`` grid (nearest cell of each pixel)."""
    from skimage.morphology import skeletonize

    out = np.zeros((height, width), bool)
    ys, xs = np.nonzero(skeletonize(mask))
    out[(ys * height) // mask.shape[0], (xs * width) // mask.shape[1]] = True
    return out


def scaled_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, round(height * scale)), max(1, round(width * scale))


def rescale_sample(sample: VesselSample, scale: float) -> VesselSample:
    """``sample`` resampled by ``scale``: antialiased image; FOV and vessels by area at 0.5, plus for the
    vessels their skeleton's pixels mapped to the new grid, so a 1-px capillary survives downscaling as a
    1-px line (by area alone it would vanish) and the tree stays connected for topology rewards, while wide
    vessels keep their width in proportion."""
    if scale == 1.0:
        return sample
    height, width = scaled_shape(*sample.mask.shape, scale)
    image = np.asarray(Image.fromarray(sample.image).resize((width, height), Image.Resampling.BILINEAR))
    return dataclasses.replace(
        sample,
        image=np.ascontiguousarray(image),
        mask=_resize_bool(sample.mask, height, width, level=0.5) | _skeleton_on(sample.mask, height, width),
        fov=_resize_bool(sample.fov, height, width, level=0.5),
    )


STANDARD_FUNDUS = ((190.0, 85.0, 25.0), (40.0, 28.0, 12.0))
"""Per-channel (R, G, B) mean and standard deviation inside the field of view that ``standardize_sample``
maps every image to: about the average of CHASE_DB1, STARE and HRF images."""


def standardize_sample(
    sample: VesselSample, stats: tuple[Sequence[float], Sequence[float]] = STANDARD_FUNDUS
) -> VesselSample:
    """``sample`` with each colour channel shifted and scaled so that its field of view has the mean and
    standard deviation of ``stats`` (clipped to 0..255). Sites differ in exposure, colour balance and
    contrast, which no label describes; a model trained on one site's statistics misreads another's."""
    x = sample.image.astype(np.float32)
    inside = x[sample.fov] if sample.fov.any() else x.reshape(-1, 3)
    mean, std = inside.mean(axis=0), inside.std(axis=0)
    gain = np.asarray(stats[1], np.float32) / np.maximum(std, 1.0)  # a flat channel is shifted, not blown up
    out = (x - mean) * gain + np.asarray(stats[0], np.float32)
    return dataclasses.replace(sample, image=np.clip(np.rint(out), 0, 255).astype(np.uint8))


def jitter_sample(sample: VesselSample, rng: np.random.Generator, strength: float) -> VesselSample:
    """``sample`` with a random gamma and a random contrast about its field of view's mean colour, each factor
    exp(U(-strength, strength)) and applied inside the field of view only. Sites and even images of one set
    differ in exposure and vessel contrast (STARE's test images have about 30 % less than its training ones),
    which a few training images do not span."""
    gamma, contrast = np.exp(rng.uniform(-strength, strength, size=2))
    x = (sample.image.astype(np.float32) / 255.0) ** gamma * 255.0
    fov = sample.fov
    mean = x[fov].mean(axis=0) if fov.any() else x.reshape(-1, 3).mean(axis=0)
    out = np.where(fov[..., None], mean + contrast * (x - mean), sample.image.astype(np.float32))
    return dataclasses.replace(sample, image=np.clip(np.rint(out), 0, 255).astype(np.uint8))


def rescale_probs(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Probability map [h, w] -> [height, width] by bilinear interpolation (float32)."""
    if probs.shape == (height, width):
        return probs.astype(np.float32, copy=False)
    img = Image.fromarray(probs.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return [*starts, length - window]


def window_boxes(
    height: int, width: int, window: int, *, overlap: float = 0.25, fov: np.ndarray | None = None
) -> list[Box]:
    """Windows of ``window`` x ``window`` (clipped to the image) covering it with at least ``overlap``
    (fraction of the window) between neighbours. With ``fov``, windows holding no FOV pixel are dropped."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    wh, ww = min(window, height), min(window, width)
    stride_y = max(1, wh - round(overlap * wh))
    stride_x = max(1, ww - round(overlap * ww))
    boxes = [Box(y, x, wh, ww) for y in _starts(height, wh, stride_y) for x in _starts(width, ww, stride_x)]
    if fov is not None:
        boxes = [b for b in boxes if fov[b.slices].any()]
    return boxes


def blend_weights(height: int, width: int) -> np.ndarray:
    """float32 [height, width] weights that fall from 1 in the middle towards the window's border (a
    separable Gaussian, sigma = 1/4 of the side, floored at 1e-3): overlapping windows then hand over
    smoothly and the border pixels, where a window sees the least context, count least."""

    def ramp(n: int) -> np.ndarray:
        x = np.arange(n, dtype=np.float32) - (n - 1) / 2
        return np.exp(-0.5 * (x / max(n / 4, 1.0)) ** 2)

    return np.maximum(np.outer(ramp(height), ramp(width)), 1e-3).astype(np.float32)


def stitch(pieces: Sequence[np.ndarray], boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """Weighted mean of window probabilities [h, w] placed at ``boxes``; pixels no window covers are 0."""
    acc = np.zeros((height, width), np.float32)
    norm = np.zeros((height, width), np.float32)
    for piece, box in zip(pieces, boxes, strict=True):
        wgt = blend_weights(box.h, box.w)
        ys, xs = box.slices
        acc[ys, xs] += piece * wgt
        norm[ys, xs] += wgt
    return np.divide(acc, norm, out=np.zeros_like(acc), where=norm > 0)
