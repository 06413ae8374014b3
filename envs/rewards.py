"""Multi-objective ground-truth reward for vessel masks: whole image and tiles.

The objective of the original experiments (dice 0.5, recall 0.2, topology 0.2, length 0.1) made bounded
and defined on empty masks and tiles, plus optional clDice and Betti terms::

    reward = MultiObjectiveReward(RewardConfig())
    target = reward.prepare_target(gt, fov)            # once per image: GT skeleton, labels, junctions
    r = reward.score(pred, target)                     # RewardResult(total, components, source="gt")
    t = reward.score_tiles(preds, target, tile=16)     # TiledRewards(total [K, ty, tx], ..., valid [ty, tx])

Everything outside the FOV is ignored: prediction and GT are ANDed with the FOV before skeletons,
components and counts are computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage as ndi

from envs.config_checks import check
from envs.metrics import (
    EIGHT,
    NUMPY_OPS,
    ArrayOps,
    as_mask,
    cldice_from_counts,
    dice_from_counts,
    hole_labels,
    plane_structure,
    precision_from_counts,
    recall_from_counts,
    skeleton,
)
from envs.tile_counts import distinct_per_tile, junction_clusters, labels_touching, pad_to, tile_sum

__all__ = [
    "MultiObjectiveReward",
    "RewardConfig",
    "RewardCounts",
    "RewardResult",
    "RewardSource",
    "RewardWeights",
    "Target",
    "TiledRewards",
    "reward_terms",
]

RewardSource = Literal["gt", "learned"]
"""Where a reward value came from: the GT objective here, or the learned reward net (GT-free)."""

TERMS = ("dice", "recall", "topology", "length", "cldice", "betti", "connectivity")
"""Weighted terms, in the order of :class:`RewardWeights`."""


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class RewardWeights:
    """Weight of each reward term in the total (terms are already scaled, see :class:`RewardConfig`)."""

    dice: float = 0.5
    """Weight of the Dice term (Dice x dice_scale, in [0, dice_scale])."""
    recall: float = 0.2
    """Weight of the recall-shortfall term (negative below ``recall_target``, else 0)."""
    topology: float = 0.2
    """Weight of the topology term (junction agreement minus a component-count penalty)."""
    length: float = 0.1
    """Weight of the skeleton-length term (minus the relative length error)."""
    cldice: float = 0.0
    """Weight of the clDice term (clDice x cldice_scale); 0 leaves it out of the total."""
    betti: float = 0.0
    """Weight of the Betti-error term (-(b0 err + b1 err) x betti_scale, clipped); 0 skips hole labelling."""
    connectivity: float = 0.0
    """Weight of the connectivity term: a Betti-0 error that counts only the predicted components touching the
    GT vessels (-|b0(P touching G) - b0(G)| x connectivity_scale, clipped at betti_clip). A vessel broken into
    pieces costs one per extra piece; a stray blob away from the vessels costs nothing here (Dice charges it)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            check(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                f"RewardWeights.{f.name}",
                f"{v!r}; weights must be finite numbers >= 0 (0 switches a term off)",
            )

    def as_dict(self) -> dict[str, float]:
        """{term name: weight} for every term."""
        return {name: float(getattr(self, name)) for name in TERMS}


