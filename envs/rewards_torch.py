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

1. Skeleton: scikit-image's 2-D ``skeletonize`` (``_fast_skeletonize``, Zhang-Suen) is a parallel algorithm:
   each of the two sub-iterations of a pass reads the previous state and removes every flagged pixel at once
   (neighbourhood code of 8 weighted neighbours, lookup in its 256-entry table). It runs block-sparse (only
   blocks near a recent change are visited, which is exact) as one fused Triton kernel per sub-iteration on
   CUDA, or as torch ops (shifted adds, table gather) anywhere; one host sync per pass.
2. Connected components, labelled by runs (maximal horizontal segments of member pixels): edges from run
   starts to the runs above and below; rounds of hooking every root onto the smallest root across its edges
   (``scatter_reduce`` amin) and pointer jumping ``L = L[L]`` until stable, dropping edges inside a component.
   A root is its component's first run, so its first pixel in raster order: the canonical label the tile
   rules need. Holes are 4-connected background components of the mask padded by one background pixel that
   are not the padded corner's, like :func:`envs.metrics.hole_labels` (only when the Betti term is weighted).
3. Counts: pixel counts per mask and per tile from dense maps (tile sums are reshapes and reductions);
   distinct (tile, component) pairs for components and holes, as ``_distinct_per_tile``; a junction cluster
   in the tile of its first pixel.
4. Terms: :func:`envs.rewards.reward_terms`, the numpy path's own formula, run with torch ops in float64.

Exactness contract: for masks whose values are 0/1, every count (pixels, skeleton, junction clusters,
components, holes; per image and per tile) equals the numpy path's exactly, and the terms come from the same
formula of exactly rounded float64 operations, so totals and every component are bit-identical on CPU and
CUDA (``tests/unit/test_rewards_torch.py``, ``tests/gpu/test_rewards_torch_cuda.py``).

