"""The GT reward on torch tensors: every term of ``envs/rewards.py`` for a batch of masks [N, H, W] at once,
on any device, bit-for-bit equal to :class:`envs.rewards.MultiObjectiveReward`::

    reward = TorchReward(RewardConfig(), device="cuda")
    targets = reward.prepare_targets(gts, fovs)                   # B GTs [B, H, W], once, kept on the device
    s = reward.score(masks, targets, image=rows, tiles=(16,))     # masks [N, H, W]; rows [N] into targets
    s.whole.total, s.whole.components["dice"]                     # float64 [N]
    s.tiles[16].total                                             # float32 [N, ty, tx]
    s.whole.results()                                             # list[RewardResult], as reward.score gives
    reward.score_tiles_multi(masks, target)                       # {tile: TiledRewards}, as the numpy method

How, with no Python loop over masks:

1. Skeleton (scikit-image's Zhang-Suen thinning, block-sparse; a fused Triton kernel on CUDA) and connected
   components labelled by runs, each component's label its first pixel in raster order (the canonical label
   the tile rules need), holes as 4-connected background components: ``envs/morphology_torch.py``, once per
   mask for every tile size.
2. Skeleton and labels of the GTs, once per image (:meth:`TorchReward.prepare_targets`, kept on the device).
3. Counts: pixel counts per mask and per tile from dense maps (tile sums are reshapes and reductions);
   distinct (tile, component) pairs for components and holes, as ``envs.tile_counts.distinct_per_tile``; a junction cluster
   in the tile of its first pixel.
4. Terms: :func:`envs.rewards.reward_terms`, the numpy path's own formula, run with torch ops in float64.

Exactness contract: for masks whose values are 0/1, every count (pixels, skeleton, junction clusters,
components, holes; per image and per tile) equals the numpy path's exactly, and the terms come from the same
formula of exactly rounded float64 operations, so totals and every component are bit-identical on CPU and
CUDA (``tests/unit/test_rewards_torch.py``, ``tests/gpu/test_rewards_torch_cuda.py``).

torch only: no Ray, and no CUDA needed (``device="cpu"`` works everywhere).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from numpy.typing import ArrayLike

from envs.metrics import ArrayOps
from envs.morphology_torch import (
    Analysis,
    Labels,
    LabelStats,
    analyse,
    pad,
    pixel_rc,
    run_starts,
    thinning_backend,
)
from envs.rewards import (
    RewardConfig,
    RewardCounts,
    RewardResult,
    TiledRewards,
    reward_terms,
)

__all__ = [
    "BatchRewards",
    "BatchTiles",
    "TorchReward",
    "TorchScores",
    "TorchTargets",
]

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------ tiles


@dataclass(frozen=True)
class _Grid:
    """Tile grid of one tile size over masks [H, W] stored padded as [H+2, W+2]; tiles past the bottom/right
    edge are padded with background outside the FOV, as in the numpy path."""

    tile: int
    h: int
    w: int

    @property
    def ty(self) -> int:
        return -(-self.h // self.tile)

    @property
    def tx(self) -> int:
        return -(-self.w // self.tile)

    def rc(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mask, row, col) of flat padded indices, row/col in image coordinates."""
        return pixel_rc(flat, self.h, self.w)

    def tile_of(self, flat: Tensor) -> Tensor:
        """Flat tile index (mask * ty + tile row) * tx + tile col of flat padded pixel indices."""
        m, r, c = self.rc(flat)
        return (m * self.ty + r // self.tile) * self.tx + c // self.tile

    def firsts(self, member: Tensor) -> Tensor:
        """Flat indices of the member pixels that have no member left of or above them in the same tile:
        every (tile, component) pair has at least one (its first pixel), and far fewer than all pixels."""
        h2, w2 = self.h + 2, self.w + 2
        dev = member.device
        tile_col = ((torch.arange(w2, device=dev) - 1) % self.tile == 0)[None, None, :]
        tile_row = ((torch.arange(h2, device=dev) - 1) % self.tile == 0)[None, :, None]
        keep = run_starts(member) | (member & tile_col)
        keep[:, 1:, :] &= ~(member[:, :-1, :] & ~tile_row[:, 1:, :])
        return keep.reshape(-1).nonzero().squeeze(1)

    def distinct(
        self, labels: Labels, member: Tensor, n_masks: int, hole_run: Tensor | None = None
    ) -> Tensor:
        """Distinct components among the member pixels of each tile -> int64 [N, ty, tx] (with
        ``hole_run``: only the components that are holes). Counts unique (tile, root) pairs of
        :meth:`firsts` pixels: a member 4-neighbour belongs to the same component."""
        out = torch.zeros(n_masks * self.ty * self.tx, dtype=torch.int64, device=member.device)
        idx = self.firsts(member)
        root = labels.root_of(idx)
        if hole_run is not None:
            inside = hole_run.index_select(0, root).nonzero().squeeze(1)
            idx, root = idx.index_select(0, inside), root.index_select(0, inside)
        if idx.numel():
            n_runs = labels.runs.numel()
            keys = torch.unique(self.tile_of(idx) * n_runs + root)
            out.index_add_(0, keys // n_runs, torch.ones_like(keys))
        return out.view(n_masks, self.ty, self.tx)

    def count(self, flat: Tensor, n_masks: int) -> Tensor:
        """How many of the flat padded indices fall in each tile -> int64 [N, ty, tx]."""
        out = torch.zeros(n_masks * self.ty * self.tx, dtype=torch.int64, device=flat.device)
        out.index_add_(0, self.tile_of(flat), torch.ones_like(flat))
        return out.view(n_masks, self.ty, self.tx)

    def sums(self, x: Tensor) -> Tensor:
        """Per-tile sums of an unpadded stack [N, H, W] (bool/int) -> int64 [N, ty, tx]."""
        n = x.shape[0]
        ph, pw = self.ty * self.tile - self.h, self.tx * self.tile - self.w
        x = torch.nn.functional.pad(x.to(torch.int32), (0, pw, 0, ph))
        return x.view(n, self.ty, self.tile, self.tx, self.tile).sum((2, 4), dtype=torch.int64)


def _tile_counts(an: Analysis, grid: _Grid, touch: Tensor | None) -> RewardCounts:
    """Components, holes, junctions and (given ``touch``, the padded foreground on the GT) components
    touching the GT per tile of an analysed stack (the pixel sums are done by the caller)."""
    n = an.fg.shape[0]
    holes = None
    if an.holes is not None:
        holes = grid.distinct(an.holes, ~an.fg, n, hole_run=an.hole_run)
    zero = torch.zeros((), dtype=torch.int64, device=an.fg.device)
    return RewardCounts(
        area=zero,
        length=zero,
        junctions=grid.count(an.junction_first, n),
        components=grid.distinct(an.components, an.fg, n),
        holes=holes,
        touching=None if touch is None else grid.distinct(an.components, touch, n),
    )


# ------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class BatchRewards:
    """Whole-image rewards of N masks (tensors on the scoring device).

    Attributes:
        total: float64 [N].
        components: name -> float64 [N]; the keys (and their order) of :attr:`RewardResult.components`.
    """

    total: Tensor
    components: dict[str, Tensor]

    def results(self) -> list[RewardResult]:
        """One :class:`RewardResult` per mask, equal to ``MultiObjectiveReward.score`` of that mask."""
        total = self.total.tolist()
        comps = {k: v.tolist() for k, v in self.components.items()}
        return [
            RewardResult(total=t, components={k: v[i] for k, v in comps.items()}, source="gt")
            for i, t in enumerate(total)
        ]


@dataclass(frozen=True, eq=False)
class BatchTiles:
    """Per-tile rewards of N masks at one tile size (tensors on the scoring device).

    Attributes:
        total: float32 [N, ty, tx]; 0 where ``valid`` is False.
        components: name -> float32 [N, ty, tx].
        valid: bool [N, ty, tx], the tile validity of each mask's image (a tile with a FOV pixel).
        tile: tile size in pixels.
    """

    total: Tensor
    components: dict[str, Tensor]
    valid: Tensor
    tile: int

    def tiled(self, rows: slice | Sequence[int] | Tensor | None = None) -> TiledRewards:
        """The rows (masks of one image) as numpy :class:`TiledRewards`, equal to ``score_tiles``'s."""
        rows = slice(None) if rows is None else rows
        valid = self.valid[rows]
        return TiledRewards(
            total=self.total[rows].cpu().numpy(),
            components={k: v[rows].cpu().numpy() for k, v in self.components.items()},
            valid=valid[0].cpu().numpy() if valid.shape[0] else np.zeros(self.valid.shape[1:], bool),
            tile=self.tile,
            source="gt",
        )


@dataclass(frozen=True, eq=False)
class TorchScores:
    """What :meth:`TorchReward.score` returns: whole-image rewards, per-tile rewards by tile size, and the
    iteration counts it took."""

    whole: BatchRewards
    tiles: dict[int, BatchTiles]
    stats: LabelStats


@dataclass(frozen=True, eq=False)
class _TileTarget:
    counts: RewardCounts
    """int64 [B, ty, tx]: GT area, length, junctions, components (and holes)."""
    valid: Tensor
    """bool [B, ty, tx]: tiles with at least one FOV pixel."""


@dataclass(frozen=True, eq=False)
class TorchTargets:
    """The GT side of B images of one size on one device, from :meth:`TorchReward.prepare_targets`.

    Attributes:
        gt: bool [B, H+2, W+2], the GT ANDed with the FOV, padded with a False ring.
        skeleton: bool [B, H+2, W+2], the GT skeleton (same padding).
        fov: bool [B, H, W] (all True for images without a FOV).
        counts: int64 [B] GT counts (holes only when the Betti term is weighted).
        tiles: per tile size GT counts and tile validity, filled for ``config.tile_sizes`` and on first use of
            any other size.
    """

    gt: Tensor
    skeleton: Tensor
    fov: Tensor
    counts: RewardCounts
    tiles: dict[int, _TileTarget] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return int(self.fov.shape[1]), int(self.fov.shape[2])

    def __len__(self) -> int:
        return int(self.fov.shape[0])

    @property
    def nbytes(self) -> int:
        """Device bytes of the pixel maps (GT, skeleton, FOV); the counts are small beside them."""
        return sum(t.numel() * t.element_size() for t in (self.gt, self.skeleton, self.fov))

    def select(self, rows: Sequence[int]) -> TorchTargets:
        """Images ``rows`` of these targets, in that order, as copies (with every tile size prepared so far):
        one image's targets can be kept without the others'."""
        idx = torch.as_tensor(list(rows), dtype=torch.int64, device=self.fov.device)
        return TorchTargets(
            gt=self.gt[idx],
            skeleton=self.skeleton[idx],
            fov=self.fov[idx],
            counts=_take(self.counts, idx),
            tiles={t: _TileTarget(_take(tt.counts, idx), tt.valid[idx]) for t, tt in self.tiles.items()},
        )

    @staticmethod
    def cat(parts: Sequence[TorchTargets]) -> TorchTargets:
        """The images of several targets of one size and device, in order (with the tile sizes all of them
        hold), so that masks of all of them are scored in one call."""
        if len(parts) == 1:
            return parts[0]
        sizes = set.intersection(*(set(p.tiles) for p in parts))
        return TorchTargets(
            gt=torch.cat([p.gt for p in parts]),
            skeleton=torch.cat([p.skeleton for p in parts]),
            fov=torch.cat([p.fov for p in parts]),
            counts=_cat_counts([p.counts for p in parts]),
            tiles={
                t: _TileTarget(
                    _cat_counts([p.tiles[t].counts for p in parts]),
                    torch.cat([p.tiles[t].valid for p in parts]),
                )
                for t in sorted(sizes)
            },
        )


# ------------------------------------------------------------------------------------------------ ops


class _TorchOps(ArrayOps):
    """:class:`envs.metrics.ArrayOps` on float64 tensors. Python scalars stay Python scalars (torch treats
    them as weak scalars: no host-to-device copy, no dtype promotion)."""

    def f64(self, x):
        return x.to(torch.float64) if isinstance(x, Tensor) else float(x)

    def where(self, cond, a, b):
        if not isinstance(a, Tensor) and not isinstance(b, Tensor):
            a = torch.full_like(cond, a, dtype=torch.float64)
        return torch.where(cond, a, b)

    def minimum(self, a, b):
        if not isinstance(b, Tensor):
            return torch.clamp(a, max=b)
        if not isinstance(a, Tensor):
            return torch.clamp(b, max=a)
        return torch.minimum(a, b)

    def maximum(self, a, b):
        if not isinstance(b, Tensor):
            return torch.clamp(a, min=b)
        if not isinstance(a, Tensor):
            return torch.clamp(b, min=a)
        return torch.maximum(a, b)

    def abs(self, x):
        return torch.abs(x)

    def clip(self, x, lo, hi):
        return torch.clamp(x, lo, hi)


_OPS = _TorchOps()


# --------------------------------------------------------------------------------------------- reward


class TorchReward:
    """:class:`envs.rewards.MultiObjectiveReward` for batches of masks on a torch device, bit-identical.

    Args:
        config: the reward objective (weights, scales, tile sizes).
        device: where masks are scored ("cpu", "cuda", ...); masks and GTs given as numpy arrays or tensors
            elsewhere are moved there.
        max_pixels: masks are processed in chunks of at most this many pixels (padded by one on each side):
            it bounds memory and keeps flat indices below 2**31. Peak GPU memory is about 50 bytes per pixel on
            sampled vessel masks (the labelling's edge lists dominate): ~6.5 GB at the default, a chunk of 31
            masks of 2048x2048 or 404 of 584x565. Throughput barely depends on it beyond ~30 masks of 2048.
        thinning: the skeleton back-end (:data:`envs.morphology_torch.THINNING`); "auto" uses the fused Triton
            kernel on CUDA.
    """

    def __init__(
        self,
        config: RewardConfig | None = None,
        device: str | torch.device = "cpu",
        *,
        max_pixels: int = 2**27,
        thinning: str = "auto",
    ) -> None:
        config = RewardConfig() if config is None else config
        if not isinstance(config, RewardConfig):
            raise TypeError(f"config must be a RewardConfig, got {type(config).__name__}")
        if not isinstance(max_pixels, int) or not 0 < max_pixels < 2**31:
            raise ValueError(f"max_pixels is {max_pixels!r}; give an int in (0, 2**31)")
        self.config = config
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.thinning = thinning_backend(thinning, self.device)
        self._need_holes = config.weights.betti > 0
        self._need_touching = config.weights.connectivity > 0

    # --------------------------------------------------------------------------------------- inputs

    def _masks(self, x: ArrayLike | Tensor, name: str) -> Tensor:
        """bool tensor on the device; rejects probability maps like :func:`envs.metrics.as_mask`."""
        t = x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
        t = t.to(self.device)
        if t.dtype == torch.bool:
            return t
        if t.is_floating_point() and not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(
                f"{name} holds values other than 0 and 1 (a probability map?); threshold it first, "
                f"e.g. {name} >= 0.5"
            )
        return t != 0

    def _tiles(self, tiles: Sequence[int] | None) -> tuple[int, ...]:
        tiles = self.config.tile_sizes if tiles is None else tiles
        for t in tiles:
            if not isinstance(t, int | np.integer) or isinstance(t, bool) or t <= 0:
                raise ValueError(f"tile is {t!r}; give a positive int number of pixels")
        return tuple(dict.fromkeys(int(t) for t in tiles))

    def _chunk_size(self, h: int, w: int) -> int:
        per_mask = (h + 2) * (w + 2)
        if per_mask >= 2**31:
            raise ValueError(f"masks of {h}x{w} pixels are too large for int32 pixel ranks; crop them")
        return max(1, self.max_pixels // per_mask)

    # --------------------------------------------------------------------------------------- targets

    def prepare_targets(
        self,
        gt: ArrayLike | Tensor,
        fov: ArrayLike | Tensor | None = None,
        *,
        tiles: Sequence[int] | None = None,
    ) -> TorchTargets:
        """The GT side of B images, once; keep the result (it lives on the device) and score against it.

        Args:
            gt: bool/0-1 [B, H, W] (or one image [H, W]).
            fov: optional bool [B, H, W] / [H, W], the field of view of each image.
            tiles: tile sizes to prepare now (default ``config.tile_sizes``); others are prepared on first use.
        """
        g = self._masks(gt, "gt")
        g = g[None] if g.ndim == 2 else g
        if g.ndim != 3:
            raise ValueError(f"gt must be [B, H, W] or [H, W], got shape {tuple(g.shape)}")
        if fov is None:
            f = torch.ones_like(g)
        else:
            f = self._masks(fov, "fov")
            f = f[None] if f.ndim == 2 else f
            if f.shape != g.shape:
                raise ValueError(
                    f"fov is {tuple(f.shape)} but gt is {tuple(g.shape)}; pass the FOV of each image"
                )
        g = g & f
        fg = pad(g)
        step = self._chunk_size(*g.shape[1:])
        parts = [
            analyse(fg[i : i + step], holes=self._need_holes, thinning=self.thinning)
            for i in range(0, fg.shape[0], step)
        ]
        target = TorchTargets(
            gt=fg,
            skeleton=torch.cat([a.skeleton for a in parts]),
            fov=f,
            counts=_cat_counts([a.counts for a in parts]),
        )
        self._tile_targets(target, self._tiles(tiles), parts)
        return target

    def _tile_targets(
        self, target: TorchTargets, tiles: tuple[int, ...], parts: list[Analysis] | None = None
    ) -> None:
        """Fill ``target.tiles`` for the sizes it lacks (re-analysing the GT when needed)."""
        missing = [t for t in tiles if t not in target.tiles]
        if not missing:
            return
        h, w = target.shape
        if parts is None:
            step = self._chunk_size(h, w)
            parts = [
                analyse(target.gt[i : i + step], holes=self._need_holes, thinning=self.thinning)
                for i in range(0, len(target), step)
            ]
        for t in missing:
            grid = _Grid(t, h, w)
            per_part = []
            for a in parts:
                c = _tile_counts(a, grid, None)
                inner = a.fg[:, 1:-1, 1:-1]
                per_part.append(
                    RewardCounts(
                        area=grid.sums(inner),
                        length=grid.sums(a.skeleton[:, 1:-1, 1:-1]),
                        junctions=c.junctions,
                        components=c.components,
                        holes=c.holes,
                    )
                )
            target.tiles[t] = _TileTarget(counts=_cat_counts(per_part), valid=grid.sums(target.fov) > 0)

    # --------------------------------------------------------------------------------------- scoring

    def _rows(self, image: ArrayLike | Tensor | None, n: int, b: int) -> Tensor:
        if image is None:
            if b == 1:
                return torch.zeros(n, dtype=torch.int64, device=self.device)
            if b == n:
                return torch.arange(n, device=self.device)
            raise ValueError(
                f"{n} masks against {b} targets: pass image=[row of targets for each mask] (int, shape [{n}])"
            )
        rows = torch.as_tensor(image, dtype=torch.int64).to(self.device).reshape(-1)
        if rows.numel() != n:
            raise ValueError(f"image has {rows.numel()} rows for {n} masks; give one target row per mask")
        if n and (int(rows.min()) < 0 or int(rows.max()) >= b):
            raise ValueError(f"image rows must be in [0, {b}) (the targets hold {b} images)")
        return rows

    def score(
        self,
        masks: ArrayLike | Tensor,
        targets: TorchTargets,
        *,
        image: ArrayLike | Tensor | None = None,
        tiles: Sequence[int] = (),
    ) -> TorchScores:
        """Whole-image and per-tile rewards of N masks from one skeletonisation and labelling.

        Args:
            masks: bool/0-1 [N, H, W] (tensor on any device, or numpy), or [B, K, H, W] (K masks per target
                image, rows in order).
            targets: from :meth:`prepare_targets`, images of the masks' size.
            image: int [N], the row of ``targets`` each mask is scored against; default: all row 0 when
                targets hold one image, mask i -> row i when they hold N.
            tiles: tile sizes to score per tile (none: whole image only).
        Returns:
            :class:`TorchScores`: ``whole`` (float64 [N]) and ``tiles[t]`` (float32 [N, ty, tx]); every value
            equals the numpy ``score`` / ``score_tiles_multi`` bit for bit.
        """
        m = self._masks(masks, "masks")
        if m.ndim == 4 and image is None:
            image = torch.arange(m.shape[0], device=self.device).repeat_interleave(m.shape[1])
            m = m.reshape(-1, *m.shape[2:])
        if m.ndim != 3 or tuple(m.shape[1:]) != targets.shape:
            raise ValueError(
                f"masks are {tuple(m.shape)}; expected [N, H, W] with H, W = {targets.shape} "
                "(use mask[None] for one mask)"
            )
        n, h, w = m.shape
        rows = self._rows(image, n, len(targets))
        tiles = self._tiles(tiles) if tiles else ()
        self._tile_targets(targets, tiles)
        grids = [_Grid(t, h, w) for t in tiles]
        hp = max([h, *(g.ty * g.tile for g in grids)])
        wp = max([w, *(g.tx * g.tile for g in grids)])

        # 1. Counts, chunk by chunk (skeleton and labels once per chunk for every tile size).
        whole, cross, tiled = [], [], {t: ([], []) for t in tiles}
        stats = LabelStats()
        step = self._chunk_size(h, w)
        for lo in range(0, n, step):
            r = rows[lo : lo + step]
            fg = pad(m[lo : lo + step] & targets.fov[r])
            an = analyse(fg, holes=self._need_holes, thinning=self.thinning)
            stats = stats.merge(an.stats)
            k = fg.shape[0]
            # Pixel maps [area, length, |P & G|, |S_P & G|, |S_G & P|], zero-padded to whole tiles of every
            # size: tile sums are then reshapes and reductions (no atomics).
            g, gs = targets.gt.index_select(0, r), targets.skeleton.index_select(0, r)
            touch = g & fg if self._need_touching else None
            maps = torch.zeros((5, k, hp, wp), dtype=torch.bool, device=self.device)
            inside = (slice(None), slice(1, h + 1), slice(1, w + 1))
            for i, (a, b) in enumerate(
                ((fg, fg), (an.skeleton, an.skeleton), (fg, g), (an.skeleton, g), (fg, gs))
            ):
                torch.logical_and(a[inside], b[inside], out=maps[i, :, :h, :w])
            sums = maps.view(torch.uint8)
            cross.append(sums[2:].view(3, k, -1).sum(2, dtype=torch.int64).T)
            whole.append(_with_touching(an, touch))
            for grid in grids:
                tc = _tile_counts(an, grid, touch)
                t = grid.tile
                px = sums[:, :, : grid.ty * t, : grid.tx * t].reshape(5, k, grid.ty, t, grid.tx, t)
                px = px.sum((3, 5), dtype=torch.int64)
                tc = RewardCounts(
                    area=px[0],
                    length=px[1],
                    junctions=tc.junctions,
                    components=tc.components,
                    holes=tc.holes,
                    touching=tc.touching,
                )
                tiled[t][0].append(tc)
                tiled[t][1].append(px[2:].permute(1, 2, 3, 0))

        # 2. Terms: the numpy path's formula on the counts, in float64 on the device.
        pc, x = _cat_counts(whole), torch.cat(cross)
        total, comps = reward_terms(
            self.config, pc, _take(targets.counts, rows), x[:, 0], x[:, 1], x[:, 2], ops=_OPS
        )
        _check_finite(total, comps)
        out_tiles = {}
        for t in tiles:
            tt = targets.tiles[t]
            pc, x = _cat_counts(tiled[t][0]), torch.cat(tiled[t][1])
            total_t, comps_t = reward_terms(
                self.config, pc, _take(tt.counts, rows), x[..., 0], x[..., 1], x[..., 2], ops=_OPS
            )
            _check_finite(total_t, comps_t)
            valid = tt.valid[rows]
            out_tiles[t] = BatchTiles(
                total=torch.where(valid, total_t, 0.0).to(torch.float32),
                components={k: torch.where(valid, v, 0.0).to(torch.float32) for k, v in comps_t.items()},
                valid=valid,
                tile=t,
            )
        return TorchScores(whole=BatchRewards(total=total, components=comps), tiles=out_tiles, stats=stats)

    def score_batch(
        self, masks: ArrayLike | Tensor, targets: TorchTargets, *, image: ArrayLike | Tensor | None = None
    ) -> BatchRewards:
        """Whole-image rewards of N masks [N, H, W] (see :meth:`score`); ``.results()`` gives the
        :class:`RewardResult` list ``MultiObjectiveReward.score`` would."""
        return self.score(masks, targets, image=image).whole

    def score_tiles_multi(
        self,
        masks: ArrayLike | Tensor,
        targets: TorchTargets,
        *,
        tiles: Sequence[int] | None = None,
        image: int = 0,
    ) -> dict[int, TiledRewards]:
        """``MultiObjectiveReward.score_tiles_multi`` for K masks [K, H, W] of image ``image`` of the
        targets: {tile: TiledRewards} as numpy arrays, bit-identical."""
        m = self._masks(masks, "masks")
        if m.ndim != 3:
            raise ValueError(f"masks are {tuple(m.shape)}; expected [K, H, W] (use mask[None] for one mask)")
        rows = torch.full((m.shape[0],), int(image), dtype=torch.int64)
        s = self.score(m, targets, image=rows, tiles=self._tiles(tiles))
        return {t: bt.tiled() for t, bt in s.tiles.items()}


def _cat_counts(parts: Sequence[RewardCounts]) -> RewardCounts:
    def cat(name: str) -> Tensor | None:
        xs = [getattr(p, name) for p in parts]
        return None if any(x is None for x in xs) else torch.cat(xs)

    return RewardCounts(
        area=torch.cat([p.area for p in parts]),
        length=torch.cat([p.length for p in parts]),
        junctions=torch.cat([p.junctions for p in parts]),
        components=torch.cat([p.components for p in parts]),
        holes=cat("holes"),
        touching=cat("touching"),
    )


def _take(c: RewardCounts, rows: Tensor) -> RewardCounts:
    """The counts of the given image rows (GT counts per mask)."""
    return RewardCounts(
        area=c.area[rows],
        length=c.length[rows],
        junctions=c.junctions[rows],
        components=c.components[rows],
        holes=None if c.holes is None else c.holes[rows],
    )


def _with_touching(an: Analysis, touch: Tensor | None) -> RewardCounts:
    """The whole-mask counts, with the components touching the GT when ``touch`` (the padded foreground on
    the GT) is given: distinct roots of the run starts of ``touch`` (each such component has one, and a
    ``touch`` run lies inside one component)."""
    if touch is None:
        return an.counts
    starts = run_starts(touch).reshape(-1).nonzero().squeeze(1)
    roots = torch.unique(an.components.root_of(starts))
    per_mask = torch.zeros_like(an.counts.components)
    per_mask.index_add_(
        0, an.components.runs.index_select(0, roots) // touch[0].numel(), torch.ones_like(roots)
    )
    return dataclasses.replace(an.counts, touching=per_mask)


def _check_finite(total: Tensor, comps: dict[str, Tensor]) -> None:
    """NaN/inf guard as in the numpy path (one host sync)."""
    if not bool(torch.isfinite(total).all()):
        bad = sorted(k for k, v in comps.items() if not bool(torch.isfinite(v).all()))
        raise FloatingPointError(f"reward is not finite (non-finite components: {bad}); please report this")
