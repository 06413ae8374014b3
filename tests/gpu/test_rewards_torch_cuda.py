"""On CUDA the torch reward equals the numpy reward bit for bit, as tests/unit/test_rewards_torch.py checks
on CPU: the same cases, more of them (>= 500 masks per objective), with both thinning back-ends (the fused
Triton kernel and the torch ops)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.morphology import skeletonize as sk_skeletonize
from torch_reward_cases import CONFIGS, assert_identical, fundus, shape_masks, vessel_masks

from envs.morphology_torch import label, skeletonize

SHAPES = ((40, 40), (37, 61), (64, 45), (96, 96))


THINNING = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])


@pytest.mark.parametrize("thinning", THINNING)
def test_cuda_skeletons_and_component_counts_match_references(thinning: str) -> None:
    rng = np.random.default_rng(0)
    gt, fov = fundus(0, 96)
    stacks = [np.stack(shape_masks(s, rng)) for s in SHAPES] + [np.stack(vessel_masks(gt, fov, rng, 24))]
    for stack in stacks:
        masks = torch.from_numpy(stack).cuda()
        got = skeletonize(masks, thinning=thinning).cpu().numpy()
        assert np.array_equal(got, np.stack([sk_skeletonize(m) for m in stack]))
        _, n8 = label(masks, connectivity=8)
        _, n4 = label(~masks, connectivity=4)
        assert n8.tolist() == [ndi.label(m, structure=np.ones((3, 3), bool))[1] for m in stack]
        assert n4.tolist() == [ndi.label(~m)[1] for m in stack]


@pytest.mark.parametrize("thinning", THINNING)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_cuda_rewards_are_bit_identical(config: str, thinning: str) -> None:
    rng = np.random.default_rng(1)
    cfg = CONFIGS[config]
    n = 0
    for shape in SHAPES:
        masks = shape_masks(shape, rng)
        gts = [masks[7], ndi.gaussian_filter(rng.random(shape), 1.5) > 0.55]
        fov = np.zeros(shape, bool)
        fov[2:-3, 1:-2] = True
        fovs = [fov, np.ones(shape, bool)]
        n += assert_identical(cfg, "cuda", gts, fovs, [masks, masks[::-1]], thinning=thinning)
    for size, seeds in ((64, (0, 1, 2, 3)), (96, (4, 5))):
        pairs = [fundus(seed, size) for seed in seeds]
        gts, fovs = [p[0] for p in pairs], [p[1] for p in pairs]
        masks = [vessel_masks(g, f, rng, 32) for g, f in zip(gts, fovs, strict=True)]
        n += assert_identical(cfg, "cuda", gts, fovs, masks, thinning=thinning)
        small = 5 * (size + 2) ** 2  # chunks of 5 masks
        n += assert_identical(
            cfg, "cuda", gts, None, masks, tiles=(16, 9), max_pixels=small, thinning=thinning
        )
    assert n >= 500, f"only {n} masks compared"
