"""Synthetic fundus generator: determinism, data contract, realism statistics, dataset behaviour."""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Sequence

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label

from envs.synthetic import (
    DOMAINS,
    SPLITS,
    SyntheticFundus,
    _rasterise_trees,
    _Tree,
    generate_fundus,
    vessel_stats,
)
from envs.types import DEFAULT_PROMPT, VesselSample

pytestmark = pytest.mark.unit

SEEDS_256 = range(10)
SEEDS_512 = range(3)


@pytest.fixture(scope="module")
def samples_256() -> list[VesselSample]:
    return [generate_fundus(s, 256) for s in SEEDS_256]


@pytest.fixture(scope="module")
def stats_256(samples_256: list[VesselSample]) -> list[dict[str, float]]:
    return [vessel_stats(s) for s in samples_256]


@pytest.fixture(scope="module")
def samples_512() -> list[VesselSample]:
    return [generate_fundus(s, 512) for s in SEEDS_512]


def _local_contrast(sample: VesselSample, channel: int) -> float:
    """Mean of 1 - I / I_local_background over vessel pixels, background from nearby non-vessel pixels.

    Local, because vignetting and the bright disc make global means compare different regions.
    """
    img = sample.image[..., channel].astype(float)
    background = (sample.fov & ~ndimage.binary_dilation(sample.mask, iterations=2)).astype(float)
    den = ndimage.gaussian_filter(background, 5)
    local = ndimage.gaussian_filter(img * background, 5) / np.maximum(den, 1e-6)
    sel = sample.mask & (den > 0.2)
    return float(np.mean(1.0 - img[sel] / local[sel]))


# ---------------------------------------------------------------------------------------------
# Determinism and data contract
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_sample(samples_256: list[VesselSample]) -> None:
    again = generate_fundus(0, 256)
    assert np.array_equal(again.image, samples_256[0].image)
    assert np.array_equal(again.mask, samples_256[0].mask)
    assert np.array_equal(again.fov, samples_256[0].fov)


def test_different_seeds_give_different_images(samples_256: list[VesselSample]) -> None:
    a, b = samples_256[0], samples_256[1]
    assert not np.array_equal(a.image, b.image)
    # Different trees, not just different noise: the masks disagree on many pixels.
    assert (a.mask ^ b.mask).sum() > 0.05 * a.fov.sum()


def test_shapes_dtypes_id_and_prompt() -> None:
    s = generate_fundus(3, 128, prompt="Find the vessels.", sample_id="x-3")
    assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == s.fov.shape == (128, 128)
    assert s.mask.dtype == s.fov.dtype == np.bool_
    assert s.id == "x-3" and s.prompts == ("Find the vessels.",) and s.has_mask
    default = generate_fundus(3, 128)
    assert default.id == "synthetic-3" and default.prompt == DEFAULT_PROMPT


def test_fov_is_a_centred_disc_and_image_is_black_outside(samples_256: list[VesselSample]) -> None:
    for s in samples_256:
        fov = s.fov
        # Circular: symmetric under flips and transpose, area of a disc of diameter 0.95 W.
        assert np.array_equal(fov, fov[::-1]) and np.array_equal(fov, fov[:, ::-1])
        assert np.array_equal(fov, fov.T)
        assert fov.sum() == pytest.approx(np.pi * (0.475 * 256) ** 2, rel=0.01)
        assert fov[128, 128] and not fov[0, 0] and not fov[0, 128]
        assert (s.image[~fov] == 0).all()
        assert not (s.mask & ~fov).any()
        assert s.image[fov].mean() > 30  # not a black picture inside either


def test_partial_volume_thin_vessels_have_intermediate_contrast() -> None:
    """Supersampled, area-downsampled rendering: a 1-px vessel straddling two rows is faint in both."""
    thin = _Tree(np.array([[0.1, 0.2], [0.9, 0.3]]), np.array([-1, 0]), np.array([1.0, 1.0]))
    wide = _Tree(np.array([[0.1, 0.7], [0.9, 0.8]]), np.array([-1, 0]), np.array([8.0, 8.0]))
    maps = _rasterise_trees([thin, wide], 128)
    top = np.zeros((128, 128), dtype=bool)
    top[:64, 16:112] = True  # the thin vessel, away from its round caps
    thin_gt, wide_gt = maps.mask & top, maps.mask & ~top
    assert maps.artery[thin_gt].max() < 0.7 * maps.vein[wide_gt].max()
    thin_depth = maps.artery[thin_gt]
    assert thin_depth.min() < 0.6 * thin_depth.max()  # partly covered pixels: intermediate values
    # The wide vessel has a central light reflex, the thin one none.
    assert maps.reflex[wide_gt].max() > 0.3
    assert maps.reflex[:64].max() == 0.0


