"""Dataset loaders on fake folders with the real file names, formats and layouts (tiny images)."""

from __future__ import annotations

import gzip
import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from envs.datasets import DatasetError, VesselDataset, load_dataset
from envs.io import binarise, estimate_fov, read_mask, read_rgb
from envs.types import DEFAULT_PROMPT, VesselSample

pytestmark = pytest.mark.unit

H, W = 32, 40  # real images are 584x565 .. 2048x2048; loaders must not care


# --------------------------------------------------------------------------- fake-file writers


def _disk(h: int = H, w: int = W) -> np.ndarray:
    """The fake field of view: a centred disk touching neither corner."""
    yy, xx = np.mgrid[:h, :w]
    return (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= (min(h, w) / 2 - 2) ** 2


def _vessels(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A distinct vessel pattern per image (a row and a column line plus noise inside the FOV)."""
    rng = np.random.default_rng(seed)
    m = rng.random((h, w)) < 0.05
    m[h // 2 + seed % 5, 4:-4] = True
    m[4:-4, w // 3 + seed % 7] = True
    return m & _disk(h, w)


def _fundus(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """RGB: red retina inside the disk, black surround, darker vessels."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[_disk(h, w)] = (180 + seed % 40, 90, 40)
    img[_vessels(seed, h, w)] = (110, 40, 20)
    return img


def _save_rgb(path: Path, seed: int, **kw: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # JPEGs at quality 95 like the real downloads; PIL's default 75 rings 3 px wide at this tiny size.
    opts = {"quality": 95} if path.suffix.lower() == ".jpg" else {}
    Image.fromarray(_fundus(seed, **kw)).save(path, **opts)  # type: ignore[arg-type]


def _save_mask(path: Path, mask: np.ndarray, mode: str = "L") -> None:
    """Write a mask in one of the real encodings: L 0/255, palette GIF, 1-bit, RGB 0/255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m8 = mask.astype(np.uint8)
    if mode == "P":  # DRIVE-style palette GIF: index 1 is white
        img = Image.fromarray(m8, mode="L").convert("P")
        img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    elif mode == "1":
        img = Image.fromarray(m8 * 255, mode="L").convert("1")
    elif mode == "RGB":
        img = Image.fromarray(np.repeat(m8[:, :, None] * 255, 3, axis=2))
    else:
        img = Image.fromarray(m8 * 255, mode="L")
    img.save(path)


def _gz_ppm(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PPM")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(buf.getvalue()))


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_drive(root: Path, *, test_labels: bool = True) -> Path:
    for part, tag, nums in (("training", "training", range(21, 41)), ("test", "test", range(1, 21))):
        for n in nums:
            _save_rgb(root / part / "images" / f"{n:02d}_{tag}.tif", n)
            if part == "training" or test_labels:
                _save_mask(root / part / "1st_manual" / f"{n:02d}_manual1.gif", _vessels(n), mode="P")
            _save_mask(root / part / "mask" / f"{n:02d}_{tag}_mask.gif", _disk())
    return root


# The 20 STARE images that carry vessel labels.
STARE_IDS = [1, 2, 3, 4, 5, 44, 77, 81, 82, 139, 162, 163, 235, 236, 239, 240, 255, 291, 319, 324]


def make_stare(root: Path) -> Path:
    for n in STARE_IDS:
        _gz_ppm(root / "stare-images" / f"im{n:04d}.ppm.gz", _fundus(n))
        ah = _vessels(n)
        vk = ah.copy()
        vk[H // 2 - 3, 2:-2] = True  # the second observer labels more
        for ann, m in (("ah", ah), ("vk", vk)):
            _gz_ppm(
                root / f"labels-{ann}" / f"im{n:04d}.{ann}.ppm.gz",
                np.repeat(m[:, :, None] * 255, 3, 2).astype(np.uint8),
            )
    return root


def make_chase(root: Path) -> Path:
    for child in range(1, 15):
        for eye in "LR":
            seed = 2 * child + (eye == "R")
            name = f"Image_{child:02d}{eye}"
            _save_rgb(root / f"{name}.jpg", seed)
            _save_mask(root / f"{name}_1stHO.png", _vessels(seed))
            _save_mask(root / f"{name}_2ndHO.png", _vessels(seed + 100), mode="1")
    return root


def make_hrf(root: Path) -> Path:
    for n in range(1, 16):
        for k, cat in enumerate(("h", "dr", "g")):
            seed = 3 * n + k
            ext = ".JPG" if cat == "dr" else ".jpg"  # the real download mixes the case
            _save_rgb(root / "images" / f"{n:02d}_{cat}{ext}", seed)
            _save_mask(root / "manual1" / f"{n:02d}_{cat}.tif", _vessels(seed))
            _save_mask(root / "mask" / f"{n:02d}_{cat}_mask.tif", _disk())
    return root


def make_fives(root: Path) -> Path:
    for part, gt, n in (("train", "Ground truth", 6), ("test", "Groud truth", 2)):
        for i in range(1, n + 1):
            name = f"{i}_{'ADGN'[i % 4]}.png"
            _save_rgb(root / part / "Original" / name, i)
            _save_mask(root / part / gt / name, _vessels(i), mode="RGB")
    return root


def _ids(ds: object) -> list[str]:
    assert isinstance(ds, VesselDataset)
    return ds.ids


def _check_sample(s: VesselSample, *, seed: int, fov: np.ndarray | None = None) -> None:
    assert s.image.dtype == np.uint8 and s.image.shape == (H, W, 3)
    assert s.mask.dtype == np.bool_ and s.has_mask
    np.testing.assert_array_equal(s.mask, _vessels(seed))
    np.testing.assert_array_equal(s.fov, _disk() if fov is None else fov)
    assert s.prompts == (DEFAULT_PROMPT,)


# --------------------------------------------------------------------------- DRIVE


def test_drive_official_split_masks_and_fov(tmp_path: Path) -> None:
    root = make_drive(tmp_path / "DRIVE")
    train, test = load_dataset("drive", root, "train"), load_dataset("DRIVE", root, "test")
    assert _ids(train) == [f"{n}_training" for n in range(21, 41)]
    assert _ids(test) == [f"{n:02d}_test" for n in range(1, 21)]
    assert len(load_dataset("drive", root, "all")) == 40
    _check_sample(train[0], seed=21)
    _check_sample(test[-1], seed=20)
    np.testing.assert_array_equal(train[0].image, _fundus(21))  # .tif is lossless


def test_drive_accepts_the_unzipped_parent_folder(tmp_path: Path) -> None:
    make_drive(tmp_path / "download" / "DRIVE")
    assert len(load_dataset("drive", tmp_path / "download", "test")) == 20


def test_drive_without_test_labels_loads_unlabelled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_drive(tmp_path, test_labels=False)
    with caplog.at_level(logging.WARNING, logger="envs.datasets"):
        test = load_dataset("drive", root, "test")
    assert "20 of 20 images have no test label" in caplog.text
    s = test[3]
    assert not s.has_mask and not s.mask.any() and s.mask.shape == (H, W)
    assert load_dataset("drive", root, "train")[0].has_mask


def test_drive_val_is_carved_from_the_tail_of_train(tmp_path: Path) -> None:
    root = make_drive(tmp_path)
    train = load_dataset("drive", root, "train", val_fraction=0.2)
    val = load_dataset("drive", root, "val", val_fraction=0.2)
    assert _ids(val) == ["37_training", "38_training", "39_training", "40_training"]
    assert len(train) == 16 and not set(_ids(train)) & set(_ids(val))
    assert len(load_dataset("drive", root, "all", val_fraction=0.2)) == 40
    # The test split is never touched by val_fraction (it is listed alone, without train).
    test = load_dataset("drive", root, "test", val_fraction=0.2)
    assert _ids(test) == _ids(load_dataset("drive", root, "test")) and len(test) == 20
    with pytest.raises(DatasetError, match="val_fraction"):
        load_dataset("drive", root, "val")
    with pytest.raises(DatasetError, match="leaving none"):
        load_dataset("drive", root, "val", val_fraction=0.99)


def test_drive_missing_train_mask_names_the_expected_file(tmp_path: Path) -> None:
    root = make_drive(tmp_path)
    (root / "training" / "1st_manual" / "23_manual1.gif").unlink()
    with pytest.raises(DatasetError, match=r"23_training\.tif.*training/1st_manual/23_manual1\.gif"):
        load_dataset("drive", root, "train")


def test_drive_empty_images_folder_names_folder_and_layout(tmp_path: Path) -> None:
    (tmp_path / "training" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError) as err:
        load_dataset("drive", tmp_path, "train")
    msg = str(err.value)
    assert str(tmp_path / "training" / "images") in msg and "21_training.tif" in msg


def test_drive_missing_test_folder_only_matters_for_test(tmp_path: Path) -> None:
    root = make_drive(tmp_path)
    import shutil

    shutil.rmtree(root / "test")
    assert len(load_dataset("drive", root, "train")) == 20
    with pytest.raises(DatasetError, match=r"missing folder .*test/images"):
        load_dataset("drive", root, "test")


def test_mask_size_mismatch_names_both_files_in_wxh(tmp_path: Path) -> None:
    root = make_drive(tmp_path)
    _save_mask(root / "training" / "1st_manual" / "21_manual1.gif", np.zeros((30, 41), bool), mode="P")
    ds = load_dataset("drive", root, "train")  # listing is fine; pixels are checked on access
    with pytest.raises(
        DatasetError, match=r"mask .*21_manual1\.gif is 41x30 but image 21_training\.tif is 40x32"
    ):
        ds[0]
    _check_sample(ds[1], seed=22)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = make_drive(tmp_path)
    bad = root / "training" / "images" / "21_training.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(DatasetError, match=rf"cannot read image {bad}: "):
        load_dataset("drive", root, "train")[0]


def test_missing_fov_mask_falls_back_to_estimation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_drive(tmp_path)
    (root / "training" / "mask" / "21_training_mask.gif").unlink()
    with caplog.at_level(logging.WARNING, logger="envs.datasets"):
        s = load_dataset("drive", root, "train")[0]
    assert "FOV mask" in caplog.text and "21_training_mask.gif" in caplog.text
    np.testing.assert_array_equal(s.fov, _disk())


# --------------------------------------------------------------------------- STARE, CHASE_DB1, HRF, FIVES


def test_stare_ten_ten_split_gz_ppm_and_annotators(tmp_path: Path) -> None:
    root = make_stare(tmp_path)
    train, test = load_dataset("stare", root, "train"), load_dataset("stare", root, "test")
    assert _ids(train) == [f"im{n:04d}" for n in STARE_IDS[:10]]
    assert _ids(test) == [f"im{n:04d}" for n in STARE_IDS[10:]]
    _check_sample(train[0], seed=1)  # FOV estimated from the image equals the disk
    vk = load_dataset("stare", root, "train", annotator="vk")[0]
    assert vk.mask.sum() > train[0].mask.sum()
    np.testing.assert_array_equal(vk.image, train[0].image)


def test_stare_unlabelled_extra_images_are_skipped_but_missing_labels_fail(tmp_path: Path) -> None:
    root = make_stare(tmp_path)
    (root / "labels-ah" / "im0044.ah.ppm.gz").unlink()
    with pytest.raises(DatasetError, match=r"im0044\.ppm\.gz.*labels-ah/im0044\.ah\.ppm\.gz"):
        load_dataset("stare", root, "train")
    for n in range(400, 403):  # the full download: more than 20 images, only 20 labelled
        _gz_ppm(root / "stare-images" / f"im{n:04d}.ppm.gz", _fundus(n))
    assert len(load_dataset("stare", root, "all", annotator="vk")) == 20
    with pytest.raises(DatasetError, match="annotator"):
        load_dataset("stare", root, annotator="xx")


def test_chase_first_ten_children_train(tmp_path: Path) -> None:
    root = make_chase(tmp_path)
    train, test = load_dataset("chase_db1", root, "train"), load_dataset("chase", root, "test")
    assert len(train) == 20 and len(test) == 8
    assert _ids(test) == [f"Image_{c}{e}" for c in range(11, 15) for e in "LR"]
    assert all(int(i[6:8]) <= 10 for i in _ids(train))
    s = train[0]  # Image_01L, seed 2; JPEG so compare masks exactly but the image loosely
    np.testing.assert_array_equal(s.mask, _vessels(2))
    assert np.abs(s.image.astype(int) - _fundus(2)).mean() < 10
    # FOV estimated through JPEG ringing: at most a 1 px halo here, negligible on 960x999 originals.
    assert (s.fov >= _disk()).all() and (s.fov <= binary_dilation(_disk())).all()
    second = load_dataset("CHASE_DB1", root, "train", annotator="2ndHO")[0]
    np.testing.assert_array_equal(second.mask, _vessels(102))  # 1-bit PNG


def test_chase_missing_annotation_names_expected_file(tmp_path: Path) -> None:
    root = make_chase(tmp_path)
    (root / "Image_12R_1stHO.png").unlink()
    with pytest.raises(DatasetError, match=r"Image_12R_1stHO\.png"):
        load_dataset("chase_db1", root, "test")


def test_hrf_split_mixed_case_extensions_and_fov_files(tmp_path: Path) -> None:
    root = make_hrf(tmp_path)
    train, test = load_dataset("hrf", root, "train"), load_dataset("hrf", root, "test")
    assert len(train) == 15 and len(test) == 30
    assert {i[:2] for i in _ids(train)} == {f"{n:02d}" for n in range(1, 6)}
    assert "06_dr" in _ids(test)
    s = train[_ids(train).index("01_dr")]  # read from 01_dr.JPG
    np.testing.assert_array_equal(s.mask, _vessels(4))
    np.testing.assert_array_equal(s.fov, _disk())


def test_hrf_without_some_labels_is_refused_naming_them_unless_skipping_is_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_hrf(tmp_path)
    for stem in ("11_h", "12_h", "13_h"):  # as in the public HRF copies
        (root / "manual1" / f"{stem}.tif").unlink()
    with pytest.raises(
        DatasetError,
        match=r"3 of 45 images have no vessel mask.*11_h\.tif.*12_h\.tif.*13_h\.tif.*skip_unlabelled",
    ):
        load_dataset("hrf", root, "test")
    with caplog.at_level("WARNING"):
        test = load_dataset("hrf", root, "test", skip_unlabelled=True)
    assert len(test) == 27 and not {"11_h", "12_h", "13_h"} & set(_ids(test))
    assert "3 of 45 images have no vessel mask" in caplog.text
    assert len(load_dataset("hrf", root, "train", skip_unlabelled=True)) == 15


def test_fives_official_folders_misspelt_gt_and_rgb_masks(tmp_path: Path) -> None:
    root = make_fives(tmp_path)
    train, test = load_dataset("fives", root, "train"), load_dataset("fives", root, "test")
    assert _ids(train) == [f"train_{i}_{'ADGN'[i % 4]}" for i in range(1, 7)]
    assert _ids(test) == ["test_1_D", "test_2_G"]  # "Groud truth" folder
    _check_sample(train[1], seed=2)
    assert len(load_dataset("fives", root, "all")) == 8


# --------------------------------------------------------------------------- polygon JSON


def _write_json(root: Path, entries: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotations.json").write_text(json.dumps(entries))
    return root


def test_polygon_json_rasterises_squares_and_carries_prompts(tmp_path: Path) -> None:
    _save_rgb(tmp_path / "images" / "a.png", 1)
    _save_rgb(tmp_path / "b.jpg", 2)
    square = [2, 2, 12, 2, 12, 12, 2, 12]  # corners inclusive -> 11 x 11 pixels
    root = _write_json(
        tmp_path,
        [
            {"image": "a.png", "mask": [square], "text": ["find vessels", "segment arteries"]},
            {"image": "b.jpg", "mask": [square, [30, 20, 35, 20, 35, 25]], "text": [], "split": "test"},
        ],
    )
    train = load_dataset("polygon_json", root, "train")
    a = train[0]
    assert _ids(train) == ["a"] and a.prompts == ("find vessels", "segment arteries")
    assert a.mask.sum() == 121 and a.mask[2:13, 2:13].all()
    assert a.fov.all() and a.has_mask
    b = load_dataset("polygon_json", root / "annotations.json", "test")[0]
    assert b.prompt == DEFAULT_PROMPT and b.mask.sum() > 121
    assert len(load_dataset("polygon_json", root, "all")) == 2


def test_polygon_json_without_split_field_is_all_train(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _save_rgb(tmp_path / name, 0)
    root = _write_json(tmp_path, [{"image": n, "mask": []} for n in ("a.png", "b.png", "c.png")])
    assert _ids(load_dataset("polygon_json", root, "train")) == ["a", "b", "c"]
    assert _ids(load_dataset("polygon_json", root, "val", val_fraction=0.34)) == ["c"]
    with pytest.raises(DatasetError, match=r"split 'test' .* is empty"):
        load_dataset("polygon_json", root, "test")


@pytest.mark.parametrize("poly", [[1, 1, 5, 5], [1, 1, 5, 5, 9], []])
def test_polygon_with_fewer_than_three_points_names_file_entry_and_polygon(
    tmp_path: Path, poly: list
) -> None:
    _save_rgb(tmp_path / "a.png", 0)
    _save_rgb(tmp_path / "b.png", 0)
    square = [2, 2, 12, 2, 12, 12, 2, 12]
    root = _write_json(
        tmp_path, [{"image": "a.png", "mask": [square]}, {"image": "b.png", "mask": [square, poly]}]
    )
    with pytest.raises(DatasetError) as err:
        load_dataset("polygon_json", root)
    msg = str(err.value)
    assert "annotations.json" in msg and "entry 1" in msg and "'b.png'" in msg and "polygon 1" in msg


def test_polygon_json_missing_image_names_both_places_looked(tmp_path: Path) -> None:
    root = _write_json(tmp_path, [{"image": "gone.png", "mask": []}])
    with pytest.raises(DatasetError, match=r"gone\.png.*images/gone\.png"):
        load_dataset("polygon_json", root)


@pytest.mark.parametrize("escape", ["../outside.png", "ABSOLUTE"])
def test_manifest_paths_outside_the_dataset_folder_are_refused(tmp_path: Path, escape: str) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _save_rgb(tmp_path / "outside.png", 0)
    name = str(tmp_path / "outside.png") if escape == "ABSOLUTE" else escape
    root = _write_json(tmp_path / "ds", [{"image": name, "mask": []}])
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        load_dataset("polygon_json", root)
    assert load_dataset("polygon_json", root, allow_outside_root=True)[0].image.shape[-1] == 3
    pq.write_table(pa.table({"image_path": [name]}), root / "manifest.parquet")
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        load_dataset("parquet", root)
    assert len(load_dataset("parquet", root, allow_outside_root=True)) == 1


# --------------------------------------------------------------------------- parquet


def test_parquet_with_path_and_bytes_columns(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _save_rgb(tmp_path / "imgs" / "p0.png", 0)
    _save_mask(tmp_path / "imgs" / "p0_mask.png", _vessels(0))
    table = pa.table(
        {
            "id": ["p0", "b1", "u2"],
            "image_path": ["imgs/p0.png", None, None],
            "image_bytes": [None, _png_bytes(_fundus(1)), _png_bytes(_fundus(2))],
            "mask_path": ["imgs/p0_mask.png", None, None],
            "mask_bytes": [None, _png_bytes(_vessels(1).astype(np.uint8) * 255), None],
            "fov_bytes": [None, _png_bytes(_disk().astype(np.uint8)), None],
            "split": ["train", "train", "test"],
            "prompt": ["custom prompt", None, None],
        }
    )
    pq.write_table(table, tmp_path / "manifest.parquet")
    train = load_dataset("parquet", tmp_path, "train")
    assert _ids(train) == ["p0", "b1"]
    p0, b1 = train[0], train[1]
    np.testing.assert_array_equal(p0.mask, _vessels(0))
    assert p0.prompts == ("custom prompt",) and p0.fov.all()
    np.testing.assert_array_equal(b1.image, _fundus(1))
    np.testing.assert_array_equal(b1.mask, _vessels(1))  # 0/1 PNG: "nonzero" rule
    np.testing.assert_array_equal(b1.fov, _disk())
    u2 = load_dataset("parquet", tmp_path / "manifest.parquet", "test")[0]
    assert not u2.has_mask and not u2.mask.any()
    # The dataset pickles without its cache (bytes stay in Arrow) and reloads the same pixels.
    again = pickle.loads(pickle.dumps(train))
    np.testing.assert_array_equal(again[1].image, b1.image)


def test_parquet_missing_path_names_manifest_row_and_file(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"image_path": ["nope.png"]}), tmp_path / "m.parquet")
    with pytest.raises(DatasetError, match=r"m\.parquet: row 0 image_path 'nope\.png' does not exist"):
        load_dataset("parquet", tmp_path / "m.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match=r"bad\.parquet needs an 'image_path' or 'image_bytes'"):
        load_dataset("parquet", tmp_path / "bad.parquet")


def test_parquet_corrupt_image_bytes_name_the_row(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"image_bytes": [b"garbage"]}), tmp_path / "m.parquet")
    ds = load_dataset("parquet", tmp_path / "m.parquet")
    with pytest.raises(DatasetError, match=r"cannot read image m\.parquet row 0 image_bytes"):
        ds[0]


# --------------------------------------------------------------------------- entry point and sequence


def test_unknown_kind_split_and_kwargs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset kind 'ixi'.*drive.*fives.*parquet"):
        load_dataset("ixi", tmp_path)
    root = make_chase(tmp_path)
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_dataset("chase", root, "dev")
    with pytest.raises(TypeError, match=r"colour.*annotator"):
        load_dataset("chase", root, colour="red")
    with pytest.raises(TypeError, match="annotator"):
        load_dataset("drive", root, annotator="1stHO")
    with pytest.raises(DatasetError, match="needs root"):
        load_dataset("hrf")
    with pytest.raises(DatasetError, match="is not a folder"):
        load_dataset("hrf", tmp_path / "nowhere")


def test_sequence_protocol_cache_and_pickle(tmp_path: Path) -> None:
    root = make_chase(tmp_path)
    ds = load_dataset("chase", root, "test", cache_size=2)
    assert isinstance(ds, VesselDataset) and len(ds) == 8
    assert ds[0] is ds[0]  # cached
    assert ds[-1].id == "Image_14R" and [s.id for s in ds[2:4]] == ["Image_12L", "Image_12R"]
    assert sum(1 for _ in ds) == 8
    with pytest.raises(IndexError):
        ds[8]
    uncached = load_dataset("chase", root, "test", cache_size=0)
    assert uncached[0] is not uncached[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.ids == ds.ids
    np.testing.assert_array_equal(clone[0].mask, ds[0].mask)


def test_synthetic_kind() -> None:
    pytest.importorskip("envs.synthetic")
    ds = load_dataset("synthetic", root=None, split="train", n=3, size=64, seed=0)
    assert len(ds) == 3
    s = ds[0]
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8 and s.mask.shape == (64, 64)
    with pytest.raises(DatasetError, match="root=None"):
        load_dataset("synthetic", root="/data", n=3)
    with pytest.raises(TypeError, match="annotator"):
        load_dataset("synthetic", annotator="ah")
    with pytest.raises(TypeError, match="val_fraction"):
        load_dataset("synthetic", val_fraction=0.2)


# --------------------------------------------------------------------------- io helpers


def test_read_rgb_handles_wide_grey_palette_and_alpha(tmp_path: Path) -> None:
    grey16 = np.array([[0, 257 * 100], [65535, 257]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.tif")
    out = read_rgb(tmp_path / "g16.tif")
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[:, :, 0], [[0, 100], [255, 1]])
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert read_rgb(tmp_path / "a.png")[0, 0].tolist() == [200, 0, 0]
    Image.fromarray(_fundus(3)).convert("P").save(tmp_path / "p.gif")
    assert read_rgb(tmp_path / "p.gif").shape == (H, W, 3)
    assert read_rgb(_png_bytes(np.full((4, 5), 9, np.uint8))).shape == (4, 5, 3)


def test_mask_binarisation_rules(tmp_path: Path) -> None:
    np.testing.assert_array_equal(binarise(np.array([[0, 127, 128, 255]], np.uint8)), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(binarise(np.array([[0, 1]], np.uint8)), [[0, 1]])  # 0/1 masks
    np.testing.assert_array_equal(binarise(np.array([[0, 200, 40000]], np.uint16)), [[0, 0, 1]])
    rgb = np.zeros((1, 2, 3), np.uint8)
    rgb[0, 1, 0] = 255  # a pure-red label still counts
    np.testing.assert_array_equal(binarise(rgb), [[0, 1]])
    _save_mask(tmp_path / "m.gif", _vessels(5), mode="P")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.gif"), _vessels(5))
    with pytest.raises(DatasetError, match=r"cannot read mask .*missing\.png"):
        read_mask(tmp_path / "missing.png")


def test_estimate_fov_fills_dark_lesions_and_drops_specks() -> None:
    img = _fundus(0)
    img[14:18, 18:22] = 0  # a dark lesion inside the FOV
    img[0, 0] = (255, 255, 255)  # a bright speck outside
    np.testing.assert_array_equal(estimate_fov(img), _disk())
    assert estimate_fov(np.zeros((3, 4, 3), np.uint8)).all()
