"""Synthetic dataset folders in the real layouts, read back through ``envs.datasets.load_dataset``."""

from __future__ import annotations

import functools
import gzip
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import envs.folders as folders
from envs.datasets import load_dataset
from envs.folders import LAYOUTS, iter_folder_samples, layout_spec, write_dataset_folder
from envs.types import VesselSample

pytestmark = pytest.mark.unit

N_TRAIN, N_TEST = 2, 1


@functools.cache
def _generated(layout: str) -> tuple[tuple[str, VesselSample], ...]:
    return tuple(iter_folder_samples(layout, n_train=N_TRAIN, n_test=N_TEST))


def _expected(layout: str, split: str) -> list[VesselSample]:
    """What ``write_dataset_folder(layout, n_train=N_TRAIN, n_test=N_TEST)`` encodes for ``split``."""
    return [s for sp, s in _generated(layout) if sp == split]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset_folder(
        "drive", tmp_path_factory.mktemp("w") / "drive", n_train=N_TRAIN, n_test=N_TEST
    )


@pytest.fixture(scope="module")
def chase(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset_folder(
        "chase", tmp_path_factory.mktemp("w") / "chase", n_train=N_TRAIN, n_test=N_TEST
    )


def test_drive_has_the_real_names_formats_and_size(drive: Path) -> None:
    assert _files(drive) == {
        "training/images/21_training.tif",
        "training/images/22_training.tif",
        "training/1st_manual/21_manual1.gif",
        "training/1st_manual/22_manual1.gif",
        "training/mask/21_training_mask.gif",
        "training/mask/22_training_mask.gif",
        "test/images/01_test.tif",
        "test/1st_manual/01_manual1.gif",
        "test/mask/01_test_mask.gif",
    }
    assert not [p for p in drive.parent.iterdir() if p.name.startswith(".")], "temp folder left behind"
    for rel, fmt in (
        ("training/images/21_training.tif", "TIFF"),
        ("training/1st_manual/21_manual1.gif", "GIF"),
        ("test/mask/01_test_mask.gif", "GIF"),
    ):
        with Image.open(drive / rel) as im:
            assert (im.format, im.size) == (fmt, (565, 584))
            if fmt == "TIFF":
                assert im.mode == "RGB"
            else:  # 0/255 two-level GIF, as the real manual and FOV masks
                assert set(np.unique(np.asarray(im.convert("L")))) == {0, 255}


def test_drive_round_trips_exactly_and_the_fov_fits_the_width(drive: Path) -> None:
    for split in ("train", "test"):
        ds = load_dataset("drive", drive, split=split)
        want = _expected("drive", split)
        assert (
            ds.ids
            == [s.id for s in want]
            == (["21_training", "22_training"] if split == "train" else ["01_test"])
        )
        for got, exp in zip(ds, want, strict=True):
            assert got.image.shape == (584, 565, 3)
            np.testing.assert_array_equal(got.image, exp.image)
            np.testing.assert_array_equal(got.mask, exp.mask)
            np.testing.assert_array_equal(got.fov, exp.fov)
            assert got.has_mask and got.mask.any() and not (got.mask & ~got.fov).any()
            assert not got.fov[:, [0, -1]].any() and not got.fov[[0, -1], :].any()  # the circle is whole
            assert 0.6 < got.fov.mean() < 0.8


def test_splits_use_disjoint_seeds_and_seed_changes_pixels(drive: Path) -> None:
    train, test = load_dataset("drive", drive, split="train"), load_dataset("drive", drive, split="test")
    assert not np.array_equal(train[0].mask, train[1].mask)
    assert not np.array_equal(train[0].mask, test[0].mask)
    other = next(iter_folder_samples("drive", n_train=1, n_test=0, seed=1))[1]
    assert not np.array_equal(other.mask, train[0].mask)


def test_val_fraction_carves_the_last_training_images(drive: Path) -> None:
    assert load_dataset("drive", drive, split="val", val_fraction=0.5).ids == ["22_training"]
    assert load_dataset("drive", drive, split="train", val_fraction=0.5).ids == ["21_training"]
    np.testing.assert_array_equal(
        load_dataset("drive", drive, split="val", val_fraction=0.5)[0].mask,
        _expected("drive", "train")[1].mask,
    )


def test_chase_has_the_real_names_formats_and_size(chase: Path) -> None:
    stems = ("Image_01L", "Image_01R", "Image_11L")  # two train images = both eyes of child 01
    assert _files(chase) == {f"{s}{suffix}" for s in stems for suffix in (".jpg", "_1stHO.png", "_2ndHO.png")}
    for name, fmt in (
        ("Image_01L.jpg", "JPEG"),
        ("Image_01L_1stHO.png", "PNG"),
        ("Image_11L_2ndHO.png", "PNG"),
    ):
        with Image.open(chase / name) as im:
            assert (im.format, im.size) == (fmt, (999, 960))


def test_chase_round_trips_masks_exactly_and_pixels_approximately(chase: Path) -> None:
    for split, ids in (("train", ["Image_01L", "Image_01R"]), ("test", ["Image_11L"])):
        ds = load_dataset("chase_db1", chase, split=split)
        want = _expected("chase_db1", split)
        assert ds.ids == [s.id for s in want] == ids
        for got, exp in zip(ds, want, strict=True):
            assert got.image.shape == (960, 999, 3)
            np.testing.assert_array_equal(got.mask, exp.mask)
            diff = np.abs(got.image.astype(np.int16) - exp.image)
            assert diff.mean() < 3.0  # JPEG quality 95
            # CHASE_DB1 ships no FOV masks: the loader estimates it from the (JPEG) image.
            assert (got.fov & exp.fov).sum() / (got.fov | exp.fov).sum() > 0.995
    first = load_dataset("chase", chase, split="train")[0].mask
    second = load_dataset("chase", chase, split="train", annotator="2ndHO")[0].mask
    assert (second >= first).all() and second.sum() > first.sum()


def test_stare_round_trips_exactly(tmp_path: Path) -> None:
    out = write_dataset_folder("stare", tmp_path / "stare", n_train=N_TRAIN, n_test=0)
    assert _files(out) == {
        f"{d}/im000{i}{ext}"
        for i in (1, 2)
        for d, ext in (("stare-images", ".ppm.gz"), ("labels-ah", ".ah.ppm.gz"), ("labels-vk", ".vk.ppm.gz"))
    }
    with Image.open(io.BytesIO(gzip.decompress((out / "stare-images/im0001.ppm.gz").read_bytes()))) as im:
        assert (im.format, im.size) == ("PPM", (700, 605))
    ds = load_dataset("stare", out, split="train")
    want = [s for _, s in iter_folder_samples("stare", n_train=N_TRAIN, n_test=0)]
    assert ds.ids == [s.id for s in want] == ["im0001", "im0002"]
    for got, exp in zip(ds, want, strict=True):
        np.testing.assert_array_equal(got.image, exp.image)
        np.testing.assert_array_equal(got.mask, exp.mask)
        np.testing.assert_array_equal(got.fov, exp.fov)


def test_refuses_a_non_empty_folder_and_leaves_it_untouched(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        write_dataset_folder("drive", out, n_train=1, n_test=0)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]

    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_dataset_folder("drive", a_file, n_train=1, n_test=0)
    assert a_file.read_bytes() == b"x"


def test_an_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert write_dataset_folder("drive", out, n_train=1, n_test=0) == out
    assert load_dataset("drive", out, split="train").ids == ["21_training"]


def test_an_interrupted_write_leaves_nothing_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def failing(root: Path, split: str, sample: VesselSample) -> list[Path]:
        calls.append(sample.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return folders._write_drive(root, split, sample)

    monkeypatch.setitem(folders._WRITERS, "drive", failing)
    with pytest.raises(KeyboardInterrupt):
        write_dataset_folder("drive", tmp_path / "drive", n_train=2, n_test=0)
    assert calls == ["21_training", "22_training"]
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_fail_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown layout 'hrf'.*drive, chase_db1, stare"):
        write_dataset_folder("hrf", tmp_path / "x")
    with pytest.raises(ValueError, match=r"n_train must be an integer in 0\.\.20"):
        write_dataset_folder("drive", tmp_path / "x", n_train=21)
    with pytest.raises(ValueError, match=r"n_test must be an integer in 0\.\.8"):
        write_dataset_folder("chase_db1", tmp_path / "x", n_test=9)
    with pytest.raises(ValueError, match="at least 1"):
        write_dataset_folder("drive", tmp_path / "x", n_train=0, n_test=0)
    with pytest.raises(ValueError, match="stare: test images need all 10"):
        write_dataset_folder("stare", tmp_path / "x", n_train=3, n_test=1)
    with pytest.raises(ValueError, match="seed"):
        write_dataset_folder("drive", tmp_path / "x", seed=-1)
    assert list(tmp_path.iterdir()) == []
    assert LAYOUTS == ("drive", "chase_db1", "stare")
    assert layout_spec("CHASE").kind == "chase_db1"


def test_cli_writes_a_folder_and_reports_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from raysys.cli import main

    out = tmp_path / "drive"
    argv = ["data", "synth-folder", "--layout", "drive", "--out", str(out), "--n-train", "1", "--n-test", "0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 train + 0 test" in printed and "565x584" in printed
    assert f"data.kind=drive data.root={out.resolve()}" in printed
    assert load_dataset("drive", out, split="train").ids == ["21_training"]

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysys: error:") and str(out) in err and "\n" not in err
    assert main(["data", "synth-folder", "--layout", "nope", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown layout 'nope'" in err and "\n" not in err