def test_one_pixel_vessel_ground_truth_is_unbroken() -> None:
    # A shallow diagonal 1-px vessel: coverage >= 0.5 alone would break it into dashes.
    pos = np.stack([np.linspace(0.05, 0.95, 60), np.linspace(0.3, 0.62, 60)], axis=1)
    tree = _Tree(pos, np.arange(-1, 59), np.ones(60))
    empty = _Tree(np.array([[0.5, 0.9]]), np.array([-1]), np.array([1.0]))
    mask = _rasterise_trees([tree, empty], 256).mask
    assert label(mask, connectivity=2).max() == 1
    assert mask.sum() < 2.2 * 0.9 * 256 * 1.02  # thin: about one or two pixels per column


# ---------------------------------------------------------------------------------------------
# Realism statistics
# ---------------------------------------------------------------------------------------------


def test_vessel_fraction_inside_fov_is_drive_like(
    stats_256: list[dict[str, float]], samples_512: list[VesselSample]
) -> None:
    fractions = [st["vessel_fraction_fov"] for st in stats_256]
    fractions += [vessel_stats(s)["vessel_fraction_fov"] for s in samples_512]
    assert all(0.08 <= f <= 0.14 for f in fractions), fractions


def test_thin_vessels_are_a_real_share_of_the_skeleton(stats_256: list[dict[str, float]]) -> None:
    shares = [st["thin_skeleton_share"] for st in stats_256]
    assert min(shares) >= 0.25, shares


def test_topology_few_components_and_no_massive_self_overlap(
    samples_256: list[VesselSample], stats_256: list[dict[str, float]]
) -> None:
    for s, st in zip(samples_256, stats_256, strict=True):
        assert st["n_components"] <= 15
        # Loops (Betti-1) = holes of the mask inside the FOV; crossings give tens, overlap hundreds.
        holes = label(s.fov & ~s.mask, connectivity=1).max() - 1
        assert holes <= 80
        assert st["skeleton_length"] > 1000


def test_vessels_are_dark_mostly_in_green(samples_256: list[VesselSample]) -> None:
    for s in samples_256:
        green, red = _local_contrast(s, 1), _local_contrast(s, 0)
        assert green > 0.08, (s.id, green)
        assert red < 0.6 * green, (s.id, red, green)
    # Orange-red fundus: red dominates green, green dominates blue inside the FOV.
    mean = samples_256[0].image[samples_256[0].fov].mean(axis=0)
    assert mean[0] > mean[1] > mean[2]


def test_anatomy_bright_disc_on_either_side_and_avascular_fovea(samples_256: list[VesselSample]) -> None:
    sides = set()
    for s in samples_256:
        lum = s.image.astype(float).mean(axis=2)
        bright = lum >= np.percentile(lum[s.fov], 99.5)
        cy, cx = ndimage.center_of_mass(bright)
        assert 0.12 < abs(cx / 256 - 0.5) < 0.32 and abs(cy / 256 - 0.5) < 0.1
        sides.add(cx > 128)
        # A vessel-free disc of radius >= 0.05 W lies near the centre (the fovea).
        free = ndimage.distance_transform_edt(~s.mask)
        centre = free[96:160, 96:160]
        assert centre.max() >= 0.05 * 256
    assert sides == {True, False}  # both left and right eyes occur


def test_size_512_works(samples_512: list[VesselSample]) -> None:
    for s in samples_512:
        assert s.image.shape == (512, 512, 3) and s.mask.shape == (512, 512)
        assert vessel_stats(s)["n_components"] <= 15


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


def test_splits_use_disjoint_image_seeds() -> None:
    assert SPLITS == ("train", "val", "test")
    ranges = []
    for seed in (0, 1, 7):
        for split in SPLITS:
            ds = SyntheticFundus(split, n=1_000_000, seed=seed)
            ranges.append((ds.image_seed(0), ds.image_seed(999_999)))
    ranges.sort()
    assert all(hi < next_lo for (_, hi), (next_lo, _) in itertools.pairwise(ranges))
    train, val = SyntheticFundus("train", n=2, size=64), SyntheticFundus("val", n=2, size=64)
    assert not np.array_equal(train[0].image, val[0].image)


