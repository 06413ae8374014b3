"""The torch reward equals the numpy reward bit for bit (torch on CPU here; tests/gpu repeats it on CUDA):
skeletons against scikit-image, labels against scipy, and totals and every component, whole image and per
tile, against MultiObjectiveReward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.morphology import skeletonize as sk_skeletonize
from torch_reward_cases import CONFIGS, assert_identical, fundus, shape_masks, vessel_masks

from envs.morphology_torch import label, skeletonize
from envs.rewards import MultiObjectiveReward, RewardConfig, RewardWeights
from envs.rewards_torch import TorchReward

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

SHAPES = ((40, 40), (37, 61), (64, 45))
"""Square and non-square sizes, none a multiple of every tile size."""


def neighbourhoods() -> np.ndarray:
    """Every 3x3 neighbourhood (256 codes, centre on and off), alone in a 5x5 image and filling a 3x3 image
    (where it touches the border): bool [1024, 5, 5]."""
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
    # Neighbour k of the table's code (NW, N, NE, E, SE, S, SW, W) sits at these offsets from the centre.
    offsets = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
    out = np.zeros((4, 256, 5, 5), bool)
    for k, (dr, dc) in enumerate(offsets):
        out[:, :, 2 + dr, 2 + dc] = bits[:, k]
    out[1::2, :, 2, 2] = True  # centre on
    out[2:, :, 0, :] = out[2:, :, 4, :] = out[2:, :, :, 0] = out[2:, :, :, 4] = True  # frame: touches more
    return out.reshape(-1, 5, 5)


# -------------------------------------------------------------------------------------------- pieces


def test_skeleton_matches_skimage_on_every_neighbourhood() -> None:
    masks = neighbourhoods()
    want = np.stack([sk_skeletonize(m) for m in masks])
    assert np.array_equal(skeletonize(torch.from_numpy(masks)).numpy(), want)
    border = masks[:, 1:4, 1:4]  # the 3x3 pattern filling the image: every pixel on the border
    want = np.stack([sk_skeletonize(m) for m in border])
    assert np.array_equal(skeletonize(torch.from_numpy(np.ascontiguousarray(border))).numpy(), want)


@pytest.mark.parametrize("shape", SHAPES)
def test_skeleton_matches_skimage_on_shapes_and_vessels(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    gt, fov = fundus(1, 64)
    masks = shape_masks(shape, rng) + [
        m[: shape[0], : shape[1]] for m in vessel_masks(gt, fov, rng, 8)
    ]  # fmt: skip
    stack = np.stack(masks)
    want = np.stack([sk_skeletonize(m) for m in stack])
    got = skeletonize(torch.from_numpy(stack)).numpy()
    bad = [i for i in range(len(stack)) if not np.array_equal(got[i], want[i])]
    assert not bad, f"skeletons differ for masks {bad}"


@pytest.mark.parametrize("shape", SHAPES)
def test_labels_match_scipy(shape: tuple[int, int]) -> None:
    """Counts equal ndi.label's (8-connected foreground, 4-connected background), the partition is the same,
    and each label is its component's first pixel in raster order."""
    rng = np.random.default_rng(7 + sum(shape))
    stack = np.stack(shape_masks(shape, rng))
    for member, connectivity, structure in (
        (stack, 8, np.ones((3, 3), bool)),
        (~stack, 4, ndi.generate_binary_structure(2, 1)),
    ):
        labels, counts = label(torch.from_numpy(member), connectivity=connectivity)
        labels = labels.numpy()
        for i, m in enumerate(member):
            ref, n = ndi.label(m, structure=structure)
            assert counts[i] == n, f"mask {i}: {int(counts[i])} components, scipy finds {n}"
            pairs = np.unique(np.stack([ref[m], labels[i][m]]), axis=1)
            assert pairs.shape[1] == n, f"mask {i}: not the same partition"
            first = np.array([np.flatnonzero(ref.ravel() == k)[0] for k in range(1, n + 1)], dtype=np.int64)
            assert np.array_equal(np.sort(np.unique(labels[i][m])), np.sort(first + 1))
            assert not labels[i][~m].any()