@dataclass(frozen=True)
class RewardConfig:
    """The GT reward objective: term weights, term scales and tile sizes."""

    weights: RewardWeights = field(default_factory=RewardWeights)
    """Weight of each term in the total."""
    recall_target: float = 0.85
    """Recall below this is penalised: (recall - target) x recall_scale; at or above it the term is 0."""
    dice_scale: float = 10.0
    """Dice term = Dice x dice_scale."""
    recall_scale: float = 20.0
    """Recall term = (recall - recall_target) x recall_scale when recall < recall_target."""
    topology_scale: float = 5.0
    """Topology term = clip(junction score - component_penalty x |b0 err|, -1, 1) x topology_scale."""
    length_scale: float = 5.0
    """Length term = -|1 - clip(L_pred / L_gt, 0, 2)| x length_scale (skeleton lengths in pixels)."""
    cldice_scale: float = 10.0
    """clDice term = clDice x cldice_scale."""
    betti_scale: float = 1.0
    """Betti term = -min(b0 err + b1 err, betti_clip) x betti_scale."""
    betti_clip: float = 10.0
    """Betti (and connectivity) errors beyond this many count as this many, so those terms are bounded."""
    connectivity_scale: float = 1.0
    """Connectivity term = -min(|b0(P touching G) - b0(G)|, betti_clip) x connectivity_scale."""
    component_penalty: float = 0.1
    """Topology penalty per component of difference |b0(pred) - b0(gt)|."""
    tile_sizes: tuple[int, ...] = (16,)
    """Square tile sizes (pixels) for tiled rewards; the GT side of each is precomputed by prepare_target."""

    def __post_init__(self) -> None:
        check(
            isinstance(self.weights, RewardWeights),
            "RewardConfig.weights",
            f"{self.weights!r}; build it with RewardWeights(dice=..., recall=...)",
        )
        rt = self.recall_target
        check(
            isinstance(rt, int | float) and not isinstance(rt, bool) and 0.0 < rt <= 1.0,
            "RewardConfig.recall_target",
            f"{rt!r}; choose a value in (0, 1]",
        )
        for name in (
            "dice_scale",
            "recall_scale",
            "topology_scale",
            "length_scale",
            "cldice_scale",
            "betti_scale",
            "betti_clip",
            "connectivity_scale",
        ):
            v = getattr(self, name)
            check(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                f"RewardConfig.{name}",
                f"{v!r}; it must be a finite number > 0 (set its weight to 0 instead)",
            )
        cp = self.component_penalty
        check(
            isinstance(cp, int | float) and math.isfinite(cp) and cp >= 0,
            "RewardConfig.component_penalty",
            f"{cp!r}; it must be a finite number >= 0",
        )
        ts = self.tile_sizes
        check(
            isinstance(ts, tuple)
            and bool(ts)
            and all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in ts),
            "RewardConfig.tile_sizes",
            f"{ts!r}; give a non-empty tuple of positive ints, e.g. (16,) or (16, 32)",
        )


# ------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True)
class RewardResult:
    """The reward of one mask.

    Attributes:
        total: sum of weight x term.
        components: the terms (dice, recall, topology, length; cldice, betti and connectivity when weighted
            > 0) and the raw metrics behind them (``*_raw``: dice_raw, recall_raw, precision_raw, cldice_raw,
            junction_score_raw, length_ratio_raw, betti0_err_raw; betti1_err_raw when betti is weighted,
            connectivity_err_raw when connectivity is).
        source: "gt" for this objective; the learned reward net produces "learned".
    """

    total: float
    components: dict[str, float]
    source: RewardSource = "gt"