def test_sequence_behaviour() -> None:
    ds = SyntheticFundus("train", n=12, size=64)
    assert isinstance(ds, Sequence) and len(ds) == 12
    first = ds[7]
    assert first.id == "synthetic-train-0007"
    assert ds[7] is first  # served from the cache
    assert ds[-5] is first
    assert np.array_equal(first.image, generate_fundus(ds.image_seed(7), 64).image)
    assert [s.id for s in ds[2:6:2]] == ["synthetic-train-0002", "synthetic-train-0004"]
    assert [s.id for s in ds] == [f"synthetic-train-{i:04d}" for i in range(12)]
    with pytest.raises(IndexError):
        ds[12]
    with pytest.raises(IndexError):
        ds[-13]
    with pytest.raises(ValueError, match="read-only"):
        first.image[0, 0, 0] = 1
    assert SyntheticFundus("val", n=3, size=64, seed=2)[0].id == "synthetic-s2-val-0000"


def test_dataset_pickles_without_its_cache() -> None:
    ds = SyntheticFundus("test", n=3, size=64, seed=1)
    _ = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[0].image, ds[0].image) and clone[0].id == ds[0].id


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "dev"}, r"split must be one of \('train', 'val', 'test'\)"),
        ({"n": 0}, "n must be"),
        ({"n": 2_000_000}, "n must be"),
        ({"size": 32}, "size must be an integer >= 64"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_dataset_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticFundus(**kwargs)


def test_generate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size must be an integer >= 64"):
        generate_fundus(0, 16)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        generate_fundus(-3)


# ---------------------------------------------------------------------------------------------
# Domains
# ---------------------------------------------------------------------------------------------


def test_shifted_domain_is_another_site_with_fainter_thinner_vessels(
    samples_256: list[VesselSample], stats_256: list[dict[str, float]]
) -> None:
    shifted = [generate_fundus(s, 256, domain="shifted") for s in SEEDS_256]
    assert shifted[0].id == "synthetic-shifted-0" and samples_256[0].id == "synthetic-0"
    # Another eye, not the same eye through another camera: its own seed stream.
    assert not np.array_equal(shifted[0].mask, samples_256[0].mask[:256, :256])
    # A smaller field of view (radius 0.42 vs 0.475 of the width), black outside.
    ratio = shifted[0].fov.sum() / samples_256[0].fov.sum()
    assert ratio == pytest.approx(
        (DOMAINS["shifted"].fov_radius / DOMAINS["source"].fov_radius) ** 2, rel=0.02
    )
    assert (shifted[0].image[~shifted[0].fov] == 0).all() and not (shifted[0].mask & ~shifted[0].fov).any()
    # Thinner vessels (a larger share of 1-2 px skeleton) and lower green contrast.
    thin = np.mean([vessel_stats(s)["thin_skeleton_share"] for s in shifted])
    assert thin > np.mean([st["thin_skeleton_share"] for st in stats_256]) + 0.02
    contrast = np.mean([_local_contrast(s, 1) for s in shifted])
    assert contrast < 0.8 * np.mean([_local_contrast(s, 1) for s in samples_256])
    # The source domain is the default and is the calibrated generator.
    same = generate_fundus(3, 64, domain="source")
    assert np.array_equal(same.image, generate_fundus(3, 64).image)


def test_dataset_domain_names_its_images_and_pickles() -> None:
    ds = SyntheticFundus("val", n=2, size=64, seed=1, domain="shifted")
    assert ds.sample_id(1) == "synthetic-shifted-s1-val-0001" and ds[1].id == ds.sample_id(1)
    assert np.array_equal(ds[0].image, generate_fundus(ds.image_seed(0), 64, domain="shifted").image)
    assert "domain='shifted'" in repr(ds)
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[0].image, ds[0].image)
    with pytest.raises(ValueError, match="unknown synthetic domain 'mars'; expected one of source, shifted"):
        SyntheticFundus("val", n=2, domain="mars")
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        generate_fundus(0, 64, domain="mars")