# ------------------------------------------------------------------------------------- whole reward


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_noise_score_identically(config: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(11 + sum(shape))
    masks = shape_masks(shape, rng)
    gts = [masks[7], ndi.gaussian_filter(rng.random(shape), 1.5) > 0.55]  # a line GT and a blobby GT
    fov = np.zeros(shape, bool)
    fov[2:-3, 1:-2] = True
    n = assert_identical(CONFIGS[config], "cpu", gts, [fov, np.ones(shape, bool)], [masks, masks[::-1]])
    assert n == 2 * len(masks)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_vessel_trees_score_identically(config: str) -> None:
    """Synthetic fundus GTs with their FOVs, predictions perturbed like sampled masks; one image cropped
    to a non-square size."""
    rng = np.random.default_rng(3)
    pairs = [fundus(seed, 64) for seed in (0, 1, 2)]
    gts, fovs = [p[0] for p in pairs], [p[1] for p in pairs]
    masks = [vessel_masks(g, f, rng, 12) for g, f in zip(gts, fovs, strict=True)]
    n = assert_identical(CONFIGS[config], "cpu", gts, fovs, masks)
    crop = (slice(5, 64), slice(0, 47))
    n += assert_identical(
        CONFIGS[config], "cpu", [gts[0][crop]], [fovs[0][crop]], [[m[crop] for m in masks[0]]], tiles=(16, 7)
    )
    assert n == 48


def test_vessel_tree_without_fov_and_in_small_chunks() -> None:
    """No FOV at all, and max_pixels small enough that the masks are scored in chunks of two."""
    rng = np.random.default_rng(5)
    gt, fov = fundus(2, 64)
    masks = vessel_masks(gt, fov, rng, 9)
    config = CONFIGS["all_terms"]
    n = assert_identical(config, "cpu", [gt], None, [masks], tiles=(16, 5), max_pixels=2 * 66 * 66)
    assert n == 9


def test_betti_alone_and_other_scales() -> None:
    """Only the Betti term, with non-default scales and clip: the hole counts decide it."""
    config = RewardConfig(
        weights=RewardWeights(dice=0.0, recall=0.0, topology=0.0, length=0.0, betti=1.0),
        betti_clip=3.0,
        betti_scale=2.5,
        component_penalty=0.3,
        recall_target=0.6,
        tile_sizes=(9,),
    )
    rng = np.random.default_rng(9)
    masks = shape_masks((40, 40), rng)
    n = assert_identical(config, "cpu", [masks[14], masks[-5]], None, [masks, masks], tiles=(9, 16))
    assert n == 2 * len(masks)


# ---------------------------------------------------------------------------------------------- API


def test_score_tiles_multi_and_score_batch_are_drop_in() -> None:
    """The numpy-shaped methods: K masks of one image, [B, K, H, W] stacks, lazily prepared tile sizes."""
    rng = np.random.default_rng(13)
    gt, fov = fundus(0, 64)
    masks = np.stack(vessel_masks(gt, fov, rng, 4))
    cpu, tr = MultiObjectiveReward(CONFIGS["all_terms"]), TorchReward(CONFIGS["all_terms"])
    target, targets = cpu.prepare_target(gt, fov), tr.prepare_targets(gt, fov)
    want = cpu.score_tiles_multi(masks, target, tiles=(16, 11))
    got = tr.score_tiles_multi(torch.from_numpy(masks), targets, tiles=(16, 11))  # 11: not prepared yet
    assert sorted(got) == [11, 16] and 11 in targets.tiles
    for t in (11, 16):
        assert np.array_equal(got[t].total, want[t].total) and np.array_equal(got[t].valid, want[t].valid)
    two = tr.prepare_targets(np.stack([gt, gt[::-1]]), np.stack([fov, fov[::-1]]))
    batch = tr.score_batch(np.stack([masks, masks[:, ::-1]]), two)  # [B=2, K=4, H, W]
    assert batch.total.shape == (8,) and batch.total.dtype == torch.float64
    flipped = cpu.prepare_target(gt[::-1], fov[::-1])  # thinning is not flip-invariant: a different reward
    want = [cpu.score(m, target) for m in masks] + [cpu.score(m, flipped) for m in masks[:, ::-1]]
    assert batch.results() == want


def test_inputs_are_checked() -> None:
    tr = TorchReward(RewardConfig())
    targets = tr.prepare_targets(np.zeros((2, 8, 8), bool))
    with pytest.raises(ValueError, match="probability map"):
        tr.score(np.full((1, 8, 8), 0.3, np.float32), targets, image=[0])
    with pytest.raises(ValueError, match=r"expected \[N, H, W\] with H, W = \(8, 8\)"):
        tr.score(np.zeros((1, 8, 9), bool), targets, image=[0])
    with pytest.raises(ValueError, match="pass image="):
        tr.score(np.zeros((3, 8, 8), bool), targets)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 2\)"):
        tr.score(np.zeros((1, 8, 8), bool), targets, image=[2])
    with pytest.raises(ValueError, match="tile is 0"):
        tr.score(np.zeros((1, 8, 8), bool), targets, image=[0], tiles=(0,))
    with pytest.raises(ValueError, match="fov is"):
        tr.prepare_targets(np.zeros((8, 8), bool), np.ones((8, 9), bool))
    with pytest.raises(ValueError, match="thinning is 'fast'"):
        TorchReward(RewardConfig(), thinning="fast")
    with pytest.raises(TypeError, match="RewardConfig"):
        TorchReward({"weights": None})  # type: ignore[arg-type]


def test_targets_of_single_images_score_like_the_batch_they_came_from() -> None:
    """select + cat (the rollout actors keep one image's or crop's targets at a time): the same scores."""
    rng = np.random.default_rng(17)
    pairs = [fundus(seed, 64) for seed in (0, 1, 2)]
    gts, fovs = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    tr = TorchReward(CONFIGS["all_terms"])
    targets = tr.prepare_targets(gts, fovs)
    masks = torch.from_numpy(
        np.stack(vessel_masks(gts[2], fovs[2], rng, 2) + vessel_masks(gts[0], fovs[0], rng, 2))
    )
    joined = type(targets).cat([targets.select([2]), targets.select([0])])
    assert len(joined) == 2 and sorted(joined.tiles) == [8, 16] and joined.nbytes == 2 * targets.nbytes // 3
    want = tr.score(masks, targets, image=[2, 2, 0, 0], tiles=(16, 8))
    got = tr.score(masks, joined, image=[0, 0, 1, 1], tiles=(16, 8))
    assert torch.equal(got.whole.total, want.whole.total)
    assert all(torch.equal(got.tiles[t].total, want.tiles[t].total) for t in (16, 8))