@dataclass(frozen=True, eq=False)
class TiledRewards:
    """Rewards of K masks, one per tile.

    Attributes:
        total: float32 [K, ty, tx]; 0 where ``valid`` is False.
        components: name -> float32 [K, ty, tx], the same keys as :attr:`RewardResult.components`.
        valid: bool [ty, tx]; False for tiles with no FOV pixel (their rewards are 0, not "perfect").
        tile: tile size in pixels; tile (i, j) covers rows i*tile:(i+1)*tile, cols j*tile:(j+1)*tile of the
            image padded at the bottom/right with False (padding counts as outside the FOV).
        source: "gt" (see :class:`RewardResult`).
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    valid: np.ndarray
    tile: int
    source: RewardSource = "gt"


@dataclass(frozen=True, eq=False)
class RewardCounts:
    """Per-mask (or per-tile) integer counts that the terms are computed from, arrays of one shape (or
    broadcastable): int64 numpy arrays here, int64 tensors in ``envs.rewards_torch``."""

    area: np.ndarray
    """Mask pixels in the FOV."""
    length: np.ndarray
    """Skeleton pixels."""
    junctions: np.ndarray
    """Junctions (8-connected clusters of skeleton pixels with >= 3 skeleton neighbours)."""
    components: np.ndarray
    """8-connected foreground components (b0)."""
    holes: np.ndarray | None
    """Holes (b1); None when the Betti term is not weighted (saves a labelling pass)."""
    touching: np.ndarray | None = None
    """Components with a pixel on the GT (a GT's own count is its ``components``); None when the connectivity
    term is not weighted."""


@dataclass(frozen=True, eq=False)
class _TileTarget:
    """The GT side of one tile size (padded arrays [Hp, Wp], counts [1, ty, tx])."""

    gt: np.ndarray
    skeleton: np.ndarray
    fov: np.ndarray
    valid: np.ndarray
    counts: RewardCounts


@dataclass(frozen=True, eq=False)
class Target:
    """The GT side of the reward, precomputed once per image by :meth:`MultiObjectiveReward.prepare_target`.

    Attributes:
        gt: bool [H, W], already ANDed with the FOV.
        fov: bool [H, W] or None (everything is in view).
        skeleton: bool [H, W], skeleton of ``gt``.
        labels: int32 [H, W], 8-connected component labels of ``gt``.
        holes: int32 [H, W], hole labels of ``gt`` (0 outside holes); None unless the Betti term is weighted.
        junction_rc: int64 [J, 2], (row, col) of the first pixel (raster order) of each junction cluster.
        counts: scalar counts (area, length, junctions, components, holes).
    """

    gt: np.ndarray
    fov: np.ndarray | None
    skeleton: np.ndarray
    labels: np.ndarray
    holes: np.ndarray | None
    junction_rc: np.ndarray
    counts: RewardCounts
    tiles: dict[int, _TileTarget] = field(default_factory=dict, repr=False)
    """Per tile size GT aggregates, built on first use by score_tiles."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.gt.shape  # type: ignore[return-value]

    @property
    def length(self) -> int:
        """GT skeleton length in pixels."""
        return int(self.counts.length)

    @property
    def junctions(self) -> int:
        return int(self.counts.junctions)

    @property
    def components(self) -> int:
        return int(self.counts.components)


# ----------------------------------------------------------------------------------------------- terms


def reward_terms(
    config: RewardConfig,
    pc: RewardCounts,
    gc: RewardCounts,
    tp: ArrayLike,
    sp_in_g: ArrayLike,
    sg_in_p: ArrayLike,
    *,
    ops: ArrayOps = NUMPY_OPS,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Terms and raw metrics from integer counts of any (broadcastable) shape -> (total, components).

    The one formula of the reward: the numpy path (:class:`MultiObjectiveReward`) and the torch path
    (``envs.rewards_torch``, ``ops`` for tensors) both call it, so equal counts give bit-identical float64
    terms. Counts are converted to float64 first (exact below 2**53).

    Args:
        config: weights and scales.
        pc, gc: prediction and GT counts (gc broadcasts against pc, e.g. [1, ty, tx] against [K, ty, tx]).
        tp: |P & G|; sp_in_g: |S_P & G|; sg_in_p: |S_G & P| (S = skeleton), shaped like pc's counts.
        ops: the array operations (numpy by default).
    Returns:
        total (float64, pc's shape) and {name: float64 array}: the weighted terms (dice, recall, topology,
        length; cldice, betti, connectivity when weighted > 0) then the raw metrics (``*_raw``).
    """
    c, w = config, config.weights.as_dict()
    f64 = ops.f64
    tp, sp_in_g, sg_in_p = f64(tp), f64(sp_in_g), f64(sg_in_p)
    p_area, g_area = f64(pc.area), f64(gc.area)
    fp, fn = p_area - tp, g_area - tp
    dice_raw = dice_from_counts(tp, fp, fn, ops=ops)
    recall_raw = recall_from_counts(tp, fp, fn, ops=ops)
    # 1. Dice and recall shortfall. Recall of an empty GT is a convention, not a miss: no penalty.
    dice = dice_raw * c.dice_scale
    recall = ops.where(g_area > 0, ops.minimum(recall_raw - c.recall_target, 0.0) * c.recall_scale, 0.0)
    # 2. Topology: junction agreement minus a component-count penalty, clipped so it stays bounded
    #    however many fragments a prediction has.
    jp, jg = f64(pc.junctions), f64(gc.junctions)
    js = ops.where(jg > 0, ops.minimum(jp, jg) / ops.maximum(jg, 1.0), 1.0 / (1.0 + jp))
    b0_err = ops.abs(f64(pc.components) - f64(gc.components))
    topology = ops.clip(js - c.component_penalty * b0_err, -1.0, 1.0) * c.topology_scale
    # 3. Skeleton length ratio, clipped to [0, 2] (an empty GT skeleton would otherwise divide by 0).
    p_len, g_len = f64(pc.length), f64(gc.length)
    ratio = ops.where(g_len > 0, p_len / ops.maximum(g_len, 1.0), ops.where(p_len > 0, 2.0, 1.0))
    ratio = ops.clip(ratio, 0.0, 2.0)
    length = 0.0 - ops.abs(1.0 - ratio) * c.length_scale  # "0.0 -": no -0.0 in logs
    cl = cldice_from_counts(sp_in_g, p_len, sg_in_p, g_len, ops=ops)

    terms = {"dice": dice, "recall": recall, "topology": topology, "length": length}
    if w["cldice"] > 0:
        terms["cldice"] = cl * c.cldice_scale
    raw = {
        "dice_raw": dice_raw,
        "recall_raw": recall_raw,
        "precision_raw": precision_from_counts(tp, fp, fn, ops=ops),
        "cldice_raw": cl,
        "junction_score_raw": js,
        "length_ratio_raw": ratio,
        "betti0_err_raw": b0_err,
    }
    if w["betti"] > 0:
        if pc.holes is None or gc.holes is None:
            raise ValueError("the Betti term is weighted but the counts have no holes; count them (b1)")
        b1_err = ops.abs(f64(pc.holes) - f64(gc.holes))
        terms["betti"] = -ops.minimum(b0_err + b1_err, c.betti_clip) * c.betti_scale
        raw["betti1_err_raw"] = b1_err
    if w["connectivity"] > 0:
        if pc.touching is None:
            raise ValueError("the connectivity term is weighted but the counts have no touching components")
        conn_err = ops.abs(f64(pc.touching) - f64(gc.components))
        terms["connectivity"] = -ops.minimum(conn_err, c.betti_clip) * c.connectivity_scale
        raw["connectivity_err_raw"] = conn_err
    total = sum(w[k] * v for k, v in terms.items())
    return f64(total), {**terms, **raw}


# ---------------------------------------------------------------------------------------------- reward


class MultiObjectiveReward:
    """Weighted sum of bounded reward terms comparing a predicted vessel mask with the GT.

    Terms (P = prediction, G = GT, both inside the FOV; S = 1-px skeleton; every term is defined for empty
    masks, and empty P with empty G scores the term's best value):

    ============  =======================================================  ===========================
    term          definition                                               bounds
    ============  =======================================================  ===========================
    dice          Dice(P, G) x dice_scale (two empty masks: Dice 1)        [0, dice_scale]
    recall        (recall - target) x recall_scale if recall < target      [-target x recall_scale, 0]
                  else 0; G empty -> 0 (nothing can be missed; false
                  positives are charged by dice/length/topology)
    topology      clip(js - component_penalty x |b0(P) - b0(G)|, -1, 1)     [-topology_scale,
                  x topology_scale, junction score js = min(jP, jG)/jG;     topology_scale]
                  jG = 0 -> js = 1 / (1 + jP) (1 when neither has one)
    length        -|1 - r| x length_scale, r = clip(|S_P| / |S_G|, 0, 2);  [-length_scale, 0]
                  |S_G| = 0 -> r = 1 if |S_P| = 0 else 2
    cldice        clDice(P, G) x cldice_scale (both skeletons empty: 1,    [0, cldice_scale]
                  one empty: 0)
    betti         -min(|b0 err| + |b1 err|, betti_clip) x betti_scale      [-betti_clip x betti_scale, 0]
    connectivity  -min(|b0(P touching G) - b0(G)|, betti_clip)             [-betti_clip x
                  x connectivity_scale (P's components with a pixel on G)   connectivity_scale, 0]
    ============  =======================================================  ===========================

    Total = sum of weight x term over the seven terms; :meth:`bounds` gives its range. cldice, betti and
    connectivity are only computed into the total and components when their weight is > 0 (cldice_raw is always reported:
    it costs a few counts). Junctions are 8-connected clusters of skeleton pixels with >= 3 skeleton
    neighbours (see :func:`envs.metrics.junction_count`).

    Saturation: with component_penalty 0.1 a component difference of >= 20 pins the topology term at
    -topology_scale (a plausible 512x512 prediction with ~20 stray fragments gets there), so at whole-image
    scale it stops ranking samples; tiles (few components each) or a smaller penalty keep it informative.

    Cost: one skeletonisation and two or three labellings per prediction; the GT side is done once by
    :meth:`prepare_target`.
    """

    def __init__(self, config: RewardConfig | None = None) -> None:
        config = RewardConfig() if config is None else config
        if not isinstance(config, RewardConfig):
            raise TypeError(f"config must be a RewardConfig, got {type(config).__name__}")
        self.config = config
        self.weights = config.weights.as_dict()
        self._need_holes = self.weights["betti"] > 0
        self._need_touching = self.weights["connectivity"] > 0

    # ---------------------------------------------------------------------------------------- bounds

    def term_bounds(self) -> dict[str, tuple[float, float]]:
        """(low, high) of every term, the ones with weight 0 included."""
        c = self.config
        return {
            "dice": (0.0, c.dice_scale),
            "recall": (-c.recall_target * c.recall_scale, 0.0),
            "topology": (-c.topology_scale, c.topology_scale),
            "length": (-c.length_scale, 0.0),
            "cldice": (0.0, c.cldice_scale),
            "betti": (-c.betti_clip * c.betti_scale, 0.0),
            "connectivity": (-c.betti_clip * c.connectivity_scale, 0.0),
        }

    def bounds(self) -> tuple[float, float]:
        """(low, high) of the total reward (sum of weight x term bounds)."""
        tb = self.term_bounds()
        lo = sum(self.weights[k] * tb[k][0] for k in TERMS)
        hi = sum(self.weights[k] * tb[k][1] for k in TERMS)
        return float(lo), float(hi)

    # ---------------------------------------------------------------------------------------- target

    def prepare_target(self, gt: ArrayLike, fov: ArrayLike | None = None) -> Target:
        """Precompute the GT side once per image.

        Args:
            gt: bool/0-1 [H, W] vessel ground truth.
            fov: optional bool [H, W] field of view.
        Returns:
            a :class:`Target` holding the GT skeleton, labels, junctions and counts, plus per-tile
            aggregates for every size in ``config.tile_sizes``.
        """
        g = as_mask(gt, "gt")
        if g.ndim != 2:
            raise ValueError(f"gt must be a 2-D mask [H, W], got shape {g.shape}")
        f = None
        if fov is not None:
            f = as_mask(fov, "fov")
            if f.shape != g.shape:
                raise ValueError(f"fov is {f.shape} but gt is {g.shape}; pass the FOV of the same image")
            g = g & f
        skel = skeleton(g)
        labels, n_comp = ndi.label(g, structure=EIGHT)
        # Hole labels only feed the Betti term; skip them when it carries no weight.
        holes, n_bg = hole_labels(g) if self._need_holes else (None, 1)
        jfirst, n_junc = junction_clusters(skel)
        counts = RewardCounts(
            area=np.int64(np.count_nonzero(g)),
            length=np.int64(np.count_nonzero(skel)),
            junctions=np.int64(n_junc),
            components=np.int64(n_comp),
            holes=np.int64(n_bg - 1),  # minus the outer background
        )
        target = Target(
            gt=g,
            fov=f,
            skeleton=skel,
            labels=labels.astype(np.int32, copy=False),
            holes=holes,
            junction_rc=np.stack(np.divmod(jfirst, g.shape[1]), axis=1),
            counts=counts,
        )
        return target  # per-tile aggregates are built on the first score_tiles call and cached

    def _tile_target(self, target: Target, tile: int) -> _TileTarget:
        """GT aggregates for one tile size (cached on the target)."""
        cached = target.tiles.get(tile)
        if cached is not None:
            return cached
        h, w = target.shape
        fov = np.ones((h, w), dtype=bool) if target.fov is None else target.fov
        g = pad_to(target.gt, tile)[None]
        s = pad_to(target.skeleton, tile)[None]
        fp = pad_to(fov, tile)[None]
        ty, tx = g.shape[1] // tile, g.shape[2] // tile
        r, c = target.junction_rc[:, 0], target.junction_rc[:, 1]
        junctions = np.bincount((r // tile) * tx + c // tile, minlength=ty * tx).reshape(1, ty, tx)
        counts = RewardCounts(
            area=tile_sum(g, tile),
            length=tile_sum(s, tile),
            junctions=junctions.astype(np.int64),
            components=distinct_per_tile(pad_to(target.labels, tile)[None], tile),
            holes=None if target.holes is None else distinct_per_tile(pad_to(target.holes, tile)[None], tile),
        )
        tt = _TileTarget(gt=g[0], skeleton=s[0], fov=fp[0], valid=tile_sum(fp, tile)[0] > 0, counts=counts)
        target.tiles[tile] = tt
        return tt

    # ------------------------------------------------------------------------------------ whole image

    def score(self, pred: ArrayLike, target: Target) -> RewardResult:
        """Reward of one predicted mask against a prepared target.

        Args:
            pred: bool/0-1 [H, W] (same shape as the target's GT).
            target: from :meth:`prepare_target`.
        """
        p = as_mask(pred, "pred")
        if p.shape != target.shape:
            raise ValueError(f"pred is {p.shape} but the target was prepared for {target.shape}")
        if target.fov is not None:
            p = p & target.fov
        g, sg = target.gt, target.skeleton
        sp = skeleton(p)  # the only skeletonisation per prediction
        labels, n_comp = ndi.label(p, structure=EIGHT)
        _, n_junc = junction_clusters(sp)
        holes = None
        if self._need_holes:
            _, n_bg = hole_labels(p)
            holes = np.int64(n_bg - 1)  # minus the outer background
        pc = RewardCounts(
            area=np.int64(np.count_nonzero(p)),
            length=np.int64(np.count_nonzero(sp)),
            junctions=np.int64(n_junc),
            components=np.int64(n_comp),
            holes=holes,
            touching=labels_touching(labels, g) if self._need_touching else None,
        )
        total, comps = reward_terms(
            self.config,
            pc,
            target.counts,
            np.int64(np.count_nonzero(p & g)),
            np.int64(np.count_nonzero(sp & g)),
            np.int64(np.count_nonzero(sg & p)),
        )
        _check_finite(total, comps)
        return RewardResult(
            total=float(total), components={k: float(v) for k, v in comps.items()}, source="gt"
        )

    def __call__(self, pred: ArrayLike, gt: ArrayLike, fov: ArrayLike | None = None) -> RewardResult:
        """Convenience: ``score(pred, prepare_target(gt, fov))`` (prepares the GT every call)."""
        return self.score(pred, self.prepare_target(gt, fov))

    # ------------------------------------------------------------------------------------------ tiles

    def score_tiles(self, preds: ArrayLike, target: Target, *, tile: int | None = None) -> TiledRewards:
        """Per-tile rewards of K masks against one GT, computed from whole-image skeletons and labels.

        Each tile is scored with the whole-image formulas (same bounds and empty conventions) on counts
        aggregated per tile: pixel, skeleton and cross counts are tile sums; components (and holes) are the
        distinct whole-image labels present in the tile; a junction cluster counts in the tile of its first
        pixel. For a tile whose prediction and GT components lie entirely inside it this equals scoring the
        tile crop; a component crossing the tile border counts once in every tile it touches (even if it
        leaves and re-enters), and skeletons near the border are the whole-image ones, not the crop's.

        Args:
            preds: bool/0-1 [K, H, W], K samples for the same image.
            target: from :meth:`prepare_target`.
            tile: tile size in pixels; default ``config.tile_sizes[0]``. H, W that are not multiples are
                padded at the bottom/right with False and the padding is outside the FOV.
        Returns:
            :class:`TiledRewards` with total and components [K, ty, tx] (float32, 0 on invalid tiles) and
            valid [ty, tx] (False for tiles without any FOV pixel).
        """
        tile = self.config.tile_sizes[0] if tile is None else tile
        return self.score_tiles_multi(preds, target, tiles=(tile,))[int(tile)]

    def score_tiles_multi(
        self, preds: ArrayLike, target: Target, *, tiles: Sequence[int] | None = None
    ) -> dict[int, TiledRewards]:
        """:meth:`score_tiles` at several tile sizes (default ``config.tile_sizes``) from one skeletonisation
        and one labelling of the masks: {tile: TiledRewards}, each equal to ``score_tiles(..., tile=t)``."""
        tiles = self.config.tile_sizes if tiles is None else tiles
        for tile in tiles:
            if not isinstance(tile, int | np.integer) or isinstance(tile, bool) or tile <= 0:
                raise ValueError(f"tile is {tile!r}; give a positive int number of pixels")
        tiles = tuple(dict.fromkeys(int(t) for t in tiles))
        if not tiles:
            raise ValueError("tiles is empty; give at least one tile size")
        p = as_mask(preds, "preds")
        if p.ndim != 3 or p.shape[1:] != target.shape:
            raise ValueError(
                f"preds is {p.shape}; expected [K, H, W] with H, W = {target.shape} (use pred[None] for one mask)"
            )
        # Padding to a multiple of every tile size adds background only, which changes no skeleton, label
        # or hole; each size then reads its own grid (extra all-padding tiles are dropped).
        pad = math.lcm(*tiles)
        fov = np.ones(target.shape, dtype=bool) if target.fov is None else target.fov
        p = pad_to(p & fov, pad)  # FOV (and padding) first: everything outside is background
        k = p.shape[0]

        # 1. One skeletonisation per sample (2-D thinning has no stack API), then stack-wide labels.
        sp = np.stack([skeleton(p[i]) for i in range(k)])
        labels, _ = ndi.label(p, structure=plane_structure(EIGHT, 1))
        jfirst, _ = junction_clusters(sp)
        holes = hole_labels(p)[0] if self._need_holes else None
        out = {}
        for tile in tiles:
            tt = self._tile_target(target, tile)
            ty, tx = tt.valid.shape
            hp, wp = ty * tile, tx * tile
            if (hp, wp) == p.shape[1:]:
                pt, spt, lt, ht = p, sp, labels, holes
            else:
                pt, spt, lt = p[:, :hp, :wp], sp[:, :hp, :wp], labels[:, :hp, :wp]
                ht = None if holes is None else holes[:, :hp, :wp]
            kk, rem = np.divmod(jfirst, p.shape[1] * p.shape[2])
            r, c = np.divmod(rem, p.shape[2])
            junctions = np.bincount((kk * ty + r // tile) * tx + c // tile, minlength=k * ty * tx)
            pc = RewardCounts(
                area=tile_sum(pt, tile),
                length=tile_sum(spt, tile),
                junctions=junctions.reshape(k, ty, tx).astype(np.int64),
                components=distinct_per_tile(lt, tile),
                holes=None if ht is None else distinct_per_tile(ht, tile),
                touching=distinct_per_tile(np.where(tt.gt, lt, 0), tile) if self._need_touching else None,
            )
            # 2. Cross counts against the (padded) GT, broadcast over K.
            tp = tile_sum(pt & tt.gt, tile)
            sp_in_g = tile_sum(spt & tt.gt, tile)
            sg_in_p = tile_sum(pt & tt.skeleton, tile)
            total, comps = reward_terms(self.config, pc, tt.counts, tp, sp_in_g, sg_in_p)
            _check_finite(total, comps)
            # 3. Tiles without FOV pixels carry no reward at all (not the "perfect" score of empty vs empty).
            valid = tt.valid
            out[tile] = TiledRewards(
                total=np.where(valid, total, 0.0).astype(np.float32),
                components={name: np.where(valid, v, 0.0).astype(np.float32) for name, v in comps.items()},
                valid=valid.copy(),
                tile=tile,
                source="gt",
            )
        return out


def _check_finite(total: np.ndarray, comps: dict[str, np.ndarray]) -> None:
    """NaN/inf guard: every term is bounded by construction, so a non-finite value is a bug to surface."""
    if not np.all(np.isfinite(total)):
        bad = sorted(k for k, v in comps.items() if not np.all(np.isfinite(v)))
        raise FloatingPointError(f"reward is not finite (non-finite components: {bad}); please report this")
