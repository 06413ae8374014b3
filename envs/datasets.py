"""Retinal-vessel datasets behind one entry point, ``load_dataset(kind, root, split, **kwargs)``.

Kinds and the layouts they expect (names match the official downloads; extensions are matched
case-insensitively, and a root whose single subfolder holds the layout is accepted too):

* ``synthetic``: procedural fundus images from ``envs.synthetic.SyntheticFundus`` (no files).
* ``drive``: ``training/{images,1st_manual,mask}``, ``test/{images,1st_manual,mask}``.
  Official 20/20 split. The grand-challenge download lacks ``test/1st_manual``; such test images
  load with ``has_mask=False`` and an all-False mask (one warning is logged).
* ``stare``: ``stare-images/im0001.ppm.gz``, ``labels-ah/im0001.ah.ppm.gz`` (``annotator="ah"``,
  Hoover, default) or ``labels-vk/im0001.vk.ppm.gz`` (``annotator="vk"``). The 20 labelled images
  sorted by name: first 10 train, last 10 test (Maninis et al. 2016). Unlabelled images of the
  full 400-image download are skipped.
* ``chase_db1`` (alias ``chase``): flat folder, ``Image_01L.jpg`` + ``Image_01L_1stHO.png``
  (``annotator="1stHO"``, default) or ``_2ndHO.png``. 20/8 split: children 01-10 train, 11-14 test
  (FR-UNet, SA-UNet, IterNet: ``int(name[6:8]) <= 10``).
* ``hrf``: ``images/01_h.jpg`` (``_h``/``_dr``/``_g``, .jpg or .JPG), ``manual1/01_h.tif``,
  ``mask/01_h_mask.tif``. 15/30 split by this project's rule: images 01-05 of each category train,
  06-15 test. Images without a ``manual1`` mask are refused, all named, unless ``skip_unlabelled=True``.
* ``fives``: ``{train,test}/Original/1_A.png`` + ``{train,test}/Ground truth/1_A.png`` (the
  misspelling ``Groud truth`` is accepted). Official 600/200. Ids are ``train_1_A`` / ``test_1_A``
  because both folders may reuse the same file names.
* ``polygon_json``: ``annotations.json`` (in ``root``, or ``root`` is the JSON file): a list of
  ``{"image": "a.png", "mask": [[x1, y1, x2, y2, ...], ...], "text": ["prompt", ...],
  "split": "train"}``; images relative to the JSON's folder or its ``images/`` subfolder.
* ``parquet``: a ``.parquet`` file, or a folder with ``manifest.parquet``; columns ``image_path`` or
  ``image_bytes``; optional ``id``, ``mask_path``/``mask_bytes``, ``fov_path``/``fov_bytes``,
  ``split``, ``prompt``. Paths are relative to the parquet file's folder.

FOV: DRIVE and HRF ship FOV masks (a missing one falls back to estimation with a warning); STARE,
CHASE_DB1 and FIVES have none, so the FOV is estimated from the image (``envs.io.estimate_fov``:
red channel above a small threshold, largest component, holes filled). ``polygon_json`` and
``parquet`` without FOV columns use an all-True FOV.

Splits: ``"train"``, ``"test"``, ``"all"`` and ``"val"``. No real dataset has an official
validation split, so ``"val"`` needs ``val_fraction > 0`` (which leaves ``"test"`` as it is): it carves the LAST
``max(1, round(val_fraction * n_train))`` training items (sorted ids for folder datasets, file
order for json/parquet) out of ``"train"``. Taking the tail keeps it deterministic and, for
CHASE_DB1, keeps both eyes of a child on the same side.

The file listing is validated eagerly (every image has its mask, no empty folders); pixels are
decoded lazily on ``dataset[i]`` with a small LRU cache, so FIVES (800 x 2048^2) costs nothing until
read.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import operator
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, overload

import numpy as np

from envs.io import DatasetError, estimate_fov, rasterise_polygons, read_mask, read_rgb
from envs.types import DEFAULT_PROMPT, VesselSample

__all__ = ["KINDS", "SPLITS", "DatasetError", "VesselDataset", "load_dataset"]

logger = logging.getLogger(__name__)

KINDS = ("synthetic", "drive", "stare", "chase_db1", "hrf", "fives", "polygon_json", "parquet")
SPLITS = ("train", "val", "test", "all")
DEFAULT_CACHE_SIZE = 8
"""Decoded samples kept per dataset; a FIVES sample is ~20 MB, so 8 stays well under 200 MB."""

_ALIASES = {
    "chase": "chase_db1",
    "chasedb1": "chase_db1",
    "chase_db": "chase_db1",
    "polygons": "polygon_json",
    "json": "polygon_json",
}
_PART_SPLITS = ("train", "val", "test")
_IMAGE_EXT = re.compile(
    r"^(?P<stem>.+?)\.(?:tiff?|png|jpe?g|gif|bmp|ppm|pgm|pnm|webp)(?:\.gz)?$", re.IGNORECASE
)


# --------------------------------------------------------------------------- lazy sequence


@dataclass(frozen=True, eq=False)
class _ArrowCell:
    """One binary cell of a parquet column, read on access (keeps bytes out of Python objects)."""

    column: Any  # pyarrow.ChunkedArray; typed loosely so pyarrow is imported only for parquet
    row: int
    label: str

    def read(self) -> bytes:
        return self.column[self.row].as_py()


_Src = Path | bytes | _ArrowCell


@dataclass(frozen=True, eq=False)
class _Entry:
    """Where one sample's pixels live; decoding happens in ``_load_entry``.

    ``mask`` and ``polygons`` are both None for unlabelled images. ``fov`` None means "estimate"
    when ``estimate_fov`` is set, else an all-True FOV.
    """

    id: str
    split: str
    image: _Src
    mask: _Src | None = None
    polygons: tuple[np.ndarray, ...] | None = None
    fov: _Src | None = None
    estimate_fov: bool = False
    prompts: tuple[str, ...] = ()


def _label(src: _Src) -> str:
    if isinstance(src, _ArrowCell):
        return src.label
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    return str(src)


def _read(src: _Src) -> Path | bytes:
    return src.read() if isinstance(src, _ArrowCell) else src


def _check_size(arr: np.ndarray, what: str, src: _Src, image: np.ndarray, image_src: _Src) -> None:
    (mh, mw), (h, w) = arr.shape, image.shape[:2]
    if (mh, mw) != (h, w):
        image_name = image_src.name if isinstance(image_src, Path) else _label(image_src)
        raise DatasetError(
            f"{what} {_label(src)} is {mw}x{mh} but image {image_name} is {w}x{h} (WxH); "
            "the two files must come from the same acquisition"
        )


MIN_SIDE = 32
"""Smallest image side raysys trains or scores on: below it the model's stride-16 features hold one cell."""


