"""Dataset faults: missing, corrupt, truncated or mis-sized images and masks in a DRIVE-layout folder, STARE's
gzip files, polygon_json manifests (bad JSON, bad polygons, paths that leave the dataset folder), parquet
manifests, degenerate ground truth (empty or full masks) and ``raysys data synth-folder`` misuse."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from raysys.testing.faults.builders import cfg, truncate
from raysys.testing.faults.harness import Case, World


def _drive(edit: Callable[[Path], None], *overrides: str, cmd: str = "data preview") -> Callable:
    """A DRIVE folder broken by ``edit``, then ``raysys <cmd> data.kind=drive data.root=...``."""

    def argv(w: World) -> list[str]:
        root = w.drive()
        edit(root)
        return [*cmd.split(), *w.run("data.kind=drive", f"data.root={root}", *overrides)]

    return argv


def _train_img(root: Path, n: int = 21) -> Path:
    return root / "training" / "images" / f"{n}_training.tif"


def _train_gt(root: Path, n: int = 21) -> Path:
    return root / "training" / "1st_manual" / f"{n}_manual1.gif"


def _write_gif(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _manifest(entries: list[dict], *overrides: str, cmd: str = "data preview") -> Callable:
    """A polygon_json folder (one 64x64 PNG image + annotations.json with ``entries``)."""

    def argv(w: World) -> list[str]:
        root = w.root / "poly"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "images" / "a.png")
        (root / "annotations.json").write_text(json.dumps(entries))
        return [*cmd.split(), *w.run("data.kind=polygon_json", f"data.root={root}", *overrides)]

    return argv


_POLY = [[4, 4, 60, 4, 60, 8, 4, 8]]


def _empty_masks(root: Path) -> None:
    for p in root.rglob("*_manual1.gif"):
        _write_gif(p, np.zeros(Image.open(p).size[::-1], np.uint8))


def _empty_one(root: Path) -> None:
    p = _train_gt(root)
    _write_gif(p, np.zeros(Image.open(p).size[::-1], np.uint8))


def _full_masks(root: Path) -> None:
    for p in root.rglob("*_manual1.gif"):
        _write_gif(p, np.full(Image.open(p).size[::-1], 255, np.uint8))


def _resize_image(root: Path) -> None:
    Image.open(_train_img(root)).resize((300, 300)).save(_train_img(root))


def _stare_gz_garbage(w: World) -> list[str]:
    from envs.folders import write_dataset_folder

    root = write_dataset_folder("stare", w.root / "stare", n_train=1, n_test=0, seed=0)
    first = sorted((root / "stare-images").iterdir())[0]
    first.write_bytes(gzip.compress(b"P6 not a ppm"))
    return ["data", "preview", *w.run("data.kind=stare", f"data.root={root}")]


def _symlink_manifest(w: World) -> list[str]:
    """An image inside the dataset folder that is a link to a file outside it."""
    argv = _manifest([{"image": "images/link.png", "mask": _POLY}])(w)
    outside = w.root / "elsewhere.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(outside)
    (w.root / "poly" / "images" / "link.png").symlink_to(outside)
    return argv


def _mixed_sizes(w: World) -> list[str]:
    """Images of different sizes in one split: evaluated one by one, at their own size."""
    argv = _manifest(
        [{"image": "a.png", "mask": _POLY}, {"image": "b.png", "mask": _POLY}], cmd="eval --split train"
    )(w)
    Image.fromarray(np.full((80, 96, 3), 90, np.uint8)).save(w.root / "poly" / "images" / "b.png")
    return argv


def _bad_manifest(w: World, text: str) -> list[str]:
    argv = _manifest([])(w)
    (w.root / "poly" / "annotations.json").write_text(text)
    return argv


def _parquet(w: World, content: bytes | None) -> list[str]:
    """A parquet manifest: ``content`` bytes as the file, or (None) a valid table without image columns."""
    root = w.root / "pq"
    root.mkdir()
    if content is None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": ["a"], "mask_path": ["m.png"]}), root / "manifest.parquet")
    else:
        (root / "manifest.parquet").write_bytes(content)
    return ["data", "preview", *w.run("data.kind=parquet", f"data.root={root}")]


# data: clear errors naming the file, loud warnings for degenerate ground truth
CASES: list[Case] = [
    Case(
        "data-root-missing",
        "data",
        cfg("data.kind=drive", "data.root=/nonexistent/drive", cmd="data preview"),
        2,
        r"/nonexistent/drive",
    ),
    Case("data-root-unset", "data", cfg("data.kind=drive", cmd="data preview"), 2, r"data\.root"),
    Case(
        "data-root-empty-folder",
        "data",
        lambda w: ["data", "preview", *w.run("data.kind=drive", f"data.root={w.root}")],
        2,
        r"(?i)does not hold a drive dataset",
    ),
    Case(
        "data-root-is-a-file",
        "data",
        lambda w: ["data", "preview", *w.run("data.kind=drive", f"data.root={w.file('x.txt', 'x')}")],
        2,
        r"x\.txt",
    ),
    Case(
        "data-corrupt-image",
        "data",
        _drive(lambda r: _train_img(r).write_bytes(b"not a tiff")),
        2,
        r"21_training\.tif",
    ),
    Case("data-truncated-image", "data", _drive(lambda r: truncate(_train_img(r))), 2, r"21_training\.tif"),
    Case(
        "data-zero-byte-image",
        "data",
        _drive(lambda r: _train_img(r).write_bytes(b"")),
        2,
        r"21_training\.tif",
    ),
    Case(
        "data-corrupt-mask",
        "data",
        _drive(lambda r: _train_gt(r).write_bytes(b"GIF89a garbage")),
        2,
        r"21_manual1\.gif",
    ),
    Case(
        "data-mask-size-mismatch",
        "data",
        _drive(lambda r: _write_gif(_train_gt(r), np.zeros((100, 100)))),
        2,
        r"21_manual1\.gif.*584",
    ),
    Case("data-image-resized", "data", _drive(_resize_image), 2, r"21_training\.tif|21_manual1\.gif"),
    Case(
        "data-missing-mask",
        "data",
        _drive(lambda r: _train_gt(r).unlink()),
        2,
        r"missing vessel mask .*21_training\.tif.*expected .*21_manual1\.gif",
    ),
    Case("data-stare-corrupt-gz", "data", _stare_gz_garbage, 2, r"im0001\.ppm\.gz"),
    Case(
        "data-empty-masks-eval",
        "data",
        _drive(_empty_masks, "data.scale=0.25", "eval.window=0", cmd="eval --split train"),
        2,
        r"none of the 2 labelled images has a vessel pixel",
    ),
    Case(
        "data-one-empty-mask-eval",
        "data",
        _drive(_empty_one, "data.scale=0.25", "eval.window=0", cmd="eval --split train"),
        0,
        r"WARNING.*no vessel pixel.*\(21_training\)",
    ),
    Case(
        "data-full-masks-eval",
        "data",
        _drive(_full_masks, "data.scale=0.25", "eval.window=0", cmd="eval --split train"),
        0,
        r"WARNING.*invert",
    ),
    Case(
        "data-val-fraction-leaves-nothing",
        "data",
        _drive(lambda r: None, "data.val_fraction=0.9", cmd="data preview"),
        2,
        r"val_fraction",
    ),
    Case(
        "data-split-empty",
        "data",
        _drive(lambda r: shutil.rmtree(r / "test"), cmd="data preview --split test"),
        2,
        r"test",
    ),
    Case(
        "data-manifest-dotdot",
        "security",
        _manifest([{"image": "../../../../etc/passwd", "mask": _POLY}]),
        2,
        r"passwd|outside",
    ),
    Case(
        "data-manifest-absolute",
        "security",
        _manifest([{"image": "images/a.png", "mask": "/etc/hostname"}]),
        2,
        r"outside the dataset folder",
    ),
    Case(
        "data-manifest-symlink-out",
        "security",
        lambda w: _symlink_manifest(w),
        2,
        r"outside the dataset folder",
    ),
    Case(
        "data-manifest-outside-opt-in",
        "data",
        _manifest([{"image": "images/a.png", "mask": _POLY}], "data.allow_outside_root=true"),
        0,
        r"wrote .*png",
    ),
    Case("data-manifest-bad-json", "data", lambda w: _bad_manifest(w, "{not json"), 2, r"annotations\.json"),
    Case("data-manifest-empty-list", "data", lambda w: _bad_manifest(w, "[]"), 2, r"non-empty"),
    Case("data-manifest-no-image-key", "data", _manifest([{"mask": _POLY}]), 2, r"entry 0 needs an 'image'"),
    Case(
        "data-manifest-bad-polygon",
        "data",
        _manifest([{"image": "a.png", "mask": [[1, 2, 3]]}]),
        2,
        r"polygon 0",
    ),
    Case(
        "data-manifest-nan-polygon",
        "data",
        _manifest([{"image": "a.png", "mask": [[1, 2, 3, "x", 5, 6]]}]),
        2,
        r"polygon 0",
    ),
    Case(
        "data-manifest-bad-split",
        "data",
        _manifest([{"image": "a.png", "mask": _POLY, "split": "dev"}]),
        2,
        r"split 'dev'",
    ),
    Case("data-manifest-image-missing", "data", _manifest([{"image": "b.png", "mask": _POLY}]), 2, r"b\.png"),
    Case("data-parquet-corrupt", "data", lambda w: _parquet(w, b"PAR1 garbage"), 2, r"manifest\.parquet"),
    Case("data-parquet-no-image-column", "data", lambda w: _parquet(w, None), 2, r"image_path"),
    Case("data-mixed-sizes", "data", _mixed_sizes, 0, r"2 train images at threshold"),
    Case(
        "data-synth-folder-not-empty",
        "data",
        lambda w: ["data", "synth-folder", "--layout", "drive", "--out", str(w.drive())],
        2,
        r"not empty|exists",
    ),
    Case(
        "data-synth-folder-bad-layout",
        "data",
        lambda w: ["data", "synth-folder", "--layout", "kaggle", "--out", str(w.root / "k")],
        2,
        r"kaggle",
    ),
    Case(
        "data-synth-folder-negative-count",
        "data",
        lambda w: [
            "data",
            "synth-folder",
            "--layout",
            "drive",
            "--n-train",
            "-1",
            "--out",
            str(w.root / "k"),
        ],
        2,
        r"n.train",
    ),
]


def _parquet_rows(columns: dict[str, list]) -> Callable:
    """A parquet manifest with the given columns next to a 64x64 image ``a.png`` and its mask ``m.png``."""

    def argv(w: World) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        root = w.root / "pq"
        root.mkdir()
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "a.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "m.png")
        pq.write_table(pa.table(columns), root / "manifest.parquet")
        return ["data", "preview", *w.run("data.kind=parquet", f"data.root={root}")]

    return argv


def _small_image(h: int, w_: int, polygon: list[float]) -> Callable:
    def argv(w: World) -> list[str]:
        root = w.root / "poly"
        (root / "images").mkdir(parents=True)
        Image.fromarray(np.full((h, w_, 3), 90, np.uint8)).save(root / "images" / "a.png")
        (root / "annotations.json").write_text(json.dumps([{"image": "images/a.png", "mask": [polygon]}]))
        return ["data", "preview", *w.run("data.kind=polygon_json", f"data.root={root}")]

    return argv


def _drive_tiny_image(root: Path) -> None:
    Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(_train_img(root))


# values that decoded to something else than the user meant (silent before), and cells of the wrong type
CASES += [
    Case(
        "data-parquet-int-image-path",
        "data",
        _parquet_rows({"id": ["a"], "image_path": [3], "mask_path": ["m.png"]}),
        2,
        r"manifest\.parquet: row 0 image_path must be a file path \(text\), got 3",
    ),
    Case(
        "data-parquet-float-mask-path",
        "data",
        _parquet_rows({"id": ["a"], "image_path": ["a.png"], "mask_path": [1.5]}),
        2,
        r"row 0 mask_path must be a file path",
    ),
    Case(
        "data-parquet-nan-ids",
        "data",
        _parquet_rows({"id": [float("nan")] * 2, "image_path": ["a.png"] * 2, "mask_path": ["m.png"] * 2}),
        2,
        r"manifest\.parquet: row 0: id is nan",
    ),
    Case("data-image-1x1", "data", _small_image(1, 1, [0, 0, 1, 0, 1, 1]), 2, r"a\.png is 1x1 pixels"),
    Case("data-image-thin-strip", "data", _small_image(8, 200, [0, 0, 9, 0, 9, 5]), 2, r"a\.png is 200x8"),
    Case("data-drive-thumbnail", "data", _drive(_drive_tiny_image), 2, r"21_training\.tif is 24x20 pixels"),
    Case(
        "data-polygon-right-of-image",
        "data",
        _small_image(64, 64, [100, 10, 200, 10, 200, 40]),
        2,
        r"lie entirely outside its 64x64",
    ),
    Case(
        "data-polygon-negative-coordinates",
        "data",
        _small_image(64, 64, [-50, -50, -10, -50, -10, -10]),
        2,
        r"lie entirely outside",
    ),
]
