"""Masks and a bit-for-bit comparison for the torch reward (tests/unit/test_rewards_torch.py on CPU,
tests/gpu/test_rewards_torch_cuda.py on CUDA): the same cases on every device."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import disk, line

from envs.perturb import perturb_mask
from envs.rewards import MultiObjectiveReward, RewardConfig, RewardWeights
from envs.rewards_torch import TorchReward
from envs.synthetic import generate_fundus

CONFIGS = {
    "default": RewardConfig(),
    "all_terms": RewardConfig(
        weights=RewardWeights(
            dice=0.5, recall=0.2, topology=0.2, length=0.1, cldice=0.3, betti=0.2, connectivity=0.2
        ),
        tile_sizes=(16, 8),
    ),
}
"""Betti not weighted (no hole labelling) and every term weighted (holes and components touching the GT per
image and per tile)."""

TILES = (16, 8, 12, 5, 7, 50)
"""Tile sizes scored per tile: dividing the test sizes or not, and one larger than an image side."""


# ---------------------------------------------------------------------------------------------- masks


def shape_masks(shape: tuple[int, int], rng: np.random.Generator) -> list[np.ndarray]:
    """Degenerate and topological cases of one size: empty, full, single pixels, 1- and 2-px straight and
    diagonal lines, rings (holes), discs and lines touching the border, junctions, grids, noise."""
    h, w = shape
    out = [np.zeros(shape, bool), np.ones(shape, bool), np.indices(shape).sum(0) % 2 == 0]

    def blank() -> np.ndarray:
        return np.zeros(shape, bool)

    m = blank()
    m[rng.integers(h), rng.integers(w)] = True
    out.append(m)
    m = blank()
    m[0, 0] = m[h - 1, w - 1] = True  # corners: on the border
    out.append(m)
    m = blank()
    m[h // 2, 2 : w - 3] = True  # 1-px line
    out.append(m)
    m = blank()
    m[h // 3 : h // 3 + 2, :] = True  # 2-px line across the whole width
    out.append(m)
    m = blank()
    m[:, w // 2] = True  # full-height vertical line
    out.append(m)
    for width in (1, 2):  # diagonal and anti-diagonal lines, 1 and 2 px
        m = blank()
        rr, cc = line(1, 1, h - 2, min(w - 2, h - 2))
        for k in range(width):
            m[rr, np.clip(cc + k, 0, w - 1)] = True
        out.append(m)
        out.append(m[:, ::-1].copy())
    for r_out, r_in, centre in ((10, 7, (h / 2, w / 2)), (9, 3, (h / 2, w / 3)), (12, 9, (2, w / 2))):
        m = blank()
        m[disk(centre, r_out, shape=shape)] = True
        m[disk(centre, r_in, shape=shape)] = False  # a ring: one hole (or none when cut by the border)
        out.append(m)
    m = blank()
    m[disk((h / 2, w - 3), 8, shape=shape)] = True  # disc touching the border
    out.append(m)
    m = blank()
    m[4, 3 : w - 3] = True  # T and + junctions
    m[4 : h - 3, w // 2] = True
    m[h // 2, 2 : w - 2] = True
    out.append(m)
    m = blank()
    m[::6, :] = True  # a grid: many holes and junctions
    m[:, ::7] = True
    out.append(m)
    for density in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
        out.append(rng.random(shape) < density)
    for sigma in (1.0, 2.5):
        out.append(ndi.gaussian_filter(rng.random(shape), sigma) > 0.5)
    return out


@functools.cache
def fundus(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(gt, fov) of a synthetic fundus image (cached: generating costs ~0.1 s at 64 px)."""
    s = generate_fundus(seed, size)
    return s.mask, s.fov


def vessel_masks(gt: np.ndarray, fov: np.ndarray, rng: np.random.Generator, k: int) -> list[np.ndarray]:
    """k predictions of a vessel tree as a policy samples them: the reward net's corruptions (compound,
    noise, empty, full), the GT with flipped pixels, and fragments (cuts and specks)."""
    out = [gt.copy()]
    modes = ("compound", "compound", "compound", "noise", "empty", "full")
    i = 0
    while len(out) < k:
        kind = i % 3
        if kind == 0:
            mode = modes[(i // 3) % len(modes)]
            out.append(perturb_mask(gt, rng, fov=fov, mode=mode))  # type: ignore[arg-type]
        elif kind == 1:
            out.append(gt ^ (rng.random(gt.shape) < rng.uniform(0.005, 0.05)))  # flipped pixels
        else:
            cut = ndi.binary_dilation(rng.random(gt.shape) < 0.004, iterations=2)
            out.append((gt & ~cut) | (rng.random(gt.shape) < 0.01))  # fragments and specks
        i += 1
    return out


# ------------------------------------------------------------------------------------------ compare


def _bits(x: float | np.ndarray) -> bytes:
    return np.asarray(x).tobytes()


def assert_identical(
    config: RewardConfig,
    device: str,
    gts: Sequence[np.ndarray],
    fovs: Sequence[np.ndarray] | None,
    masks: Sequence[Sequence[np.ndarray]],
    *,
    tiles: Sequence[int] = TILES,
    max_pixels: int = 2**27,
    thinning: str = "auto",
) -> int:
    """Score ``masks[i]`` against image i with both paths; assert every total and component (whole image
    and every tile size) has the same bits. Returns how many masks were compared."""
    cpu = MultiObjectiveReward(config)
    tr = TorchReward(config, device, max_pixels=max_pixels, thinning=thinning)
    targets = tr.prepare_targets(np.stack(gts), None if fovs is None else np.stack(fovs))
    rows = np.concatenate([np.full(len(m), i) for i, m in enumerate(masks)])
    flat = np.stack([m for group in masks for m in group])
    scores = tr.score(flat, targets, image=rows, tiles=tiles)
    got = scores.whole.results()
    start = 0
    for i, group in enumerate(masks):
        target = cpu.prepare_target(gts[i], None if fovs is None else fovs[i])
        for j, m in enumerate(group):
            want, have = cpu.score(m, target), got[start + j]
            where = f"image {i} mask {j}"
            assert list(have.components) == list(want.components), where
            assert _bits(have.total) == _bits(want.total), f"{where}: total {have.total} != {want.total}"
            for name, v in want.components.items():
                assert _bits(have.components[name]) == _bits(v), (
                    f"{where}: {name} {have.components[name]} != {v}"
                )
        rows_i = slice(start, start + len(group))
        for tile in tiles:
            # Per size: score_tiles_multi pads to the lcm of its sizes (8400 px for TILES), and
            # tests/unit/test_rewards.py pins it equal to score_tiles at each size.
            want_t = cpu.score_tiles(np.stack(group), target, tile=tile)
            have_t = scores.tiles[tile].tiled(rows_i)
            where = f"image {i} tile {tile}"
            assert have_t.total.dtype == want_t.total.dtype and have_t.total.shape == want_t.total.shape, (
                where
            )
            assert _bits(have_t.valid) == _bits(want_t.valid), f"{where}: valid"
            assert list(have_t.components) == list(want_t.components), where
            assert _bits(have_t.total) == _bits(want_t.total), f"{where}: total"
            for name, v in want_t.components.items():
                bad = np.argwhere(have_t.components[name] != v)[:3].tolist()
                assert _bits(have_t.components[name]) == _bits(v), f"{where}: {name} differs at {bad}"
        start += len(group)
    return start