def _load_entry(e: _Entry) -> VesselSample:
    image = read_rgb(_read(e.image), name=_label(e.image))
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise DatasetError(
            f"image {_label(e.image)} is {w}x{h} pixels; raysys needs at least {MIN_SIDE}x{MIN_SIDE} (a thumbnail "
            "or a broken export?)"
        )
    has_mask = True
    if e.polygons is not None:
        inside = [
            p
            for p in e.polygons
            if p[:, 0].max() >= 0 and p[:, 0].min() < w and p[:, 1].max() >= 0 and p[:, 1].min() < h
        ]
        if e.polygons and not inside:
            raise DatasetError(
                f"the polygons of image {_label(e.image)} lie entirely outside its {w}x{h} pixels (x, y "
                "coordinates in pixels, origin top left); check the annotation's image or coordinate scale"
            )
        mask = rasterise_polygons(list(e.polygons), h, w)
    elif e.mask is not None:
        mask = read_mask(_read(e.mask), name=_label(e.mask))
        _check_size(mask, "mask", e.mask, image, e.image)
    else:
        mask, has_mask = np.zeros((h, w), dtype=bool), False
    if e.fov is not None:
        fov = read_mask(_read(e.fov), name=_label(e.fov), what="FOV mask")
        _check_size(fov, "FOV mask", e.fov, image, e.image)
    elif e.estimate_fov:
        fov = estimate_fov(image)
    else:
        fov = np.ones((h, w), dtype=bool)
    return VesselSample(
        image=image, mask=mask, fov=fov, id=e.id, prompts=e.prompts or (DEFAULT_PROMPT,), has_mask=has_mask
    )