torch only: no Ray, and no CUDA needed (``device="cpu"`` works everywhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from numpy.typing import ArrayLike

try:  # the fused thinning kernel (CUDA); without it the torch ops run everywhere
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from envs.metrics import ArrayOps
from envs.rewards import (
    RewardConfig,
    RewardCounts,
    RewardResult,
    TiledRewards,
    reward_terms,
)

__all__ = [
    "THINNING",
    "BatchRewards",
    "BatchTiles",
    "LabelStats",
    "TorchReward",
    "TorchScores",
    "TorchTargets",
    "label",
    "skeletonize",
]

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------- skeleton

_ZHANG_SUEN_TABLE = (
    "0001001300311013",
    "0000000020203033",
    "0000000030000000",
    "0000000020003022",
    "0000000000000000",
    "0000000000000000",
    "2000000020002000",
    "3000000030003020",
    "0031001300000001",
    "0000000000000001",
    "3100000000000000",
    "2000000000000000",
    "2313001300000001",
    "0000000000000000",
    "2301000100000000",
    "3301000022002000",
)
"""scikit-image's thinning table (``lut`` in ``skimage/morphology/_skeletonize_various_cy.pyx``, BSD-3, same in
0.19-0.26): row r, column c is neighbourhood code 16 r + c; 1 = remove in the first sub-iteration, 2 = in the
second, 3 = in both. It is not plain Zhang-Suen (25 codes differ), hence the table; the unit tests check it
against ``skimage.morphology.skeletonize`` on all 256 neighbourhoods and on random masks."""

_NEIGHBOURS = (
    (-1, -1, 1),
    (-1, 0, 2),
    (-1, 1, 4),
    (0, 1, 8),
    (1, 1, 16),
    (1, 0, 32),
    (1, -1, 64),
    (0, -1, 128),
)
"""(row offset, column offset, weight) of each neighbour in the table's code: NW 1, N 2, NE 4, E 8, SE 16,
S 32, SW 64, W 128."""

_BLOCK = 32
"""Block size (pixels) of the block-sparse thinning: small enough that thick vessels leave most blocks idle,
large enough that the per-block halo (2 rows and columns) costs little."""


def _removal_tables(device: torch.device) -> Tensor:
    """uint8 [2, 256]: 1 where a pixel with that neighbourhood code is removed in sub-iteration 1 / 2."""
    codes = torch.tensor([int(ch) for row in _ZHANG_SUEN_TABLE for ch in row], dtype=torch.uint8)
    first = (codes == 1) | (codes == 3)
    second = (codes == 2) | (codes == 3)
    return torch.stack([first, second]).to(device=device, dtype=torch.uint8)


def _dilate_blocks(b: Tensor) -> Tensor:
    """3x3 dilation of block flags bool [N, by, bx]."""
    out = b.clone()
    out[:, 1:, :] |= b[:, :-1, :]
    out[:, :-1, :] |= b[:, 1:, :]
    row = out.clone()
    out[:, :, 1:] |= row[:, :, :-1]
    out[:, :, :-1] |= row[:, :, 1:]
    return out


THINNING = ("auto", "torch", "triton")
"""Thinning back-ends: "torch" (any device), "triton" (one fused kernel per sub-iteration; CUDA, or CPU under
TRITON_INTERPRET=1 for tests), "auto" (triton on CUDA when it imports, else torch). Same result bit for bit."""


def _backend(thinning: str, device: torch.device) -> str:
    if thinning not in THINNING:
        raise ValueError(f"thinning is {thinning!r}; choose one of {THINNING}")
    if thinning == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if thinning == "triton" and triton is None:
        raise ValueError("thinning='triton' needs the triton package; use 'torch' (or 'auto')")
    return thinning


def _thin(x: Tensor, *, thinning: str = "auto", block: int = _BLOCK) -> int:
    """Thin padded uint8 0/1 masks [N, H+2, W+2] (zero ring) in place to their skeletons; returns the number
    of passes (the last one removes nothing), as scikit-image's loop runs them on the slowest mask.

    Block-sparse: the image is cut into ``block`` x ``block`` blocks and a sub-iteration only visits blocks
    where something in the 3x3 block neighbourhood changed during the last two sub-iterations (since this
    sub-iteration's table last ran). Any other block sees exactly the neighbourhoods it saw then, under the
    same table, and removed nothing then, so it would remove nothing now: skipping it is exact. On vessel
    masks most blocks are final after a few passes while the thickest vessels need tens (34 passes at
    2048x2048, but only ~3 full images' worth of block visits).
    """
    backend = _backend(thinning, x.device)
    tables = _removal_tables(x.device)
    n, h2, w2 = x.shape
    by, bx = -(-(h2 - 2) // block), -(-(w2 - 2) // block)
    hp, wp = by * block + 2, bx * block + 2
    xp = x
    if (hp, wp) != (h2, w2):  # pad to whole blocks: more background changes no skeleton
        xp = torch.zeros((n, hp, wp), dtype=x.dtype, device=x.device)
        xp[:, :h2, :w2] = x
    strides = (hp * wp, block * wp, block, wp, 1)
    # Each block's own pixels, a view (blocks do not overlap).
    inner = xp.as_strided((n, by, bx, block, block), strides, storage_offset=wp + 1)
    occupied = inner.amax((3, 4)) > 0  # blocks without foreground never change
    step = _TritonThinning if backend == "triton" else _TorchThinning
    state = step(xp, inner, occupied, tables, block)
    passes = 0
    while True:
        changed = [state.sub_iteration(t) for t in (0, 1)]
        passes += 1
        if not bool((changed[0] | changed[1]).any()):  # host sync; a pass that removed nothing: done
            break
    if xp is not x:
        x.copy_(xp[:, :h2, :w2])
    return passes


class _TorchThinning:
    """Sub-iterations with torch ops: gather the visited blocks with their halo, code, table, write back."""

    def __init__(self, xp: Tensor, inner: Tensor, occupied: Tensor, tables: Tensor, block: int) -> None:
        n, by, bx = occupied.shape
        wp = xp.shape[2]
        strides = (xp.shape[1] * wp, block * wp, block, wp, 1)
        self.halo = xp.as_strided((n, by, bx, block + 2, block + 2), strides)  # overlapping: read only
        self.inner, self.occupied, self.tables, self.block = inner, occupied, tables, block
        self.recent = [occupied, occupied]  # blocks changed in the last two sub-iterations (all, to start)

    def sub_iteration(self, t: int) -> Tensor:
        b = self.block
        visit = (_dilate_blocks(self.recent[0] | self.recent[1]) & self.occupied).nonzero()  # host sync
        changed = torch.zeros_like(self.occupied)
        if visit.shape[0]:
            i, r, c = visit.unbind(1)
            tiles = self.halo[i, r, c]  # [V, block+2, block+2] copies: reads see the previous state
            # 1. Neighbourhood code of every pixel: 8 weighted shifted adds.
            (dr, dc, _), *rest = _NEIGHBOURS
            code = tiles[:, 1 + dr : 1 + dr + b, 1 + dc : 1 + dc + b].contiguous()
            for dr, dc, weight in rest:
                code.add_(tiles[:, 1 + dr : 1 + dr + b, 1 + dc : 1 + dc + b], alpha=weight)
            # 2. Remove every flagged foreground pixel at once.
            removed = self.tables[t].index_select(0, code.view(-1).int()).view_as(code)
            centre = tiles[:, 1:-1, 1:-1]
            removed &= centre
            self.inner[i, r, c] = centre - removed
            changed[i, r, c] = removed.view(removed.shape[0], -1).any(1).bool()  # any() of uint8 is uint8
        self.recent = [self.recent[1], changed]
        return changed


class _TritonThinning:
    """Sub-iterations as two kernels over the occupied blocks (no host sync): ``_zs_visit`` decides from the
    block flags whether a block may change, computes its new pixels into a buffer and flags a change;
    ``_zs_write`` then copies the visited blocks back (a second launch, so every read saw the old state)."""

    def __init__(self, xp: Tensor, inner: Tensor, occupied: Tensor, tables: Tensor, block: int) -> None:
        _, by, bx = occupied.shape
        hp, wp = xp.shape[1:]
        cells = occupied.reshape(-1).nonzero().squeeze(1)  # host sync, once
        m, rem = cells // (by * bx), cells % (by * bx)
        self.base = m * hp * wp + (rem // bx * block + 1) * wp + rem % bx * block + 1  # first pixel of each
        self.xp, self.cells, self.tables, self.block, self.shape = xp, cells, tables, block, (by, bx, wp)
        self.active = torch.zeros(cells.numel(), dtype=torch.uint8, device=xp.device)
        self.out = torch.empty((cells.numel(), block, block), dtype=torch.uint8, device=xp.device)
        flags = occupied.to(torch.uint8).reshape(-1)
        self.recent = [flags, flags]

    def sub_iteration(self, t: int) -> Tensor:
        by, bx, wp = self.shape
        changed = torch.zeros_like(self.recent[0])
        v = self.cells.numel()
        if v:
            _zs_visit[(v,)](self.xp, self.tables[t], self.base, self.cells, self.recent[0], self.recent[1],
                            changed, self.active, self.out, by, bx, wp, BLOCK=self.block)  # fmt: skip
            _zs_write[(v,)](self.xp, self.base, self.active, self.out, wp, BLOCK=self.block)
        self.recent = [self.recent[1], changed]
        return changed


if triton is not None:

    @triton.jit
    def _zs_visit(
        x, table, base, cells, recent0, recent1, changed, active, out, by, bx, wp, BLOCK: tl.constexpr
    ):
        v = tl.program_id(0)
        cell = tl.load(cells + v)
        per_mask = by * bx
        m, r, c = cell // per_mask, cell % per_mask // bx, cell % bx
        act = tl.load(recent0 + cell) | tl.load(recent1 + cell)
        for dr in tl.static_range(-1, 2):
            for dc in tl.static_range(-1, 2):
                ok = (r + dr >= 0) & (r + dr < by) & (c + dc >= 0) & (c + dc < bx)
                nb = m * per_mask + (r + dr) * bx + (c + dc)
                act |= tl.load(recent0 + nb, mask=ok, other=0) | tl.load(recent1 + nb, mask=ok, other=0)
        tl.store(active + v, act)
        if act != 0:
            rows = tl.arange(0, BLOCK)[:, None]
            cols = tl.arange(0, BLOCK)[None, :]
            p = tl.load(base + v) + rows * wp + cols
            centre = tl.load(x + p).to(tl.int32)
            code = (
                tl.load(x + p - wp - 1).to(tl.int32)
                + 2 * tl.load(x + p - wp).to(tl.int32)
                + 4 * tl.load(x + p - wp + 1).to(tl.int32)
                + 8 * tl.load(x + p + 1).to(tl.int32)
                + 16 * tl.load(x + p + wp + 1).to(tl.int32)
                + 32 * tl.load(x + p + wp).to(tl.int32)
                + 64 * tl.load(x + p + wp - 1).to(tl.int32)
                + 128 * tl.load(x + p - 1).to(tl.int32)
            )
            removed = tl.load(table + code).to(tl.int32) & centre
            tl.store(out + v * BLOCK * BLOCK + rows * BLOCK + cols, (centre - removed).to(tl.uint8))
            tl.store(changed + cell, tl.max(tl.max(removed, 1), 0).to(tl.uint8))

    @triton.jit
    def _zs_write(x, base, active, out, wp, BLOCK: tl.constexpr):
        v = tl.program_id(0)
        if tl.load(active + v) != 0:
            rows = tl.arange(0, BLOCK)[:, None]
            cols = tl.arange(0, BLOCK)[None, :]
            p = tl.load(base + v) + rows * wp + cols
            tl.store(x + p, tl.load(out + v * BLOCK * BLOCK + rows * BLOCK + cols))


def _neighbour_count(s: Tensor) -> Tensor:
    """8-neighbour count of the interior of padded uint8 0/1 masks [N, H+2, W+2] -> uint8 [N, H, W]."""
    _, h2, w2 = s.shape
    h, w = h2 - 2, w2 - 2
    out = torch.zeros((s.shape[0], h, w), dtype=torch.uint8, device=s.device)
    for dr, dc, _ in _NEIGHBOURS:
        out += s[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]
    return out


# ------------------------------------------------------------------------------------------ labelling


@dataclass(frozen=True)
class LabelStats:
    """Iteration counts of one scoring call (maxima over chunks), for benchmarks and tuning."""

    skeleton_passes: int = 0
    """Thinning passes of the slowest mask (about half the thickest vessel's width, plus one)."""
    component_rounds: int = 0
    """Hooking rounds of the foreground labelling (8-connected)."""
    component_jumps: int = 0
    """Pointer-jumping steps of the foreground labelling, all rounds together."""
    hole_rounds: int = 0
    """Hooking rounds of the background labelling (only with a weighted Betti term)."""
    hole_jumps: int = 0
    """Pointer-jumping steps of the background labelling."""

    def merge(self, other: LabelStats) -> LabelStats:
        """The larger of each count."""
        return LabelStats(
            **{f.name: max(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        )


@dataclass(frozen=True, eq=False)
class _Labels:
    """Connected components of the member pixels of a padded stack [N, H+2, W+2], labelled by runs (maximal
    horizontal segments of member pixels in one row)."""

    runs: Tensor
    """int64 [R]: flat index of the first pixel of each run, ascending (so raster order within a mask)."""
    root: Tensor
    """int64 [R]: each run's root run, the first run of its component; its first pixel is the component's
    first pixel in raster order."""
    rounds: int
    jumps: int

    @property
    def is_root(self) -> Tensor:
        """bool [R]: runs that are the first run of their component."""
        return self.root == torch.arange(self.root.numel(), device=self.root.device)

    def root_of(self, flat: Tensor) -> Tensor:
        """Root run of member pixels given by flat index -> int64 [n]."""
        run = torch.searchsorted(self.runs, flat, right=True) - 1
        return self.root.index_select(0, run)


def _run_starts(member: Tensor) -> Tensor:
    """bool [N, H2, W2]: member pixels whose left neighbour (same row) is not a member."""
    start = member.clone()
    start[:, :, 1:] &= ~member[:, :, :-1]
    return start


def _label(member: Tensor, connectivity: int) -> _Labels:
    """Connected components of a padded bool stack [N, H+2, W+2]; none crosses from one mask to the next.

    Nodes are runs. Two runs in adjacent rows touch iff the start pixel of one of them touches the other
    (the one starting later starts next to or over the other), so edges join each run start to the member
    pixels above and below it (3 + 3 for 8-connectivity, 1 + 1 for 4). Then rounds of: hook every root onto
    the smallest root across its edges (scatter amin), jump pointers until each run points at its root, drop
    the edges now inside one component. Pointers only go to smaller runs, so the root is the first run.
    """
    _, h2, w2 = member.shape
    flat = member.reshape(-1)
    runs = _run_starts(member).reshape(-1).nonzero().squeeze(1)  # host sync
    me = torch.arange(runs.numel(), device=member.device)
    if runs.numel() == 0:
        return _Labels(runs=runs, root=me, rounds=0, jumps=0)
    # 1. Edges from each run start to the runs it touches in the rows above and below.
    rc = runs % (h2 * w2)
    r, c = rc // w2, rc % w2
    cols = (-1, 0, 1) if connectivity == 8 else (0,)
    us, vs = [], []
    for dr in (-1, 1):
        for dc in cols:
            nb = (runs + (dr * w2 + dc)).clamp_(0, flat.numel() - 1)
            ok = (r + dr >= 0) & (r + dr < h2) & (c + dc >= 0) & (c + dc < w2) & flat.index_select(0, nb)
            run = torch.searchsorted(runs, nb, right=True) - 1
            vs.append(torch.where(ok, run, me))  # no neighbour: a self-loop, dropped in round 1
            us.append(me)
    u, v = torch.cat(us), torch.cat(vs)
    # 2. Hook and jump until no edge joins two components.
    parent, rounds, jumps = me.clone(), 0, 0
    while True:
        lu, lv = parent.index_select(0, u), parent.index_select(0, v)
        cross = (lu != lv).nonzero().squeeze(1)  # host sync; edges inside a component are done for good
        if cross.numel() == 0:
            break
        rounds += 1
        u, v = u.index_select(0, cross), v.index_select(0, cross)
        lu, lv = lu.index_select(0, cross), lv.index_select(0, cross)
        parent.scatter_reduce_(0, torch.maximum(lu, lv), torch.minimum(lu, lv), reduce="amin")
        while True:
            jumped = parent.index_select(0, parent)  # on CPU ~10x faster than parent[parent]
            jumps += 1
            if torch.equal(jumped, parent):  # host sync
                break
            parent = jumped
    return _Labels(runs=runs, root=parent, rounds=rounds, jumps=jumps)


def _pad(masks: Tensor) -> Tensor:
    """bool [N, H, W] -> bool [N, H+2, W+2] with a False ring."""
    n, h, w = masks.shape
    out = torch.zeros((n, h + 2, w + 2), dtype=torch.bool, device=masks.device)
    out[:, 1:-1, 1:-1] = masks
    return out


def _per_mask(flat_idx: Tensor, hw2: int, n_masks: int) -> Tensor:
    """How many of the flat (padded) indices fall in each mask -> int64 [n_masks]."""
    out = torch.zeros(n_masks, dtype=torch.int64, device=flat_idx.device)
    return out.index_add_(0, flat_idx // hw2, torch.ones_like(flat_idx))


@dataclass(frozen=True, eq=False)
class _Analysis:
    """Skeleton, labels and whole-mask counts of a padded stack of masks [N, H+2, W+2]."""

    fg: Tensor
    """bool [N, H+2, W+2], the masks."""
    skeleton: Tensor
    """bool [N, H+2, W+2]."""
    components: _Labels
    """8-connected foreground components."""
    junction_first: Tensor
    """int64 [J]: flat index of the first pixel of each junction cluster."""
    holes: _Labels | None
    """4-connected background components of the padded masks (the ring included), if holes are counted."""
    hole_run: Tensor | None
    """bool [R_bg]: background runs in a hole (their component is not the one of the padded corner)."""
    counts: RewardCounts
    """int64 [N] per mask."""
    stats: LabelStats


def _analyse(fg: Tensor, *, holes: bool, thinning: str = "auto") -> _Analysis:
    """Skeletonise and label a padded bool stack [N, H+2, W+2] (masks already ANDed with the FOV); with
    ``holes``, label the background too (b1 and the per-tile hole counts need it)."""
    n, h2, w2 = fg.shape
    hw2 = h2 * w2
    x = fg.to(torch.uint8)
    passes = _thin(x, thinning=thinning)
    skel = x.bool()
    junctions = torch.zeros_like(fg)
    junctions[:, 1:-1, 1:-1] = skel[:, 1:-1, 1:-1] & (_neighbour_count(x) >= 3)
    comps = _label(fg, 8)
    jl = _label(junctions, 8)
    junction_first = jl.runs[jl.is_root]
    hl, hole_run, b1 = None, None, None
    if holes:
        hl = _label(~fg, 4)
        # The padded corner always lies in the outer background and starts its first run, so a background
        # component is a hole unless its first pixel is that corner.
        hole_run = hl.runs.index_select(0, hl.root) % hw2 != 0
        b1 = _per_mask(hl.runs[hl.is_root & hole_run], hw2, n)
    counts = RewardCounts(
        area=fg.view(n, -1).sum(1),
        length=skel.view(n, -1).sum(1),
        junctions=_per_mask(junction_first, hw2, n),
        components=_per_mask(comps.runs[comps.is_root], hw2, n),
        holes=b1,
    )
    stats = LabelStats(
        skeleton_passes=passes,
        component_rounds=comps.rounds,
        component_jumps=comps.jumps,
        hole_rounds=0 if hl is None else hl.rounds,
        hole_jumps=0 if hl is None else hl.jumps,
    )
    return _Analysis(
        fg=fg,
        skeleton=skel,
        components=comps,
        junction_first=junction_first,
        holes=hl,
        hole_run=hole_run,
        counts=counts,
        stats=stats,
    )


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
        h2, w2 = self.h + 2, self.w + 2
        m, rem = flat // (h2 * w2), flat % (h2 * w2)
        return m, rem // w2 - 1, rem % w2 - 1

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
        keep = _run_starts(member) | (member & tile_col)
        keep[:, 1:, :] &= ~(member[:, :-1, :] & ~tile_row[:, 1:, :])
        return keep.reshape(-1).nonzero().squeeze(1)

    def distinct(
        self, labels: _Labels, member: Tensor, n_masks: int, hole_run: Tensor | None = None
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


def _tile_counts(an: _Analysis, grid: _Grid) -> RewardCounts:
    """Components, holes and junctions per tile of an analysed stack (the pixel sums are done by the
    caller)."""
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
        thinning: the skeleton back-end (:data:`THINNING`); "auto" uses the fused Triton kernel on CUDA.
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
        self.thinning = _backend(thinning, self.device)
        self._need_holes = config.weights.betti > 0

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
        fg = _pad(g)
        step = self._chunk_size(*g.shape[1:])
        parts = [
            _analyse(fg[i : i + step], holes=self._need_holes, thinning=self.thinning)
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
        self, target: TorchTargets, tiles: tuple[int, ...], parts: list[_Analysis] | None = None
    ) -> None:
        """Fill ``target.tiles`` for the sizes it lacks (re-analysing the GT when needed)."""
        missing = [t for t in tiles if t not in target.tiles]
        if not missing:
            return
        h, w = target.shape
        if parts is None:
            step = self._chunk_size(h, w)
            parts = [
                _analyse(target.gt[i : i + step], holes=self._need_holes, thinning=self.thinning)
                for i in range(0, len(target), step)
            ]
        for t in missing:
            grid = _Grid(t, h, w)
            per_part = []
            for a in parts:
                c = _tile_counts(a, grid)
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
            fg = _pad(m[lo : lo + step] & targets.fov[r])
            an = _analyse(fg, holes=self._need_holes, thinning=self.thinning)
            stats = stats.merge(an.stats)
            k = fg.shape[0]
            # Pixel maps [area, length, |P & G|, |S_P & G|, |S_G & P|], zero-padded to whole tiles of every
            # size: tile sums are then reshapes and reductions (no atomics).
            g, gs = targets.gt.index_select(0, r), targets.skeleton.index_select(0, r)
            maps = torch.zeros((5, k, hp, wp), dtype=torch.bool, device=self.device)
            inside = (slice(None), slice(1, h + 1), slice(1, w + 1))
            for i, (a, b) in enumerate(
                ((fg, fg), (an.skeleton, an.skeleton), (fg, g), (an.skeleton, g), (fg, gs))
            ):
                torch.logical_and(a[inside], b[inside], out=maps[i, :, :h, :w])
            sums = maps.view(torch.uint8)
            cross.append(sums[2:].view(3, k, -1).sum(2, dtype=torch.int64).T)
            whole.append(an.counts)
            for grid in grids:
                tc = _tile_counts(an, grid)
                t = grid.tile
                px = sums[:, :, : grid.ty * t, : grid.tx * t].reshape(5, k, grid.ty, t, grid.tx, t)
                px = px.sum((3, 5), dtype=torch.int64)
                tc = RewardCounts(
                    area=px[0],
                    length=px[1],
                    junctions=tc.junctions,
                    components=tc.components,
                    holes=tc.holes,
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
    holes = [p.holes for p in parts]
    return RewardCounts(
        area=torch.cat([p.area for p in parts]),
        length=torch.cat([p.length for p in parts]),
        junctions=torch.cat([p.junctions for p in parts]),
        components=torch.cat([p.components for p in parts]),
        holes=None if any(h is None for h in holes) else torch.cat(holes),
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


def _check_finite(total: Tensor, comps: dict[str, Tensor]) -> None:
    """NaN/inf guard as in the numpy path (one host sync)."""
    if not bool(torch.isfinite(total).all()):
        bad = sorted(k for k, v in comps.items() if not bool(torch.isfinite(v).all()))
        raise FloatingPointError(f"reward is not finite (non-finite components: {bad}); please report this")


# ------------------------------------------------------------------------------------- public helpers


def skeletonize(masks: Tensor, *, thinning: str = "auto") -> Tensor:
    """Skeletons of a stack of masks, bool [N, H, W] -> bool [N, H, W], each equal to scikit-image's
    ``skeletonize`` (2-D, Zhang-Suen) of that mask; ``thinning`` picks the back-end (:data:`THINNING`)."""
    x = _pad(masks.bool()).to(torch.uint8)
    _thin(x, thinning=thinning)
    return x[:, 1:-1, 1:-1].bool()


def label(masks: Tensor, *, connectivity: int = 8) -> tuple[Tensor, Tensor]:
    """Connected components of each mask of a stack bool [N, H, W].

    Args:
        masks: the stack.
        connectivity: 8 (foreground, b0) or 4 (background holes).
    Returns:
        labels: int64 [N, H, W], 0 off the mask, else 1 + the raster index (r * W + c) of the component's
            first pixel in raster order.
        counts: int64 [N], components per mask (what ``scipy.ndimage.label`` returns as its count).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity is {connectivity!r}; use 8 (foreground) or 4 (background)")
    n, h, w = masks.shape
    member = _pad(masks.bool())
    lab = _label(member, connectivity)
    grid = _Grid(1, h, w)
    idx = member.reshape(-1).nonzero().squeeze(1)
    _, r, c = grid.rc(lab.runs.index_select(0, lab.root_of(idx)))
    m, pr, pc = grid.rc(idx)
    out = torch.zeros(n * h * w, dtype=torch.int64, device=masks.device)
    out[(m * h + pr) * w + pc] = r * w + c + 1
    return out.view(n, h, w), _per_mask(lab.runs[lab.is_root], (h + 2) * (w + 2), n)
