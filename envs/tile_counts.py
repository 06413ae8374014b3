"""Per-tile counts of mask stacks [K, H, W] without loops over tiles: the reward's vectorised helpers."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from envs.metrics import EIGHT, junction_pixels, plane_structure

__all__ = [
    "distinct_per_tile",
    "first_pixels",
    "junction_clusters",
    "labels_touching",
    "pad_to",
    "tile_of",
    "tile_sum",
]


def tile_sum(x: np.ndarray, tile: int) -> np.ndarray:
    """Sum of a bool stack [K, Hp, Wp] over each tile -> int64 [K, ty, tx] (Hp, Wp multiples of tile).

    Reduces the contiguous last axis first on a uint8 view (row segments of one tile, <= tile so uint16
    holds them), then the rows: about 2x faster than one ``sum(axis=(2, 4))`` over strided axes.
    """
    k, h, w = x.shape
    u = np.ascontiguousarray(x, dtype=np.bool_).view(np.uint8).reshape(k, h, w // tile, tile)
    rows = u.sum(axis=3, dtype=np.uint16 if tile <= np.iinfo(np.uint16).max else np.int64)
    return rows.reshape(k, h // tile, tile, w // tile).sum(axis=2, dtype=np.int64)


def tile_of(flat_idx: np.ndarray, shape: tuple[int, int, int], tile: int) -> np.ndarray:
    """Flat tile index k*ty*tx + i*tx + j of flat pixel indices into a [K, Hp, Wp] array."""
    _, h, w = shape
    k, rem = np.divmod(flat_idx, h * w)
    r, c = np.divmod(rem, w)
    return (k * (h // tile) + r // tile) * (w // tile) + c // tile


def distinct_per_tile(labels: np.ndarray, tile: int) -> np.ndarray:
    """Number of distinct non-zero labels in each tile of [K, Hp, Wp] -> int64 [K, ty, tx].

    One sort of the (tile, label) pairs of the labelled pixels, then a bincount: no loop over tiles.
    """
    k, h, w = labels.shape
    n_tiles = k * (h // tile) * (w // tile)
    idx = np.flatnonzero(labels)
    if idx.size == 0:
        return np.zeros((k, h // tile, w // tile), dtype=np.int64)
    lab = labels.ravel()[idx].astype(np.int64)
    span = int(lab.max()) + 1
    pairs = np.unique(tile_of(idx, labels.shape, tile) * span + lab)
    return np.bincount(pairs // span, minlength=n_tiles).reshape(k, h // tile, w // tile)


def labels_touching(labels: np.ndarray, gt: np.ndarray) -> np.int64:
    """Number of distinct non-zero labels with a pixel on ``gt``."""
    on = labels[gt]
    return np.int64(np.unique(on[on > 0]).size)


def first_pixels(labels: np.ndarray) -> np.ndarray:
    """Flat index of the first pixel (raster order) of every non-zero label, int64 [n]."""
    idx = np.flatnonzero(labels)
    _, first = np.unique(labels.ravel()[idx], return_index=True)
    return idx[first]


def junction_clusters(skel: np.ndarray) -> tuple[np.ndarray, int]:
    """Junction clusters of a skeleton (stack) [..., H, W] -> (first-pixel flat indices, count)."""
    lead = skel.ndim - 2
    jl, n = ndi.label(junction_pixels(skel), structure=plane_structure(EIGHT, lead))
    return (first_pixels(jl) if n else np.zeros(0, dtype=np.int64)), int(n)


def pad_to(x: np.ndarray, tile: int) -> np.ndarray:
    """Pad the last two axes at the bottom/right with zeros/False to multiples of ``tile``."""
    h, w = x.shape[-2:]
    ph, pw = -h % tile, -w % tile
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)])