class VesselDataset(Sequence[VesselSample]):
    """A lazily decoded, validated list of samples (``len``, ``[i]``, ``[a:b]``, iteration).

    Decoded samples are kept in a small LRU cache, so ``ds[i]`` may return the same object twice:
    copy arrays before modifying them in place. The cache and its lock are dropped on pickling, so
    the dataset ships to worker processes cheaply.
    """

    def __init__(
        self, entries: Sequence[_Entry], *, name: str, split: str, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self._entries = tuple(entries)
        self.name = name
        self.split = split
        self.cache_size = cache_size
        self._cache: OrderedDict[int, VesselSample] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def ids(self) -> list[str]:
        """Sample ids in order, without decoding any file."""
        return [e.id for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> VesselSample: ...

    @overload
    def __getitem__(self, index: slice) -> VesselDataset: ...

    def __getitem__(self, index: int | slice) -> VesselSample | VesselDataset:
        if isinstance(index, slice):
            return VesselDataset(
                self._entries[index], name=self.name, split=self.split, cache_size=self.cache_size
            )
        i = operator.index(index)
        n = len(self._entries)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name} {self.split}: index {index} out of range for {n} samples")
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        sample = _load_entry(self._entries[i])  # decode outside the lock: it is the slow part
        if self.cache_size:
            with self._lock:
                self._cache[i] = sample
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return sample

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_cache"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VesselDataset(name={self.name!r}, split={self.split!r}, n={len(self)})"


# --------------------------------------------------------------------------- file-listing helpers


def _natural_key(s: str) -> list[Any]:
    """Sort "2_A" before "10_A"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", s) if t]


def _image_stem(name: str) -> str | None:
    m = _IMAGE_EXT.match(name)
    return m.group("stem") if m else None


def _child(parent: Path, *names: str) -> Path | None:
    """First existing child of ``parent`` whose name equals one of ``names``, ignoring case."""
    if not parent.is_dir():
        return None
    by_name = {p.name.lower(): p for p in sorted(parent.iterdir())}
    for n in names:
        if n.lower() in by_name:
            return by_name[n.lower()]
    return None


def _stem_index(folder: Path | None) -> dict[str, Path]:
    """Lower-case stem (extension and .gz removed) -> file, for case-insensitive lookups."""
    if folder is None or not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        stem = _image_stem(p.name)
        if stem is not None and p.is_file():
            out.setdefault(stem.lower(), p)
    return out


def _list_images(
    folder: Path | None, expected: Path, pattern: str, layout: str
) -> list[tuple[re.Match, Path]]:
    """Image files in ``folder`` whose stem fully matches ``pattern``, naturally sorted.

    Raises DatasetError naming ``expected`` (the folder the layout calls for) when it is missing
    or holds no matching image.
    """
    if folder is None or not folder.is_dir():
        raise DatasetError(f"missing folder {expected}; expected layout:\n{layout}")
    rx = re.compile(pattern, re.IGNORECASE)
    found = []
    for p in folder.iterdir():
        stem = _image_stem(p.name)
        m = rx.fullmatch(stem) if stem is not None else None
        if m and p.is_file():
            found.append((m, p))
    if not found:
        raise DatasetError(
            f"no images matching {pattern!r} (+ image extension) in {folder}; expected layout:\n{layout}"
        )
    return sorted(found, key=lambda mp: _natural_key(mp[1].name))


def _locate(root: Path, probe: Callable[[Path], bool], kind: str, layout: str) -> Path:
    """``root`` itself, or its only subfolder, that looks like the dataset (unzipping often adds one)."""
    if not root.is_dir():
        raise DatasetError(f"{kind} root {root} is not a folder; expected layout:\n{layout}")
    if probe(root):
        return root
    candidates = [d for d in sorted(root.iterdir()) if d.is_dir() and probe(d)]
    if len(candidates) == 1:
        logger.info("%s: using %s (found inside %s)", kind, candidates[0], root)
        return candidates[0]
    raise DatasetError(f"{root} does not hold a {kind} dataset; expected layout:\n{layout}")


def _parts_for(split: str) -> tuple[str, ...]:
    """Which on-disk parts a split needs, so "train" works even where test/ is absent."""
    return {"train": ("train",), "val": ("train",), "test": ("test",), "all": ("train", "test")}[split]


def _warn_missing(kind: str, what: str, missing: list[Path], total: int, consequence: str) -> None:
    if missing:
        logger.warning(
            "%s: %d of %d images have no %s (first expected at %s); %s",
            kind,
            len(missing),
            total,
            what,
            missing[0],
            consequence,
        )


# --------------------------------------------------------------------------- real datasets

_DRIVE_LAYOUT = """DRIVE/
  training/images/21_training.tif ... 40_training.tif
  training/1st_manual/21_manual1.gif
  training/mask/21_training_mask.gif
  test/images/01_test.tif ... 20_test.tif
  test/1st_manual/01_manual1.gif   (optional: absent from the grand-challenge download)
  test/mask/01_test_mask.gif"""


def _list_drive(root: Path, parts: Sequence[str]) -> list[_Entry]:
    base = _locate(root, lambda d: _child(d, "training", "test") is not None, "DRIVE", _DRIVE_LAYOUT)
    entries: list[_Entry] = []
    for part in parts:
        folder_name = tag = "training" if part == "train" else "test"
        part_dir = _child(base, folder_name) or base / folder_name
        images = _list_images(_child(part_dir, "images"), part_dir / "images", rf"(\d+)_{tag}", _DRIVE_LAYOUT)
        masks = _stem_index(_child(part_dir, "1st_manual"))
        fovs = _stem_index(_child(part_dir, "mask"))
        no_mask: list[Path] = []
        no_fov: list[Path] = []
        for m, img in images:
            num = m.group(1)
            mask = masks.get(f"{num}_manual1")
            fov = fovs.get(f"{num}_{tag}_mask")
            if mask is None:
                expected = part_dir / "1st_manual" / f"{num}_manual1.gif"
                if part == "train":
                    raise DatasetError(f"missing vessel mask for image {img}: expected {expected}")
                no_mask.append(expected)
            if fov is None:
                no_fov.append(part_dir / "mask" / f"{num}_{tag}_mask.gif")
            entries.append(
                _Entry(id=m.group(0), split=part, image=img, mask=mask, fov=fov, estimate_fov=True)
            )
        _warn_missing("DRIVE", f"{folder_name} label", no_mask, len(images), "they load with has_mask=False")
        _warn_missing("DRIVE", f"{folder_name} FOV mask", no_fov, len(images), "their FOV is estimated")
    return entries


_STARE_LAYOUT = """STARE/
  stare-images/im0001.ppm.gz ... im0324.ppm.gz   (the 20 labelled images; the full set also works)
  labels-ah/im0001.ah.ppm.gz                   (annotator="ah", Hoover, default)
  labels-vk/im0001.vk.ppm.gz                   (annotator="vk")"""
_STARE_N_TRAIN = 10


def _list_stare(root: Path, parts: Sequence[str], *, annotator: str = "ah") -> list[_Entry]:
    ann = annotator.lower()
    if ann not in ("ah", "vk"):
        raise DatasetError(f"STARE annotator must be 'ah' (Hoover) or 'vk', got {annotator!r}")
    base = _locate(root, lambda d: _child(d, "stare-images") is not None, "STARE", _STARE_LAYOUT)
    image_dir = base / "stare-images"
    images = _list_images(_child(base, "stare-images"), image_dir, r"im\d+", _STARE_LAYOUT)
    label_dir = _child(base, f"labels-{ann}") or base / f"labels-{ann}"
    labels = {
        k.removesuffix(f".{ann}"): p for k, p in _stem_index(label_dir).items() if k.endswith(f".{ann}")
    }
    if not labels:
        raise DatasetError(
            f"no labels matching imNNNN.{ann}.ppm.gz in {label_dir}; expected layout:\n{_STARE_LAYOUT}"
        )
    by_stem = {m.group(0).lower(): p for m, p in images}
    for stem, lab in labels.items():
        if stem not in by_stem:
            raise DatasetError(f"label {lab} has no image: expected {image_dir / (stem + '.ppm.gz')}")
    if len(images) <= 20:  # only the vessel subset was unpacked: every image must be labelled
        for m, img in images:
            if m.group(0).lower() not in labels:
                raise DatasetError(
                    f"missing vessel mask for image {img}: expected {label_dir / (m.group(0) + f'.{ann}.ppm.gz')}"
                )
    else:
        logger.info(
            "STARE: %d images, %d labelled by %s; using the labelled ones", len(images), len(labels), ann
        )
    if len(labels) != 20:
        logger.warning("STARE: expected 20 labelled images, found %d in %s", len(labels), label_dir)
    stems = sorted(labels, key=_natural_key)
    return [
        _Entry(
            id=by_stem[s].name.split(".")[0],
            split="train" if i < _STARE_N_TRAIN else "test",
            image=by_stem[s],
            mask=labels[s],
            estimate_fov=True,
        )
        for i, s in enumerate(stems)
    ]


_CHASE_LAYOUT = """CHASE_DB1/   (flat folder)
  Image_01L.jpg ... Image_14R.jpg
  Image_01L_1stHO.png   (annotator="1stHO", default)
  Image_01L_2ndHO.png   (annotator="2ndHO")"""
_CHASE_LAST_TRAIN_CHILD = 10


def _looks_like_chase(folder: Path) -> bool:
    return any(re.fullmatch(r"image_\d\d[lr]", stem) for stem in _stem_index(folder))


def _list_chase(root: Path, parts: Sequence[str], *, annotator: str = "1stHO") -> list[_Entry]:
    ann = {"1stho": "1stHO", "2ndho": "2ndHO"}.get(annotator.lower())
    if ann is None:
        raise DatasetError(f"CHASE_DB1 annotator must be '1stHO' or '2ndHO', got {annotator!r}")
    base = _locate(root, _looks_like_chase, "CHASE_DB1", _CHASE_LAYOUT)
    masks = _stem_index(base)
    entries = []
    for m, img in _list_images(base, base, r"Image_(\d\d)([LR])", _CHASE_LAYOUT):
        mask = masks.get(f"{m.group(0)}_{ann}".lower())
        if mask is None:
            raise DatasetError(
                f"missing vessel mask for image {img}: expected {base / (m.group(0) + f'_{ann}.png')}"
            )
        split = "train" if int(m.group(1)) <= _CHASE_LAST_TRAIN_CHILD else "test"
        if split in parts:
            entries.append(_Entry(id=m.group(0), split=split, image=img, mask=mask, estimate_fov=True))
    return entries


_HRF_LAYOUT = """HRF/
  images/01_h.jpg, 01_dr.JPG, 01_g.jpg ... 15_g.jpg   (h healthy, dr diabetic retinopathy, g glaucoma)
  manual1/01_h.tif
  mask/01_h_mask.tif"""
_HRF_LAST_TRAIN_NUMBER = 5


def _list_hrf(root: Path, parts: Sequence[str], *, skip_unlabelled: bool = False) -> list[_Entry]:
    base = _locate(
        root,
        lambda d: _child(d, "images") is not None and _child(d, "manual1") is not None,
        "HRF",
        _HRF_LAYOUT,
    )
    manual_dir = _child(base, "manual1") or base / "manual1"
    masks, fovs = _stem_index(manual_dir), _stem_index(_child(base, "mask"))
    entries, no_fov, unlabelled = [], [], []
    images = _list_images(_child(base, "images"), base / "images", r"(\d+)_(h|dr|g)", _HRF_LAYOUT)
    for m, img in images:
        stem = m.group(0)
        mask = masks.get(stem.lower())
        if mask is None:
            unlabelled.append(manual_dir / f"{stem}.tif")
            continue
        fov = fovs.get(f"{stem}_mask".lower())
        if fov is None:
            no_fov.append(base / "mask" / f"{stem}_mask.tif")
        split = "train" if int(m.group(1)) <= _HRF_LAST_TRAIN_NUMBER else "test"
        if split in parts:
            entries.append(_Entry(id=stem, split=split, image=img, mask=mask, fov=fov, estimate_fov=True))
    if unlabelled and not skip_unlabelled:
        shown = ", ".join(str(p) for p in unlabelled[:10]) + (" ..." if len(unlabelled) > 10 else "")
        raise DatasetError(
            f"HRF: {len(unlabelled)} of {len(images)} images have no vessel mask (missing {shown}); add the "
            "labels, or set data.skip_unlabelled=true to leave those images out"
        )
    _warn_missing("HRF", "vessel mask", unlabelled, len(images), "those images are left out")
    _warn_missing("HRF", "FOV mask", no_fov, len(images), "their FOV is estimated")
    return entries


_FIVES_LAYOUT = """FIVES/
  train/Original/1_A.png ...        (600 images)
  train/Ground truth/1_A.png ...    ("Groud truth" is accepted too)
  test/Original/...                 (200 images)
  test/Ground truth/..."""
_FIVES_GT = ("Ground truth", "Groud truth", "Ground_truth", "GroundTruth")


def _list_fives(root: Path, parts: Sequence[str]) -> list[_Entry]:
    base = _locate(root, lambda d: _child(d, "train", "test") is not None, "FIVES", _FIVES_LAYOUT)
    entries = []
    for part in parts:
        part_dir = _child(base, part) or base / part
        images = _list_images(_child(part_dir, "Original"), part_dir / "Original", r".+", _FIVES_LAYOUT)
        gt_dir = _child(part_dir, *_FIVES_GT)
        if gt_dir is None:
            raise DatasetError(
                f"missing folder {part_dir / 'Ground truth'}; expected layout:\n{_FIVES_LAYOUT}"
            )
        masks = _stem_index(gt_dir)
        for m, img in images:
            mask = masks.get(m.group(0).lower())
            if mask is None:
                raise DatasetError(f"missing vessel mask for image {img}: expected {gt_dir / img.name}")
            entries.append(
                _Entry(id=f"{part}_{m.group(0)}", split=part, image=img, mask=mask, estimate_fov=True)
            )
    return entries


# --------------------------------------------------------------------------- manifests

_POLYGON_LAYOUT = """root/annotations.json   [{"image": "a.png", "mask": [[x1, y1, x2, y2, x3, y3, ...], ...],
                          "text": ["segment the vessels"], "split": "train"}, ...]
root/a.png  or  root/images/a.png"""


def _entry_split(value: Any, where: str) -> str:
    split = "train" if value is None else str(value).lower()
    if split not in _PART_SPLITS:
        raise DatasetError(f"{where}: split {value!r} is not one of {', '.join(_PART_SPLITS)}")
    return split


def _as_prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise DatasetError(f"{where}: prompts must be a string or a list of strings, got {value!r}")
    return tuple(t for t in value if t.strip())


def _unique_id(stem: str, index: int, seen: set[str]) -> str:
    sid = stem if stem not in seen else f"{stem}-{index}"
    seen.add(sid)
    return sid


def _parse_polygons(raw: Any, where: str) -> tuple[np.ndarray, ...]:
    if not isinstance(raw, list):
        raise DatasetError(f"{where}: 'mask' must be a list of polygons [[x1, y1, x2, y2, ...], ...]")
    polys = []
    for j, poly in enumerate(raw):
        if not isinstance(poly, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly
        ):
            raise DatasetError(f"{where} polygon {j}: must be a flat list of numbers x1, y1, x2, y2, ...")
        if len(poly) < 6 or len(poly) % 2:
            raise DatasetError(
                f"{where} polygon {j}: has {len(poly)} coordinates; a polygon needs at least 3 (x, y) "
                "points, i.e. an even count >= 6"
            )
        arr = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(arr).all():
            raise DatasetError(f"{where} polygon {j}: coordinates must be finite")
        polys.append(arr)
    return tuple(polys)


def _contained(base: Path, path: Path, where: str, allow: bool) -> Path:
    """``path`` if it lies inside ``base`` (links resolved); a manifest is data, and data must not make the
    loader open ``/etc/passwd`` or ``../../`` anything unless the user trusts it (``allow_outside_root``)."""
    if not allow and not path.resolve().is_relative_to(base.resolve()):
        raise DatasetError(
            f"{where}: {path} is outside the dataset folder {base}; refused. If you trust this manifest, "
            "pass allow_outside_root=True (config: data.allow_outside_root: true)"
        )
    return path


def _list_polygon_json(root: Path, parts: Sequence[str], *, allow_outside_root: bool = False) -> list[_Entry]:
    path = root if root.is_file() else root / "annotations.json"
    if not path.is_file():
        raise DatasetError(f"no annotations.json in {root}; expected layout:\n{_POLYGON_LAYOUT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list) or not data:
        raise DatasetError(
            f"{path} must hold a non-empty JSON list of entries; expected layout:\n{_POLYGON_LAYOUT}"
        )
    base = path.parent
    entries, seen = [], set()
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise DatasetError(f"{path}: entry {i} needs an 'image' file name, got {item!r:.200}")
        name = item["image"]
        where = f"{path}: entry {i} (image {name!r})"
        tried = [base / name, base / "images" / name]
        image = next((p for p in tried if p.is_file()), None)
        if image is None:
            raise DatasetError(f"{where}: image not found at {tried[0]} or {tried[1]}")
        image = _contained(base, image, where, allow_outside_root)
        raw = item.get("mask")
        mask, polys = None, None
        if isinstance(raw, str):  # a mask file instead of polygons
            mask = next((p for p in (base / raw, base / "images" / raw) if p.is_file()), None)
            if mask is None:
                raise DatasetError(f"{where}: mask file not found at {base / raw}")
            mask = _contained(base, mask, where, allow_outside_root)
        elif raw is not None:
            polys = _parse_polygons(raw, where)
        entries.append(
            _Entry(
                id=_unique_id(str(item.get("id") or Path(name).stem), i, seen),
                split=_entry_split(item.get("split"), where),
                image=image,
                mask=mask,
                polygons=polys,
                prompts=_as_prompts(item.get("text"), where),
            )
        )
    return entries


def _list_parquet(root: Path, parts: Sequence[str], *, allow_outside_root: bool = False) -> list[_Entry]:
    # pyarrow is only needed for this kind; importing it lazily keeps `import envs.datasets` cheap.
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = root if root.is_file() else root / "manifest.parquet"
    if not path.is_file():
        raise DatasetError(
            f"no parquet file at {path}; pass a .parquet file or a folder with manifest.parquet"
        )
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for corrupt files
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    cols = set(table.column_names)
    if not cols & {"image_path", "image_bytes"}:
        raise DatasetError(f"{path} needs an 'image_path' or 'image_bytes' column; it has {sorted(cols)}")
    base = path.parent
    n = table.num_rows
    if n == 0:
        raise DatasetError(f"{path} has no rows")

    def column(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in cols else [None] * n

    def valid(name: str) -> list[bool]:
        return pc.is_valid(table.column(name)).to_pylist() if name in cols else [False] * n

    def source(kind: str, i: int, paths: list[Any], has_bytes: list[bool], required: bool) -> _Src | None:
        if has_bytes[i]:
            return _ArrowCell(table.column(f"{kind}_bytes"), i, f"{path.name} row {i} {kind}_bytes")
        if paths[i] is None:
            if required:
                raise DatasetError(f"{path}: row {i} has neither image_path nor image_bytes")
            return None
        if not isinstance(paths[i], str):
            raise DatasetError(
                f"{path}: row {i} {kind}_path must be a file path (text), got {paths[i]!r} "
                f"({type(paths[i]).__name__})"
            )
        p = Path(paths[i]) if Path(paths[i]).is_absolute() else base / paths[i]
        if not p.is_file():
            raise DatasetError(f"{path}: row {i} {kind}_path {paths[i]!r} does not exist (looked for {p})")
        return _contained(base, p, f"{path}: row {i} {kind}_path", allow_outside_root)

    ids, splits, prompts = column("id"), column("split"), column("prompt")
    paths = {k: column(f"{k}_path") for k in ("image", "mask", "fov")}
    blobs = {k: valid(f"{k}_bytes") for k in ("image", "mask", "fov")}
    entries, seen = [], set()
    for i in range(n):
        where = f"{path}: row {i}"
        image = source("image", i, paths["image"], blobs["image"], required=True)
        assert image is not None
        if isinstance(ids[i], float) and not math.isfinite(ids[i]):
            raise DatasetError(
                f"{where}: id is {ids[i]} (an empty cell?); give every row an id, or drop the column"
            )
        stem = (
            ids[i]
            if ids[i] is not None
            else (Path(paths["image"][i]).stem if paths["image"][i] else f"row{i}")
        )
        entries.append(
            _Entry(
                id=_unique_id(str(stem), i, seen),
                split=_entry_split(splits[i], where),
                image=image,
                mask=source("mask", i, paths["mask"], blobs["mask"], required=False),
                fov=source("fov", i, paths["fov"], blobs["fov"], required=False),
                prompts=_as_prompts(prompts[i], where),
            )
        )
    return entries


# --------------------------------------------------------------------------- entry point

_LISTERS: dict[str, Callable[..., list[_Entry]]] = {
    "drive": _list_drive,
    "stare": _list_stare,
    "chase_db1": _list_chase,
    "hrf": _list_hrf,
    "fives": _list_fives,
    "polygon_json": _list_polygon_json,
    "parquet": _list_parquet,
}
_FILE_SPLIT_KINDS = ("polygon_json", "parquet")  # the split comes from a per-entry field


def _select(entries: list[_Entry], split: str, *, val_fraction: float, where: str) -> list[_Entry]:
    """Group entries by split, carve val off the tail of train if asked, return the requested one."""
    groups = {s: [e for e in entries if e.split == s] for s in _PART_SPLITS}
    if val_fraction and split != "test":  # the test split is never touched (and may be listed alone)
        if groups["val"]:
            raise DatasetError(f"{where} already defines a 'val' split; drop val_fraction={val_fraction}")
        train = groups["train"]
        n_val = max(1, round(val_fraction * len(train)))
        if n_val >= len(train):
            raise DatasetError(
                f"val_fraction={val_fraction} would move {n_val} of {len(train)} training items of {where} "
                "into val, leaving none to train on; use a smaller fraction"
            )
        groups["train"], groups["val"] = train[:-n_val], train[-n_val:]
    chosen = [e for s in _PART_SPLITS for e in groups[s]] if split == "all" else groups[split]
    if not chosen:
        if split == "val":
            raise DatasetError(
                f"{where} has no 'val' split; pass val_fraction (e.g. 0.2) to carve the last 20% of "
                "'train' into 'val'"
            )
        present = [s for s in _PART_SPLITS if groups[s]]
        raise DatasetError(
            f"split {split!r} of {where} is empty; splits present: {', '.join(present) or 'none'}"
        )
    return chosen


def _check_kwargs(kind: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(
            f"load_dataset(kind={kind!r}) got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"{kind} accepts: {', '.join(sorted(allowed)) or 'none'}"
        )


def _normalise_kind(kind: str) -> str:
    k = str(kind).strip().lower().replace("-", "_")
    k = _ALIASES.get(k, k)
    if k not in KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)} (or 'chase')")
    return k


def load_dataset(
    kind: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    val_fraction: float | None = None,
    cache_size: int | None = None,
    prompts: Sequence[str] | None = None,
    **kwargs: Any,
) -> Sequence[VesselSample]:
    """Open a dataset split as a lazy sequence of ``VesselSample``.

    Args:
        kind: one of ``KINDS`` (case-insensitive; "chase" is an alias of "chase_db1").
        root: dataset folder (or .json / .parquet file); must be None for "synthetic".
        split: "train", "val", "test" or "all" (see the module docstring for each dataset's rule).
        val_fraction: fraction of "train" moved into "val" (file-based kinds; default 0 = no val).
        cache_size: decoded samples kept in the LRU cache (file-based kinds; default 8, 0 disables).
        prompts: prompts for samples whose source has none (default ``(DEFAULT_PROMPT,)``).
        **kwargs: kind-specific options: ``annotator`` for stare ("ah" | "vk") and chase_db1
            ("1stHO" | "2ndHO"); ``skip_unlabelled`` for hrf (leave out images without a vessel mask instead of
            refusing the set); ``n``, ``size``, ``seed``, ``domain`` for synthetic; ``allow_outside_root`` for
            polygon_json and parquet (manifest paths may then leave the dataset folder).

    Raises:
        DatasetError: unknown kind or split, missing/empty folder, image without mask, malformed
            manifest (raised eagerly), or an unreadable/mis-sized file (raised on access).
        TypeError: an option the kind does not take.
    """
    k = _normalise_kind(kind)
    split = str(split).lower()
    if k == "synthetic":
        return _load_synthetic(
            root, split, val_fraction=val_fraction, cache_size=cache_size, prompts=prompts, **kwargs
        )
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if root is None:
        raise DatasetError(f"dataset kind {k!r} needs root= (the dataset folder or file)")
    lister = _LISTERS[k]
    own = [p for p in inspect.signature(lister).parameters if p not in ("root", "parts")]
    _check_kwargs(k, kwargs, own)
    vf = 0.0 if val_fraction is None else float(val_fraction)
    if not (0.0 <= vf < 1.0 and math.isfinite(vf)):
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if prompts is not None and (isinstance(prompts, str) or not prompts):
        raise DatasetError(f"prompts must be a non-empty sequence of strings, got {prompts!r}")
    root_path = Path(root).expanduser()
    parts = ("train", "test") if k in _FILE_SPLIT_KINDS else _parts_for(split)
    entries = lister(root_path, parts, **kwargs)
    chosen = _select(entries, split, val_fraction=vf, where=f"{k} at {root_path}")
    default_prompts = tuple(prompts) if prompts is not None else (DEFAULT_PROMPT,)
    chosen = [e if e.prompts else replace(e, prompts=default_prompts) for e in chosen]
    logger.info("%s %s: %d samples from %s", k, split, len(chosen), root_path)
    return VesselDataset(
        chosen, name=k, split=split, cache_size=DEFAULT_CACHE_SIZE if cache_size is None else cache_size
    )


def _load_synthetic(
    root: str | os.PathLike | None,
    split: str,
    *,
    val_fraction: float | None,
    cache_size: int | None,
    prompts: Sequence[str] | None,
    **kwargs: Any,
) -> Sequence[VesselSample]:
    # Imported here so the real-data loaders work before (and without) the synthetic module.
    from envs.synthetic import SPLITS as SYNTHETIC_SPLITS
    from envs.synthetic import SyntheticFundus

    if root is not None:
        raise DatasetError(f"dataset kind 'synthetic' generates its images; pass root=None, not {root!r}")
    given = [*kwargs]
    given += [
        name
        for name, v in (("val_fraction", val_fraction), ("cache_size", cache_size), ("prompts", prompts))
        if v is not None
    ]
    _check_kwargs("synthetic", given, ("n", "size", "seed", "domain"))
    if split not in SYNTHETIC_SPLITS:
        raise DatasetError(
            f"unknown split {split!r} for synthetic data; expected one of {', '.join(SYNTHETIC_SPLITS)}"
        )
    return SyntheticFundus(split=split, **kwargs)
