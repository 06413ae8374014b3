"""Synthetic datasets written as folders in the real on-disk layouts (DRIVE, CHASE_DB1, STARE).

``write_dataset_folder("drive", "data/drive_synth")`` writes seeded ``envs.synthetic`` fundus images
with the official file names, formats and image sizes, so that ``envs.datasets.load_dataset`` reads
them through exactly the code path a real download takes:

* ``drive``: 565 x 584 (W x H). ``training/images/21_training.tif`` (RGB TIFF),
  ``training/1st_manual/21_manual1.gif`` and ``training/mask/21_training_mask.gif`` (0/255 GIFs),
  ``test/...`` with ``01_test``; ids 21-40 train, 01-20 test.
* ``chase_db1``: 999 x 960, flat folder. ``Image_01L.jpg`` (JPEG quality 95, so pixels change a
  little, as in the real download), ``Image_01L_1stHO.png`` and ``Image_01L_2ndHO.png`` (0/255 PNGs;
  the second observer is the first one drawn 1 px wider). Children 01-10 train, 11-14 test.
* ``stare``: 700 x 605. ``stare-images/im0001.ppm.gz``, ``labels-ah/im0001.ah.ppm.gz`` and
  ``labels-vk/im0001.vk.ppm.gz`` (the 1 px wider observer), using the 20 real image numbers.

Each image is ``generate_fundus`` at the square size ``max(W, H)``, centre-cropped to W x H: the
generator takes well under a second even at 999 px, so nothing is upscaled. DRIVE's FOV circle
(diameter 0.95 x 584 = 555 px) fits in its 565 px width; CHASE's (949 px) fits in 960; STARE's
(665 px) is cut at the top and bottom, as in the real STARE photographs. DRIVE ships the FOV masks;
the loader estimates the FOV of CHASE_DB1 and STARE from the image, as it does for real data.

Image seeds are a function of ``seed``, the layout and the image number, so each image is the same
whatever ``n_train`` / ``n_test`` are, and the splits never share an image.

Safety: an existing non-empty ``out`` is refused. Files go to a hidden sibling temp folder renamed
to ``out`` at the end, so an interrupted write never leaves a partial dataset under ``out``.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from envs.synthetic import generate_fundus
from envs.types import VesselSample

__all__ = ["LAYOUTS", "LayoutSpec", "iter_folder_samples", "layout_spec", "write_dataset_folder"]

logger = logging.getLogger(__name__)

LAYOUTS = ("drive", "chase_db1", "stare")
_ALIASES = {"chase": "chase_db1", "chasedb1": "chase_db1", "chase_db": "chase_db1"}

# The 20 STARE images with vessel labels; the loader sorts them, first 10 train, last 10 test.
_STARE_NUMBERS = (1, 2, 3, 4, 5, 44, 77, 81, 82, 139, 162, 163, 235, 236, 239, 240, 255, 291, 319, 324)
_JPEG_QUALITY = 95
# Seed layout: seed * stride + offset + layout * 10_000 + image number. The offset keeps these images
# apart from SyntheticFundus's split seeds (0 / 1M / 2M), which is nice but not relied on.
_SEED_STRIDE = 10_000_000
_SEED_OFFSET = 5_000_000


@dataclass(frozen=True)
class LayoutSpec:
    """What one layout writes.

    Attributes:
        layout: name in ``LAYOUTS``; kind: the ``load_dataset`` kind that reads it.
        width, height: image size in pixels, as in the real dataset.
        max_train, max_test: images per split in the real dataset (the defaults).
    """

    layout: str
    kind: str
    width: int
    height: int
    max_train: int
    max_test: int

    def counts(self, n_train: int | None, n_test: int | None) -> tuple[int, int]:
        """Resolve ``None`` to the full dataset and validate the counts for this layout."""
        n_tr = self.max_train if n_train is None else n_train
        n_te = self.max_test if n_test is None else n_test
        for name, n, hi in (("n_train", n_tr, self.max_train), ("n_test", n_te, self.max_test)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= hi:
                raise ValueError(
                    f"{name} must be an integer in 0..{hi} for layout {self.layout!r}, got {n!r}"
                )
        if n_tr + n_te == 0:
            raise ValueError("n_train + n_test must be at least 1")
        if self.layout == "stare" and n_te and n_tr != self.max_train:
            # The loader's STARE split is positional (first 10 sorted images train), so a test
            # image written next to fewer than 10 training images would load as training data.
            raise ValueError(
                f"stare: test images need all {self.max_train} training images (the loader puts the "
                f"first {self.max_train} labelled images in train); got n_train={n_tr}, n_test={n_te}"
            )
        return int(n_tr), int(n_te)


_SPECS = {
    "drive": LayoutSpec("drive", "drive", width=565, height=584, max_train=20, max_test=20),
    "chase_db1": LayoutSpec("chase_db1", "chase_db1", width=999, height=960, max_train=20, max_test=8),
    "stare": LayoutSpec("stare", "stare", width=700, height=605, max_train=10, max_test=10),
}


def layout_spec(layout: str) -> LayoutSpec:
    """The spec of ``layout`` (case-insensitive; "chase" is an alias of "chase_db1").

    Raises:
        ValueError: unknown layout, naming the allowed ones.
    """
    key = str(layout).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _SPECS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)} (or 'chase')")
    return _SPECS[key]


@dataclass(frozen=True)
class _Item:
    split: str
    id: str  # the id load_dataset gives the sample
    number: int  # unique within the layout; part of the image seed


def _plan(spec: LayoutSpec, n_train: int, n_test: int) -> list[_Item]:
    if spec.layout == "drive":
        return [_Item("train", f"{n}_training", n) for n in range(21, 21 + n_train)] + [
            _Item("test", f"{n:02d}_test", n) for n in range(1, 1 + n_test)
        ]
    if spec.layout == "chase_db1":
        # Images in file order (01L, 01R, 02L, ...): an odd count gives the last child its left eye only.
        eyes = [(c, e) for c in range(1, 15) for e in "LR"]
        train, test = eyes[:20][:n_train], eyes[20:][:n_test]
        return [
            _Item(split, f"Image_{c:02d}{e}", 2 * c + (e == "R"))
            for split, chosen in (("train", train), ("test", test))
            for c, e in chosen
        ]
    train, test = _STARE_NUMBERS[:10][:n_train], _STARE_NUMBERS[10:][:n_test]
    return [_Item(s, f"im{n:04d}", n) for s, chosen in (("train", train), ("test", test)) for n in chosen]


def _sample(spec: LayoutSpec, item: _Item, seed: int) -> VesselSample:
    side = max(spec.width, spec.height)
    image_seed = seed * _SEED_STRIDE + _SEED_OFFSET + LAYOUTS.index(spec.layout) * 10_000 + item.number
    s = generate_fundus(image_seed, side, sample_id=item.id)
    top, left = (side - spec.height) // 2, (side - spec.width) // 2
    rows, cols = slice(top, top + spec.height), slice(left, left + spec.width)
    return VesselSample(
        image=np.ascontiguousarray(s.image[rows, cols]),
        mask=np.ascontiguousarray(s.mask[rows, cols]),
        fov=np.ascontiguousarray(s.fov[rows, cols]),
        id=item.id,
        prompts=s.prompts,
    )


def iter_folder_samples(
    layout: str, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0
) -> Iterator[tuple[str, VesselSample]]:
    """Yield ``(split, sample)`` for each image ``write_dataset_folder`` writes, before encoding.

    Ids match those ``load_dataset`` gives the written files. Images are generated one at a time.
    """
    spec = layout_spec(layout)
    n_tr, n_te = spec.counts(n_train, n_test)
    _check_seed(seed)
    for item in _plan(spec, n_tr, n_te):
        yield item.split, _sample(spec, item, int(seed))


# --------------------------------------------------------------------------- encoders


def _grey(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def _wider(mask: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """A second observer who draws every vessel 1 px wider (inside the FOV)."""
    return ndimage.binary_dilation(mask, structure=np.ones((2, 2), dtype=bool)) & fov


def _ppm_gz(path: Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PPM")
    path.write_bytes(gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))


def _write_drive(root: Path, split: str, s: VesselSample) -> list[Path]:
    num, tag = s.id.split("_")
    part = root / ("training" if split == "train" else "test")
    files = (
        part / "images" / f"{s.id}.tif",
        part / "1st_manual" / f"{num}_manual1.gif",
        part / "mask" / f"{num}_{tag}_mask.gif",
    )
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(s.image, mode="RGB").save(files[0], format="TIFF")
    _grey(s.mask).save(files[1], format="GIF")
    _grey(s.fov).save(files[2], format="GIF")
    return list(files)


def _write_chase(root: Path, split: str, s: VesselSample) -> list[Path]:
    files = (root / f"{s.id}.jpg", root / f"{s.id}_1stHO.png", root / f"{s.id}_2ndHO.png")
    Image.fromarray(s.image, mode="RGB").save(files[0], format="JPEG", quality=_JPEG_QUALITY)
    _grey(s.mask).save(files[1], format="PNG")
    _grey(_wider(s.mask, s.fov)).save(files[2], format="PNG")
    return list(files)


def _write_stare(root: Path, split: str, s: VesselSample) -> list[Path]:
    files = (
        root / "stare-images" / f"{s.id}.ppm.gz",
        root / "labels-ah" / f"{s.id}.ah.ppm.gz",
        root / "labels-vk" / f"{s.id}.vk.ppm.gz",
    )
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
    _ppm_gz(files[0], s.image)
    for f, m in ((files[1], s.mask), (files[2], _wider(s.mask, s.fov))):
        _ppm_gz(f, np.repeat(m.astype(np.uint8)[..., None] * 255, 3, axis=2))
    return list(files)


_WRITERS: dict[str, Callable[[Path, str, VesselSample], list[Path]]] = {
    "drive": _write_drive,
    "chase_db1": _write_chase,
    "stare": _write_stare,
}


# --------------------------------------------------------------------------- entry point


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 10**9:
        raise ValueError(f"seed must be an integer in 0..999999999, got {seed!r}")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; refusing to overwrite it")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; refusing to write a dataset into it (pick a new folder)")


def write_dataset_folder(
    layout: str,
    out: str | os.PathLike,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset folder in ``layout``'s real format; see the module docstring.

    Args:
        layout: one of ``LAYOUTS`` (case-insensitive; "chase" works too).
        out: the folder to create; it may exist only if empty. Parent folders are created.
        n_train, n_test: images per split, default the real dataset's (drive 20/20, chase_db1 20/8,
            stare 10/10); the first ones in file order are written. chase_db1 counts images (two per
            child); stare test images need n_train=10 because the loader's split is positional.
        seed: base seed; the same arguments give the same pixels.

    Returns:
        ``out`` as an absolute Path; ``load_dataset(layout_spec(layout).kind, out, split=...)`` reads it.

    Raises:
        ValueError: unknown layout, bad counts or seed (nothing is written).
        FileExistsError: ``out`` exists and is a file or a non-empty folder (it is left untouched).
    """
    spec = layout_spec(layout)
    n_tr, n_te = spec.counts(n_train, n_test)
    _check_seed(seed)
    out = Path(out).expanduser().absolute()  # so that out.parent and out.name are real even for '.'
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0o700 mode would stick to the renamed dataset folder.
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    writer = _WRITERS[spec.layout]
    try:
        n_files = 0
        for split, sample in iter_folder_samples(spec.layout, n_train=n_tr, n_test=n_te, seed=seed):
            n_files += len(writer(tmp, split, sample))
        _check_out(out)  # again: someone may have written there while we generated
        if out.is_dir():
            out.rmdir()  # fails rather than deletes if files appeared since the check
        tmp.rename(out)
    except BaseException:  # KeyboardInterrupt too: never leave the partial folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "wrote %s: %d train + %d test images (%d files), %dx%d (WxH)",
        out,
        n_tr,
        n_te,
        n_files,
        spec.width,
        spec.height,
    )
    return out
