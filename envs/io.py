"""Image decoding helpers for the dataset loaders.

Every reader returns the project's array conventions (see ``envs.types.VesselSample``):

* ``read_rgb``  -> uint8 [H, W, 3] RGB
* ``read_mask`` -> bool  [H, W]
* ``estimate_fov`` -> bool [H, W], for datasets that ship no field-of-view mask

Sources are a path, or raw encoded bytes (parquet ``*_bytes`` columns). Gzip-compressed files
(STARE's ``.ppm.gz``) are recognised by their magic number, so ``im0001.ppm.gz`` and an
already-decompressed ``im0001.ppm`` read the same way. Any decoding failure becomes a
``DatasetError`` that names the file, so a bad file in a 800-image folder is easy to find.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

Source = str | os.PathLike | bytes | bytearray | memoryview
"""A path to an image file, or the encoded file contents."""

_GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(ValueError):
    """A dataset folder, manifest or file is missing, malformed or inconsistent.

    The message always names the offending file or folder and, where it helps, what was expected.
    """


def source_label(source: Source, name: str | None = None) -> str:
    """Human-readable name of a source for error messages (``name`` wins when given)."""
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def _open(source: Source, what: str, name: str | None) -> Image.Image:
    """Decode ``source`` fully (``load()`` so truncated files fail here, not later)."""
    label = source_label(source, name)
    try:
        data = (
            bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
        )
        if data[:2] == _GZIP_MAGIC:
            data = gzip.decompress(data)
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise DatasetError(f"cannot read {what} {label}: {exc}") from exc
    return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a grey array of any numeric dtype to uint8.

    16-bit data is divided by 257 (65535 -> 255), so a 16-bit scan keeps its absolute brightness;
    floats in [0, 1] are multiplied by 255; anything else wider than 16 bits is scaled by its maximum.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if hi <= 1.0 else 1.0
    elif hi <= 255 and lo >= 0:
        scale = 1.0
    elif hi <= 65535 and lo >= 0:
        scale = 1.0 / 257.0
    else:
        a = a - min(lo, 0.0)
        scale = 255.0 / max(float(a.max()), 1.0)
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


def read_rgb(source: Source, *, name: str | None = None) -> np.ndarray:
    """Read an image as RGB.

    Handles 8-bit RGB/RGBA (alpha dropped), palette (``P``), grey (``L``, ``LA``, ``1``),
    16-bit and float grey (``I;16``, ``I``, ``F``; scaled to 8 bit), CMYK/YCbCr.

    Args:
        source: path or encoded bytes.
        name: label used in error messages instead of the path (e.g. "manifest.parquet row 3").

    Returns:
        uint8 [H, W, 3].
    """
    img = _open(source, "image", name)
    if img.mode in ("RGB",):
        arr = np.asarray(img)
    elif img.mode in ("RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        arr = np.asarray(img.convert("RGB"))
    elif img.mode in ("L", "LA", "1"):
        grey = np.asarray(img.convert("L"))
        arr = np.repeat(grey[:, :, None], 3, axis=2)
    else:  # I;16*, I, F: wide grey that PIL's convert("L") would clip instead of scale
        grey = _to_uint8(np.asarray(img))
        if grey.ndim != 2:
            raise DatasetError(
                f"cannot read image {source_label(source, name)}: unsupported mode {img.mode} "
                f"with shape {grey.shape}; convert it to 8-bit RGB"
            )
        arr = np.repeat(grey[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def binarise(arr: np.ndarray) -> np.ndarray:
    """Threshold a decoded mask array to bool [H, W].

    Rule: colour masks take the per-pixel maximum over channels (so a pure red label counts);
    arrays whose values are all in {0, 1} are "nonzero = vessel"; otherwise a pixel is a vessel
    when it is above half of its range (> 127 for 8 bit, > 32767 for 16-bit values above 255,
    > 0.5 for floats in [0, 1]). The half-range rule tolerates JPEG noise in re-saved masks.
    """
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.dtype == np.bool_:
        return arr.copy()
    if arr.size == 0:
        return arr.astype(bool)
    hi = arr.max()
    if hi <= 1 and arr.min() >= 0:
        return arr > 0
    if np.issubdtype(arr.dtype, np.floating):
        return arr > (0.5 if hi <= 1.0 else 127.5)
    if hi <= 255:
        return arr > 127
    return arr > 32767


def read_mask(source: Source, *, name: str | None = None, what: str = "mask") -> np.ndarray:
    """Read a binary mask (vessel labels or FOV) as bool [H, W].

    Palette GIFs (DRIVE), 1-bit images, grey PNG/TIFF and RGB PNG (FIVES) all work; see
    ``binarise`` for the threshold rule.
    """
    img = _open(source, what, name)
    if img.mode == "1":
        return np.asarray(img, dtype=bool).copy()
    if img.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr"):
        # Palette indices carry no brightness; alpha is not a label.
        img = img.convert("RGB")
    return binarise(np.asarray(img))


def rasterise_polygons(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Fill polygons into a bool [H, W] mask.

    Args:
        polygons: each a float array [N, 2] of (x, y) vertices in pixel coordinates, N >= 3.

    A pixel is set when its centre lies inside or on the boundary (PIL's fill + outline), so the
    square with corners (2, 2) and (12, 12) covers 11 x 11 = 121 pixels. Parts outside the image
    are clipped.
    """
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        draw.polygon([(float(x), float(y)) for x, y in poly], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool).copy()


def estimate_fov(image: np.ndarray, *, threshold: float | None = None) -> np.ndarray:
    """Estimate the circular field of view of a fundus photograph.

    Method: red channel > threshold, keep the largest 8-connected component, fill its holes.
    The red channel is used because the retina is bright red while the camera's surround is
    near black; dark lesions or the optic cup inside the disc are restored by the hole filling.

    Args:
        image: uint8 [H, W, 3] RGB.
        threshold: red-channel cut-off; default ``max(15, 0.1 * p99(red))`` so that very bright
            photographs (FIVES) are not leaked into by JPEG noise and dark ones (STARE) still pass.

    Returns:
        bool [H, W]; all True when nothing exceeds the threshold (a warning is logged).
    """
    # scipy is only needed here; importing it lazily keeps `import envs` cheap.
    from scipy import ndimage

    red = image[:, :, 0].astype(np.float32)
    if threshold is None:
        threshold = max(15.0, 0.1 * float(np.percentile(red, 99))) if red.size else 15.0
    fg = red > threshold
    if not fg.any():
        logger.warning(
            "estimate_fov: no pixel brighter than %.1f in the red channel; using the whole image", threshold
        )
        return np.ones(red.shape, dtype=bool)
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(fg)
