"""Binary morphology of mask stacks [N, H, W] on torch tensors, on any device, equal to scikit-image and scipy:
the skeleton and connected-component pieces of the torch GT reward (``envs/rewards_torch.py``)::

    skeletonize(masks)                     # bool [N, H, W], each scikit-image's skeletonize of that mask
    labels, counts = label(masks)          # 8-connected components (4 for background holes), first-pixel ids
    an = analyse(pad(masks), holes=True)   # skeleton, labels and whole-mask counts at once (the reward's input)

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

Tested against ``skimage.morphology.skeletonize`` (all 256 neighbourhoods, shapes, vessel trees) and
``scipy.ndimage.label`` in ``tests/unit/test_rewards_torch.py`` (CPU) and ``tests/gpu/test_rewards_torch_cuda.py``.

torch only: no Ray, and no CUDA needed (``triton`` is optional: the fused kernel runs only on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

try:  # the fused thinning kernel (CUDA); without it the torch ops run everywhere
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from envs.rewards import RewardCounts

__all__ = [
    "THINNING",
    "Analysis",
    "LabelStats",
    "Labels",
    "analyse",
    "label",
    "pad",
    "pixel_rc",
    "run_starts",
    "skeletonize",
    "thinning_backend",
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


def thinning_backend(thinning: str, device: torch.device) -> str:
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
    backend = thinning_backend(thinning, x.device)
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
class Labels:
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


def run_starts(member: Tensor) -> Tensor:
    """bool [N, H2, W2]: member pixels whose left neighbour (same row) is not a member."""
    start = member.clone()
    start[:, :, 1:] &= ~member[:, :, :-1]
    return start


def _label(member: Tensor, connectivity: int) -> Labels:
    """Connected components of a padded bool stack [N, H+2, W+2]; none crosses from one mask to the next.

    Nodes are runs. Two runs in adjacent rows touch iff the start pixel of one of them touches the other
    (the one starting later starts next to or over the other), so edges join each run start to the member
    pixels above and below it (3 + 3 for 8-connectivity, 1 + 1 for 4). Then rounds of: hook every root onto
    the smallest root across its edges (scatter amin), jump pointers until each run points at its root, drop
    the edges now inside one component. Pointers only go to smaller runs, so the root is the first run.
    """
    _, h2, w2 = member.shape
    flat = member.reshape(-1)
    runs = run_starts(member).reshape(-1).nonzero().squeeze(1)  # host sync
    me = torch.arange(runs.numel(), device=member.device)
    if runs.numel() == 0:
        return Labels(runs=runs, root=me, rounds=0, jumps=0)
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
    return Labels(runs=runs, root=parent, rounds=rounds, jumps=jumps)


def pad(masks: Tensor) -> Tensor:
    """bool [N, H, W] -> bool [N, H+2, W+2] with a False ring."""
    n, h, w = masks.shape
    out = torch.zeros((n, h + 2, w + 2), dtype=torch.bool, device=masks.device)
    out[:, 1:-1, 1:-1] = masks
    return out


def pixel_rc(flat: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mask, row, col) of flat indices into a padded stack [N, H+2, W+2], row/col in image coordinates."""
    h2, w2 = h + 2, w + 2
    m, rem = flat // (h2 * w2), flat % (h2 * w2)
    return m, rem // w2 - 1, rem % w2 - 1


def _per_mask(flat_idx: Tensor, hw2: int, n_masks: int) -> Tensor:
    """How many of the flat (padded) indices fall in each mask -> int64 [n_masks]."""
    out = torch.zeros(n_masks, dtype=torch.int64, device=flat_idx.device)
    return out.index_add_(0, flat_idx // hw2, torch.ones_like(flat_idx))


@dataclass(frozen=True, eq=False)
class Analysis:
    """Skeleton, labels and whole-mask counts of a padded stack of masks [N, H+2, W+2]."""

    fg: Tensor
    """bool [N, H+2, W+2], the masks."""
    skeleton: Tensor
    """bool [N, H+2, W+2]."""
    components: Labels
    """8-connected foreground components."""
    junction_first: Tensor
    """int64 [J]: flat index of the first pixel of each junction cluster."""
    holes: Labels | None
    """4-connected background components of the padded masks (the ring included), if holes are counted."""
    hole_run: Tensor | None
    """bool [R_bg]: background runs in a hole (their component is not the one of the padded corner)."""
    counts: RewardCounts
    """int64 [N] per mask."""
    stats: LabelStats


def analyse(fg: Tensor, *, holes: bool, thinning: str = "auto") -> Analysis:
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
    return Analysis(
        fg=fg,
        skeleton=skel,
        components=comps,
        junction_first=junction_first,
        holes=hl,
        hole_run=hole_run,
        counts=counts,
        stats=stats,
    )


# ------------------------------------------------------------------------------------- public helpers


def skeletonize(masks: Tensor, *, thinning: str = "auto") -> Tensor:
    """Skeletons of a stack of masks, bool [N, H, W] -> bool [N, H, W], each equal to scikit-image's
    ``skeletonize`` (2-D, Zhang-Suen) of that mask; ``thinning`` picks the back-end (:data:`THINNING`)."""
    x = pad(masks.bool()).to(torch.uint8)
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
    member = pad(masks.bool())
    lab = _label(member, connectivity)
    idx = member.reshape(-1).nonzero().squeeze(1)
    _, r, c = pixel_rc(lab.runs.index_select(0, lab.root_of(idx)), h, w)
    m, pr, pc = pixel_rc(idx, h, w)
    out = torch.zeros(n * h * w, dtype=torch.int64, device=masks.device)
    out[(m * h + pr) * w + pc] = r * w + c + 1
    return out.view(n, h, w), _per_mask(lab.runs[lab.is_root], (h + 2) * (w + 2), n)
