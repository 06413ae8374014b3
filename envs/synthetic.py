"""Seeded synthetic colour-fundus images with exact vessel ground truth.

The generator's recipe:

1. Layout: a left or right eye, optic disc ~0.23 W from the centre, fovea near the centre.
2. Geometry: an artery tree and a vein tree rooted in the disc. Each starts from explicit trunks
   (superior and inferior stems on the disc; temporal arcades curving around the fovea, each with
   two major side branches; nasal trunks). Both trees are then grown together by space
   colonisation (Runions et al.) towards one shared set of random attraction points that thins out
   towards the fovea; competing for the same points makes small arteries and veins interleave
   rather than cross, and tips fork where their attraction points split (dichotomous branching).
3. Widths: Murray's law, r_parent^k = sum r_child^k (k 2.6 for arteries, 2.0 for veins), from
   1-px terminal branches up to ~8-12 px trunks at 512 px (scaled with the image size).
4. Rendering: vessels are rasterised as capsules on a 2x supersampled canvas and area-downsampled,
   so thin vessels have partial-volume contrast. The ground truth is coverage >= 0.5 at the target
   resolution, OR-ed with the rasterised centrelines so that 1-px vessels never break up.
5. Appearance: orange-red background with low-frequency texture, vignetting, a bright disc with a
   soft rim, a darker macula, absorption mostly in the green channel (veins darker than arteries),
   a central light reflex on wide vessels, camera blur, noise, black outside a circular FOV.

Calibrated for 256-768 px (vessel fraction 10-12 % of the FOV, see
``benchmarks/synthetic_speed.py``). Smaller images work but have denser masks, because terminal
vessels never get thinner than 1 px.

Everything is a pure function of ``(seed, size, domain)``: the same triple gives bit-identical images.
``DOMAINS`` holds the calibrated ``source`` look and a ``shifted`` second site for adaptation experiments.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.measure import label
from skimage.morphology import skeletonize

from envs.types import DEFAULT_PROMPT, VesselSample

SPLITS = ("train", "val", "test")

_SPLIT_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}
_SEED_STRIDE = 10_000_000  # base seeds are this far apart, so splits of different seeds never meet
_MAX_INDEX = 1_000_000
_MIN_SIZE = 64

_FOV_RADIUS = 0.475  # FOV diameter 0.95 W, as in DRIVE (~540 px of 565)
_SUPERSAMPLE = 2
_CACHE_SIZE = 256  # items at 256 px (~85 MB); fewer for larger images, see _cache_size
_STEP = 0.009  # growth step and trunk node spacing (2.3 px at 256)
_ATTRACTORS_AT_256 = 640  # x (size / 256)^1.3: larger images resolve more, finer vessels


@dataclass(frozen=True)
class Domain:
    """How a camera, a population and a protocol render fundus images: the knobs a domain shift turns.

    ``source`` is the generator as calibrated (the training domain); ``shifted`` is a second site with a
    smaller field of view, thinner vessels, lower vessel contrast, more blur and noise and a paler,
    yellower background, for adaptation experiments (a model trained on ``source`` loses recall there).
    """

    fov_radius: float = _FOV_RADIUS
    """FOV radius in image widths."""
    width_scale: float = 1.0
    """Multiplies every vessel width (trunk caps too); terminal branches stay 1 px."""
    contrast: tuple[float, float] = (0.85, 1.15)
    """Range of the vessel absorption factor."""
    blur: tuple[float, float] = (0.5, 1.0)
    """Range of the camera blur sigma in pixels."""
    noise: tuple[float, float] = (0.006, 0.014)
    """Range of the sensor noise std (intensities in [0, 1])."""
    base_rgb: tuple[float, float, float] = (0.80, 0.36, 0.14)
    """Background pigment colour."""
    vignetting: float = 0.45
    """Illumination loss at the FOV rim."""


DOMAINS: dict[str, Domain] = {
    "source": Domain(),
    "shifted": Domain(
        fov_radius=0.42,
        width_scale=0.8,
        contrast=(0.6, 0.8),
        blur=(0.8, 1.2),
        noise=(0.012, 0.02),
        base_rgb=(0.86, 0.52, 0.22),
        vignetting=0.6,
    ),
}
"""Named domains of ``generate_fundus`` (``data.domain``)."""


# ----------------------------------------------------------------------------------------------
# Geometry: vessel trees in normalised coordinates (x, y in units of the image width, y down)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Anatomy of one eye, normalised coordinates."""

    disc: np.ndarray  # [2] optic-disc centre
    disc_radius: float
    fovea: np.ndarray  # [2]
    temporal: np.ndarray  # [2] unit vector disc -> fovea
    superior: np.ndarray  # [2] unit vector perpendicular to ``temporal``, pointing up (y < 0)


@dataclass(frozen=True)
class _Tree:
    """A vessel tree as nodes with parent links; parent[i] < i, the root has parent -1.

    Attributes:
        pos: float [N, 2] node positions (normalised).
        parent: int [N] parent index, -1 for the root.
        width: float [N] vessel width in target pixels of the segment from parent to node.
    """

    pos: np.ndarray
    parent: np.ndarray
    width: np.ndarray


def _make_layout(rng: np.random.Generator) -> _Layout:
    side = rng.choice((-1.0, 1.0))  # +1: disc on the right (a right eye)
    disc = np.array([0.5 + side * rng.uniform(0.21, 0.25), 0.5 + rng.uniform(-0.03, 0.03)])
    fovea = np.array([0.5 - side * rng.uniform(0.0, 0.04), disc[1] + rng.uniform(0.0, 0.035)])
    temporal = (fovea - disc) / np.linalg.norm(fovea - disc)
    superior = np.array([temporal[1], -temporal[0]])
    if superior[1] > 0:
        superior = -superior
    return _Layout(disc, float(rng.uniform(0.062, 0.078)), fovea, temporal, superior)


def _rotate(v: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate unit vectors v [n, 2] by ``angle`` [n] radians."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1]], axis=1)


def _unit(v: np.ndarray) -> np.ndarray:
    """Normalise 2-vectors v [..., 2]."""
    return v / (np.hypot(v[..., 0], v[..., 1])[..., None] + 1e-12)


def _bezier_polyline(ctrl: np.ndarray, step: float) -> np.ndarray:
    """Cubic Bezier through control points ``ctrl`` [4, 2], resampled at arc-length ``step``."""
    t = np.linspace(0.0, 1.0, 256)[:, None]
    c0, c1, c2, c3 = ctrl
    pts = (1 - t) ** 3 * c0 + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t**2 * c2 + t**3 * c3
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    s = np.arange(0.0, arc[-1], step)
    return np.stack([np.interp(s, arc, pts[:, 0]), np.interp(s, arc, pts[:, 1])], axis=1)


def _wiggle(line: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Add smooth sideways tortuosity to a polyline [N, 2]; the first point stays fixed."""
    if len(line) < 3:
        return line
    tangent = np.gradient(line, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-12
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    s = np.linspace(0.0, 1.0, len(line))
    offset = np.zeros(len(line))
    for freq in (rng.uniform(1.5, 3.0), rng.uniform(4.0, 8.0)):
        offset += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * freq * s + rng.uniform(0, 2 * np.pi))
    offset = amplitude * (offset - offset[0]) * np.minimum(1.0, 4 * s)
    return line + offset[:, None] * normal


def _side_branch(
    line: np.ndarray, i: int, away_from: np.ndarray, rng: np.random.Generator, step: float
) -> np.ndarray:
    """A major branch [n, 2] leaving polyline ``line`` at node ``i`` at an acute angle (~30-50 deg).

    It turns away from ``away_from`` (the fovea) and bends back towards the parent's direction,
    as retinal branches do. The first point is the branch node itself.
    """
    start = line[i]
    tangent = _unit(line[min(i + 1, len(line) - 1)] - line[i - 1])
    angle = rng.uniform(0.5, 0.85)
    turn = 1.0 if _rotate(tangent[None], np.array([angle]))[0] @ (start - away_from) > 0 else -1.0
    direction = _rotate(tangent[None], np.array([turn * angle]))[0]
    bend = _rotate(direction[None], np.array([-0.5 * turn * angle]))[0]
    length = rng.uniform(0.15, 0.28)
    ctrl = np.stack(
        [
            start,
            start + direction * length / 3,
            start + (direction + bend) * length / 3,
            start + (direction + 2 * bend) * length / 3,
        ]
    )
    return _wiggle(_bezier_polyline(ctrl, step), rng, 0.004)


def _trunks(
    layout: _Layout,
    rng: np.random.Generator,
    *,
    step: float,
    root_shift: float,
    arcade_height: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """The main vessels of one tree, as polylines with parent links.

    The central vessel splits on the disc into a superior and an inferior stem; each stem into a
    temporal arcade (curving ``arcade_height`` above / below the fovea, with two major side
    branches) and a nasal trunk. Nodes are ``step`` apart; polylines stop at the retina's edge.

    Returns:
        pos: float [N, 2] node positions; parent: int [N] (parent[i] < i, root at index 0).
    """
    lay = layout
    t, u = lay.temporal, lay.superior
    dist = float(np.linalg.norm(lay.fovea - lay.disc))
    root = lay.disc + t * root_shift * lay.disc_radius + rng.normal(0, 0.1 * lay.disc_radius, 2)
    pos: list[np.ndarray] = [root[None]]
    parent: list[np.ndarray] = [np.array([-1])]
    n_nodes = 1

    def add(line: np.ndarray, attach: int) -> int:
        """Append polyline ``line`` (its first point is the node ``attach``); index of its 1st new node."""
        nonlocal n_nodes
        line = line[1:]
        outside = np.flatnonzero(np.hypot(line[:, 0] - 0.5, line[:, 1] - 0.5) >= 0.49)
        line = line[: outside[0]] if outside.size else line
        first = n_nodes
        if len(line):
            pos.append(line)
            parent.append(np.concatenate([[attach], np.arange(first, first + len(line) - 1)]))
            n_nodes += len(line)
        return first

    def jit(scale: float = 0.015) -> np.ndarray:
        return rng.normal(0.0, scale, 2)

    for sgn, height in zip((1.0, -1.0), arcade_height, strict=True):
        split = root + sgn * u * lay.disc_radius * rng.uniform(0.45, 0.75) + jit(0.006)
        stem = _bezier_polyline(np.stack([root, root + (split - root) / 3, split, split]), step)
        stem_first = add(stem, 0)
        stem_end = n_nodes - 1 if n_nodes > stem_first else 0

        arcade = _bezier_polyline(
            np.stack(
                [
                    split,
                    split + sgn * u * 0.11 + t * rng.uniform(0.02, 0.06) + jit(0.01),
                    lay.disc + t * dist * rng.uniform(0.4, 0.6) + sgn * u * (height + 0.05) + jit(0.01),
                    lay.disc
                    + t * dist * rng.uniform(1.9, 2.1)
                    + sgn * u * (height + rng.uniform(0.0, 0.06))
                    + jit(),
                ]
            ),
            step,
        )
        arcade = _wiggle(arcade, rng, 0.006)
        arcade_first = add(arcade, stem_end)
        kept = n_nodes - arcade_first  # arcade[1 : 1 + kept] was added
        for frac in (rng.uniform(0.2, 0.35), rng.uniform(0.5, 0.7)):
            i = int(frac * len(arcade))
            if 1 <= i <= kept:
                add(_side_branch(arcade, i, lay.fovea, rng, step), arcade_first + i - 1)

        nasal = np.stack(
            [
                split,
                split + sgn * u * 0.08 - t * 0.02 + jit(0.01),
                lay.disc + sgn * u * rng.uniform(0.18, 0.24) - t * rng.uniform(0.06, 0.12) + jit(),
                lay.disc + sgn * u * rng.uniform(0.3, 0.36) - t * rng.uniform(0.12, 0.22) + jit(),
            ]
        )
        add(_wiggle(_bezier_polyline(nasal, step), rng, 0.006), stem_end)
    return np.concatenate(pos), np.concatenate(parent)


def _attractors(layout: _Layout, rng: np.random.Generator, n: int, fov_radius: float) -> np.ndarray:
    """About ``n`` attraction points [n', 2] over the retina.

    None in the fovea or on the disc, and fewer towards the fovea, whose surroundings are
    supplied by a few fine branches only.
    """
    # Points stop just inside the FOV: twigs drawn along the rim would be cut into fragments.
    r = (fov_radius - 0.01) * np.sqrt(rng.uniform(0.0, 1.0, 3 * n))
    phi = rng.uniform(0.0, 2 * np.pi, 3 * n)
    pts = 0.5 + np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
    to_fovea = np.hypot(pts[:, 0] - layout.fovea[0], pts[:, 1] - layout.fovea[1])
    to_disc = np.hypot(pts[:, 0] - layout.disc[0], pts[:, 1] - layout.disc[1])
    accept = np.clip((to_fovea - 0.05) / 0.1, 0.0, 1.0) ** 1.5
    keep = (rng.uniform(0.0, 1.0, 3 * n) < accept) & (to_disc > 1.2 * layout.disc_radius)
    return pts[keep][:n]


def _group_sum(group: np.ndarray, v: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum of 2-vectors v [n, 2] per group id (int [n] in 0..n_groups-1) -> [n_groups, 2]."""
    return np.stack([np.bincount(group, v[:, 0], n_groups), np.bincount(group, v[:, 1], n_groups)], axis=1)


def _colonise(
    pos: np.ndarray,
    parent: np.ndarray,
    tag: np.ndarray,
    attractors: np.ndarray,
    rng: np.random.Generator,
    *,
    step: float,
    influence: float,
    kill: float,
    inertia: float = 0.5,
    sprout_p: float = 0.1,
    fork_cos: float = 0.0,
    max_iter: int = 400,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow a tree towards attraction points (space colonisation, Runions et al. 2007).

    Each round, every live attractor pulls on its nearest node within ``influence``; each pulled
    node grows one ``step`` towards the mean pull; attractors within ``kill`` of a node die. Two
    changes make retina-like trees instead of combs: a tip whose pulls fall into two groups more
    than acos(``fork_cos``) apart forks into both (dichotomous branching), and a node in the middle
    of a vessel buds a side branch only with probability ``sprout_p`` per round. ``inertia`` keeps
    part of the current heading, so branches leave at acute angles and curve gently.

    Nearest nodes are tracked incrementally against the new nodes only, so a round costs
    O(attractors x new nodes) numpy work.

    Args:
        pos: float [N0, 2] initial nodes; parent: int [N0] (parent[i] < i, -1 for roots).
        tag: int [N0] label that new nodes inherit from their parent (which tree they belong to).
        attractors: float [M, 2].

    Returns:
        pos: float [N, 2]; parent: int [N]; tag: int [N]. The initial nodes come first; parent[i] < i.
    """
    nearest_d, nearest_i = cKDTree(pos).query(attractors)
    alive = nearest_d > kill
    n_children = np.bincount(parent[parent >= 0], minlength=len(pos))
    all_pos, all_parent = pos, parent
    for _ in range(max_iter):
        active = np.flatnonzero(alive & (nearest_d < influence))
        if active.size == 0:
            break
        owner = nearest_i[active]
        # 1. Which nodes grow: tips always, mid-vessel nodes now and then.
        grow, inv = np.unique(owner, return_inverse=True)
        gate = (n_children[grow] == 0) | (rng.random(len(grow)) < sprout_p)
        if not gate.any():  # no tip pulled and no bud drawn: let the most-pulled node bud, no idle round
            gate[np.argmax(np.bincount(inv, minlength=len(grow)))] = True
        if not gate.all():
            keep = gate[inv]
            active, owner = active[keep], owner[keep]
            inv = (np.cumsum(gate) - 1)[inv[keep]]
            grow = grow[gate]
        pull = _unit(attractors[active] - all_pos[owner])

        # 2. Mean pull per node, and the pulls split into the two sides of that mean.
        mean = _group_sum(inv, pull, len(grow))
        # Opposing pulls can cancel and park a node on itself: then follow the first pull.
        first = np.zeros(len(grow), dtype=np.int64)
        first[inv[::-1]] = np.arange(len(inv))[::-1]
        stuck = np.hypot(mean[:, 0], mean[:, 1]) < 0.3
        mean[stuck] = pull[first[stuck]]
        mean = _unit(mean)
        side = (mean[inv, 0] * pull[:, 1] - mean[inv, 1] * pull[:, 0]) > 0
        left = _unit(_group_sum(inv, pull * side[:, None], len(grow)))
        right = _unit(_group_sum(inv, pull * ~side[:, None], len(grow)))
        n_left = np.bincount(inv, side, len(grow))
        fork = (
            (n_children[grow] == 0)
            & (n_left > 0)
            & (n_left < np.bincount(inv, minlength=len(grow)))
            & ((left * right).sum(axis=1) < fork_cos)
        )

        # 3. New nodes: one along the mean pull, or two along the side means at a fork.
        has_parent = all_parent[grow] >= 0
        heading = np.zeros_like(mean)
        heading[has_parent] = _unit(all_pos[grow[has_parent]] - all_pos[all_parent[grow[has_parent]]])
        src = np.concatenate([grow[~fork], grow[fork], grow[fork]])
        direction = np.concatenate([mean[~fork], left[fork], right[fork]])
        direction = _unit(direction + inertia * heading[np.searchsorted(grow, src)])
        direction = _rotate(direction, rng.normal(0.0, 0.08, len(src)))
        new = all_pos[src] + step * direction
        n = len(all_pos)
        all_pos = np.concatenate([all_pos, new])
        all_parent = np.concatenate([all_parent, src])
        tag = np.concatenate([tag, tag[src]])
        n_children = np.concatenate([n_children, np.zeros(len(new), dtype=n_children.dtype)])
        np.add.at(n_children, src, 1)

        # 4. Update each live attractor's nearest node against the new nodes only; kill reached ones.
        live = np.flatnonzero(alive)
        d2 = (attractors[live, 0, None] - new[None, :, 0]) ** 2 + (
            attractors[live, 1, None] - new[None, :, 1]
        ) ** 2
        j = np.argmin(d2, axis=1)
        dj = np.sqrt(d2[np.arange(len(live)), j])
        closer = dj < nearest_d[live]
        nearest_d[live[closer]] = dj[closer]
        nearest_i[live[closer]] = n + j[closer]
        alive[live] = nearest_d[live] > kill
    return all_pos, all_parent, tag


def _spur_free(parent: np.ndarray, min_nodes: int) -> np.ndarray:
    """bool [N]: nodes kept after dropping terminal twigs of fewer than ``min_nodes`` nodes.

    Colonisation leaves many one- or two-node stubs where a node budded once and then lost its
    attractors; they read as noise, not vessels.
    """
    n = len(parent)
    children = np.bincount(parent[parent >= 0], minlength=n)
    cur = np.flatnonzero(children == 0)
    walking = np.ones(len(cur), dtype=bool)  # still climbing an unbranched chain from its leaf
    path = [cur]
    drop = np.zeros(n, dtype=bool)
    for _ in range(min_nodes):
        up = parent[cur]
        at_branch = walking & (up >= 0) & (children[np.maximum(up, 0)] > 1)
        for nodes in path:
            drop[nodes[at_branch]] = True
        walking &= ~at_branch & (up >= 0)
        cur = np.maximum(up, 0)
        path.append(cur)
    return ~drop


def _reindex_parent(parent: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Parent links [N'] after keeping only ``keep`` (bool [N]); kept nodes' parents must be kept."""
    new_index = np.cumsum(keep) - 1
    kept = parent[keep]
    return np.where(kept >= 0, new_index[np.maximum(kept, 0)], -1)


def _smooth(pos: np.ndarray, parent: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Laplacian smoothing of unbranched chain nodes; removes the zig-zag of the growth steps."""
    n = len(pos)
    children = np.bincount(parent[parent >= 0], minlength=n)
    child_of = np.full(n, -1)
    has_parent = np.flatnonzero(parent >= 0)
    child_of[parent[has_parent]] = has_parent  # any child; used only where there is exactly one
    chain = np.flatnonzero((children == 1) & (parent >= 0))
    out = pos.copy()
    for _ in range(iterations):
        out[chain] = 0.5 * out[chain] + 0.25 * (out[parent[chain]] + out[child_of[chain]])
    return out


def _murray_radius(parent: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Relative radius per node [N]: 1 at leaves, r^k = sum of the children's r^k above them.

    Args:
        parent: int [N] with parent[i] < i (-1 for roots); k: float [N] Murray exponent per node.
    """
    n = len(parent)
    depth = np.zeros(n, dtype=np.int64)
    for i in range(n):  # parent[i] < i, so one forward pass; n is a few thousand
        if parent[i] >= 0:
            depth[i] = depth[parent[i]] + 1
    order = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[order], np.arange(depth.max() + 2))
    acc = np.zeros(n)
    radius = np.ones(n)
    for level in range(depth.max(), -1, -1):
        nodes = order[bounds[level] : bounds[level + 1]]
        radius[nodes] = np.where(acc[nodes] > 0, acc[nodes] ** (1.0 / k[nodes]), 1.0)
        has_parent = nodes[parent[nodes] >= 0]
        np.add.at(acc, parent[has_parent], radius[has_parent] ** k[has_parent])
    return radius


@dataclass(frozen=True)
class _TreeSpec:
    """How one vessel tree (arteries or veins) differs from the other."""

    murray_k: float
    """Murray exponent k in r_parent^k = sum r_child^k."""
    width_gain: float
    """Width in px at 512 of a vessel with Murray radius 1 (a terminal branch)."""
    max_width: float
    """Width cap in px at 512 (the trunks on the disc)."""
    root_shift: float
    """Root position on the disc along the temporal axis, in disc radii."""
    arcade_height: tuple[float, float]
    """How far the superior / inferior arcade passes from the fovea (normalised)."""


def _grow_forest(
    layout: _Layout,
    rng: np.random.Generator,
    specs: Sequence[_TreeSpec],
    *,
    size: int,
    n_attractors: int,
    fov_radius: float = _FOV_RADIUS,
) -> list[_Tree]:
    """Trunks of all trees, then space colonisation with one shared attractor set, then widths.

    The trees compete for the same attractors, so small arteries and veins interleave instead of
    crossing everywhere; only trunks and larger branches cross (a few loops, as in real GT).

    Returns one ``_Tree`` per spec, widths in target pixels.
    """
    pos_l, parent_l, label_l = [], [], []
    offset = 0
    for t, spec in enumerate(specs):
        pos, parent = _trunks(
            layout, rng, step=_STEP, root_shift=spec.root_shift, arcade_height=spec.arcade_height
        )
        pos_l.append(pos)
        parent_l.append(np.where(parent >= 0, parent + offset, -1))
        label_l.append(np.full(len(pos), t))
        offset += len(pos)
    pos, parent, label = _colonise(
        np.concatenate(pos_l),
        np.concatenate(parent_l),
        np.concatenate(label_l),
        _attractors(layout, rng, n_attractors, fov_radius),
        rng,
        step=_STEP,
        influence=0.1,
        kill=0.016,
    )
    keep = _spur_free(parent, min_nodes=2)
    pos, parent, label = pos[keep], _reindex_parent(parent, keep), label[keep]
    pos = _smooth(pos, parent)
    k = np.array([spec.murray_k for spec in specs])[label]
    radius = _murray_radius(parent, k)
    trees = []
    for t, spec in enumerate(specs):
        mine = label == t
        # Width in pixels scales with the image, but terminal branches stay 1 px wide at any size.
        width = np.clip(spec.width_gain * radius[mine] * size / 512.0, 1.0, spec.max_width * size / 512.0)
        trees.append(_Tree(pos[mine], _reindex_parent(parent, mine), width))
    return trees


# ----------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------


def _rasterise(
    p0: np.ndarray,
    p1: np.ndarray,
    radius: np.ndarray,
    strength: np.ndarray,
    reflex: np.ndarray,
    *,
    reflex_from: float,
) -> np.ndarray:
    """Draw capsules (segments with round caps) into a depth map, and their light reflex.

    Segments are grouped by bounding-box size and evaluated as [n_seg, K, K] windows, then
    scattered with ``np.maximum.at``: no per-segment Python loop.

    Args:
        p0, p1: float [S, 2] segment ends (x, y) in canvas pixels.
        radius: float [S] capsule radius in canvas pixels.
        strength: float [S] absorption scale of each segment.
        reflex: float32 [H, W] canvas, updated in place with the max of ``exp(-(d / r)^2 / 0.06)``
            over segments with ``radius >= reflex_from`` (the bright axial stripe of wide vessels).

    Returns:
        depth: float32 [H, W], ``strength * (0.05 + 0.95 * sqrt(1 - (d / r)^2))`` inside a capsule
        (the chord through a cylinder, i.e. the Beer-law path length), 0 outside.
    """
    h, w = reflex.shape
    depth = np.zeros(h * w, dtype=np.float32)
    reflex_flat = reflex.reshape(-1)
    lo = np.floor(np.minimum(p0, p1) - radius[:, None] - 1).astype(np.int64)
    hi = np.ceil(np.maximum(p0, p1) + radius[:, None] + 1).astype(np.int64)
    bucket = np.ceil(((hi - lo).max(axis=1) + 1) / 4).astype(np.int64) * 4
    for k in np.unique(bucket):
        sel = np.flatnonzero(bucket == k)
        grid = np.arange(k)
        gx = lo[sel, 0, None, None] + grid[None, None, :]  # [n, 1, K] pixel columns
        gy = lo[sel, 1, None, None] + grid[None, :, None]  # [n, K, 1] pixel rows
        a = p0[sel].astype(np.float32)
        ab = (p1[sel] - p0[sel]).astype(np.float32)
        abx, aby = ab[:, 0, None, None], ab[:, 1, None, None]
        rx = (gx + 0.5).astype(np.float32) - a[:, 0, None, None]  # pixel centre relative to p0
        ry = (gy + 0.5).astype(np.float32) - a[:, 1, None, None]
        inv_len2 = (1.0 / np.maximum(abx * abx + aby * aby, 1e-9)).astype(np.float32)
        t = np.clip((rx * abx + ry * aby) * inv_len2, 0.0, 1.0)
        dx, dy = rx - t * abx, ry - t * aby
        inv_r2 = (1.0 / radius[sel] ** 2).astype(np.float32)[:, None, None]
        q2 = (dx * dx + dy * dy) * inv_r2
        inside = (q2 <= 1.0) & (gx >= 0) & (gx < w) & (gy >= 0) & (gy < h)
        seg, row, col = np.nonzero(inside)
        q2 = q2[inside]
        flat = (lo[sel[seg], 1] + row) * w + lo[sel[seg], 0] + col
        value = (0.05 + 0.95 * np.sqrt(1.0 - q2)) * strength[sel[seg]].astype(np.float32)
        np.maximum.at(depth, flat, value)
        wide = radius[sel[seg]] >= reflex_from
        if wide.any():
            np.maximum.at(reflex_flat, flat[wide], np.exp(q2[wide] * np.float32(-1.0 / 0.06)))
    return depth.reshape(h, w)


def _centrelines(p0: np.ndarray, p1: np.ndarray, size: int) -> np.ndarray:
    """bool [size, size]: pixels hit by densely sampled segment centrelines (p in target pixels)."""
    seg_len = np.linalg.norm(p1 - p0, axis=1)
    n_samples = int(np.ceil(seg_len.max(initial=0.0) * 2)) + 2
    t = np.linspace(0.0, 1.0, n_samples)[None, :, None]
    pts = np.floor(p0[:, None, :] + t * (p1 - p0)[:, None, :]).astype(np.int64).reshape(-1, 2)
    ok = (pts >= 0).all(axis=1) & (pts < size).all(axis=1)
    out = np.zeros((size, size), dtype=bool)
    out[pts[ok, 1], pts[ok, 0]] = True
    return out


def _downsample(a: np.ndarray, factor: int) -> np.ndarray:
    """Area (box) downsample float [H*f, W*f] -> float32 [H, W]."""
    # Summing strided views is several times faster than reshape(...).mean(axis=(1, 3)).
    out = np.zeros((a.shape[0] // factor, a.shape[1] // factor), dtype=np.float32)
    for dy in range(factor):
        for dx in range(factor):
            out += a[dy::factor, dx::factor]
    return out * np.float32(1.0 / factor**2)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """float32 [size, size] zero-mean, unit-std noise with blobs ~size/cells pixels across.

    A (cells+2)^2 white-noise grid is interpolated with Gaussian weights as two small matrix
    products, far cheaper than ``ndimage.zoom`` at full resolution.
    """
    coarse = rng.standard_normal((cells + 2, cells + 2))
    centres = (np.arange(cells + 2) - 0.5) * (size / cells)
    x = np.arange(size) + 0.5
    weights = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / (0.6 * size / cells)) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    field = weights @ coarse @ weights.T
    return ((field - field.mean()) / (field.std() + 1e-9)).astype(np.float32)


@dataclass(frozen=True)
class _VesselMaps:
    """Rasterised vessels at the target resolution.

    Attributes:
        artery, vein: float32 [H, W] mean absorption depth (partial volume at vessel edges).
        reflex: float32 [H, W] central light reflex of wide vessels, in [0, 1].
        mask: bool [H, W] ground truth: coverage >= 0.5 or on a centreline (not yet cut to the FOV).
    """

    artery: np.ndarray
    vein: np.ndarray
    reflex: np.ndarray
    mask: np.ndarray


def _rasterise_trees(trees: Sequence[_Tree], size: int, ss: int = _SUPERSAMPLE) -> _VesselMaps:
    """Draw ``trees`` = [artery, vein] at ``ss``x supersampling and area-downsample them."""
    canvas = (size * ss, size * ss)
    reflex = np.zeros(canvas, dtype=np.float32)
    covered = np.zeros(canvas, dtype=bool)
    centre = np.zeros((size, size), dtype=bool)
    depth = []
    for tree in trees:
        child = np.flatnonzero(tree.parent >= 0)
        a = tree.pos[tree.parent[child]] * size
        b = tree.pos[child] * size
        width = tree.width[child]
        # Path length grows with calibre, but saturates: thin vessels still show some contrast.
        strength = np.minimum(1.0, 0.45 + 0.11 * width)
        d = _rasterise(a * ss, b * ss, width * ss / 2, strength, reflex, reflex_from=1.4 * ss)
        covered |= d > 0
        depth.append(_downsample(d, ss))
        centre |= _centrelines(a, b, size)
    mask = (_downsample(covered, ss) >= 0.5) | centre
    return _VesselMaps(depth[0], depth[1], _downsample(reflex, ss), mask)


def _paint(
    layout: _Layout, maps: _VesselMaps, fov: np.ndarray, rng: np.random.Generator, domain: Domain
) -> np.ndarray:
    """Compose the colour photograph: uint8 [H, W, 3], black outside ``fov`` (bool [H, W])."""
    size = fov.shape[0]
    f32 = np.float32
    coords = (np.arange(size, dtype=f32) + f32(0.5)) / f32(size)
    xx, yy = coords[None, :], coords[:, None]

    # 1. Fundus background: pigment colour, choroidal texture, uneven illumination.
    base = np.array(domain.base_rgb, dtype=f32) * rng.uniform(0.85, 1.1, 3).astype(f32)
    texture = f32(0.07) * _smooth_noise(rng, size, 6) + f32(0.03) * _smooth_noise(rng, size, 24)
    cx, cy = (0.5 + rng.normal(0.0, 0.05, 2)).astype(f32)
    rho2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / f32(domain.fov_radius**2)
    illum = (f32(1.0) - f32(domain.vignetting) * rho2**1.25) * (f32(1.0) + texture)
    img = illum[..., None] * base

    # 2. Darker macula (pigment absorbs green and blue more than red).
    macula = np.exp(-((xx - layout.fovea[0]) ** 2 + (yy - layout.fovea[1]) ** 2).astype(f32) / f32(0.085**2))
    tint = np.array([0.18, 0.4, 0.35], dtype=f32) * f32(rng.uniform(0.7, 1.1))
    img *= f32(1.0) - macula[..., None] * tint

    # 3. Optic disc: pale, soft rim, brighter cup off-centre towards the fovea.
    disc_r = np.sqrt((xx - layout.disc[0]) ** 2 + (yy - layout.disc[1]) ** 2).astype(f32) / f32(
        layout.disc_radius
    )
    disc = f32(1.0) / (f32(1.0) + np.exp(np.minimum((disc_r - f32(1.0)) / f32(0.09), f32(30.0))))
    cup_c = layout.disc + layout.temporal * 0.25 * layout.disc_radius
    cup_r2 = ((xx - cup_c[0]) ** 2 + (yy - cup_c[1]) ** 2).astype(f32) / f32((0.45 * layout.disc_radius) ** 2)
    cup = np.exp(-cup_r2)
    disc_rgb = np.array([0.96, 0.74, 0.42], dtype=f32) * f32(rng.uniform(0.9, 1.05))
    alpha = (f32(0.8) * disc)[..., None]
    img = (
        img * (f32(1.0) - alpha) + alpha * disc_rgb + cup[..., None] * np.array([0.03, 0.12, 0.16], dtype=f32)
    )

    # 4. Vessels absorb (mostly green; veins more than arteries); wide ones reflect centrally.
    contrast = f32(rng.uniform(*domain.contrast))
    density = contrast * (
        maps.artery[..., None] * np.array([0.12, 0.55, 0.35], dtype=f32)
        + maps.vein[..., None] * np.array([0.22, 0.85, 0.55], dtype=f32)
    )
    img = img * np.exp(-density) * (f32(1.0) + f32(0.12) * maps.reflex[..., None])

    # 5. Camera: blur, sensor noise, black outside the field of view.
    sigma = rng.uniform(*domain.blur)
    img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), truncate=3.0)
    img += f32(rng.uniform(*domain.noise)) * rng.standard_normal(img.shape, dtype=f32)
    img = np.clip(img * f32(255.0), 0.0, 255.0) * fov[..., None]
    return np.rint(img).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {name!r}; expected one of {', '.join(DOMAINS)}")
    return DOMAINS[name]


def generate_fundus(
    seed: int,
    size: int = 256,
    *,
    prompt: str | None = None,
    sample_id: str | None = None,
    domain: str = "source",
) -> VesselSample:
    """One synthetic colour fundus image with its exact vessel mask.

    Args:
        seed: non-negative integer; the same ``(seed, size)`` gives bit-identical output.
        size: width = height in pixels, >= 64.
        prompt: text prompt stored in the sample (default: the project's vessel prompt).
        sample_id: id of the sample (default ``"synthetic-<seed>"``, ``"synthetic-<domain>-<seed>"`` for
            other domains).
        domain: a key of ``DOMAINS``; other domains draw from their own seed stream, so the same seed gives
            a different eye, not the same eye through another camera.

    Returns:
        VesselSample with image uint8 [size, size, 3], mask bool [size, size] (inside the FOV only),
        fov bool [size, size] (a centred disc of diameter 0.95 * size).
    """
    _check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    look_of = _domain(domain)
    entropy = int(seed) if domain == "source" else [int(seed), list(DOMAINS).index(domain)]
    geo_seq, look_seq = np.random.SeedSequence(entropy).spawn(2)
    rng = np.random.default_rng(geo_seq)
    look = np.random.default_rng(look_seq)

    # 1. Anatomy and vessel geometry. Artery and vein arcades run side by side a little apart,
    # so they cross now and then; Murray exponents and width caps follow vessels.md §4.2.
    layout = _make_layout(rng)
    vein_height = rng.uniform(0.2, 0.27, 2)
    artery_height = vein_height + rng.choice((-1.0, 1.0), 2) * rng.uniform(0.03, 0.06, 2)
    specs = [
        _TreeSpec(
            murray_k=2.6,
            width_gain=1.5 * look_of.width_scale,
            max_width=rng.uniform(7.5, 9.0) * look_of.width_scale,
            root_shift=-0.15,
            arcade_height=(float(artery_height[0]), float(artery_height[1])),
        ),
        _TreeSpec(
            murray_k=2.0,
            width_gain=1.3 * look_of.width_scale,
            max_width=rng.uniform(10.0, 12.0) * look_of.width_scale,
            root_shift=0.15,
            arcade_height=(float(vein_height[0]), float(vein_height[1])),
        ),
    ]
    n_attractors = round(_ATTRACTORS_AT_256 * (size / 256) ** 1.3)
    artery, vein = _grow_forest(
        layout, rng, specs, size=size, n_attractors=n_attractors, fov_radius=look_of.fov_radius
    )

    # 2. Rasterise at supersampled resolution, then paint the photograph.
    coords = (np.arange(size) + 0.5) / size
    fov = (coords[None, :] - 0.5) ** 2 + (coords[:, None] - 0.5) ** 2 <= look_of.fov_radius**2
    maps = _rasterise_trees([artery, vein], size)
    image = _paint(layout, maps, fov, look, look_of)
    mask = maps.mask & fov

    return VesselSample(
        image=image,
        mask=mask,
        fov=fov,
        id=sample_id
        if sample_id is not None
        else f"synthetic-{int(seed)}"
        if domain == "source"
        else f"synthetic-{domain}-{int(seed)}",
        prompts=(prompt,) if prompt is not None else (DEFAULT_PROMPT,),
    )


def vessel_stats(sample: VesselSample) -> dict[str, float]:
    """Summary statistics of a sample's vessel mask, all measured inside the FOV.

    Returns:
        vessel_fraction_fov: vessel pixels / FOV pixels.
        thin_skeleton_share: share of skeleton pixels whose local width (2 * distance transform
            at the skeleton) is <= 2.5 px, i.e. 1-2 px vessels.
        n_components: 8-connected components of the mask (Betti-0), an int.
        skeleton_length: number of skeleton pixels, an int.
    """
    mask = sample.mask & sample.fov
    skeleton = skeletonize(mask)
    width = 2.0 * ndimage.distance_transform_edt(mask)[skeleton]
    return {
        "vessel_fraction_fov": float(mask.sum() / max(int(sample.fov.sum()), 1)),
        "thin_skeleton_share": float((width <= 2.5).mean()) if width.size else 0.0,
        "n_components": int(label(mask, connectivity=2).max()),
        "skeleton_length": int(skeleton.sum()),
    }


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ValueError(f"size must be an integer >= {_MIN_SIZE} pixels, got {size!r}; use e.g. 256 or 512")


class SyntheticFundus(Sequence[VesselSample]):
    """A lazily generated, deterministic dataset of synthetic fundus images.

    Item ``i`` of split ``s`` is ``generate_fundus(seed * 10_000_000 + offset[s] + i)`` with
    offsets 0 / 1_000_000 / 2_000_000 for train / val / test, so splits never share an image seed.
    Recently used items are kept in an LRU cache (256 items at 256 px, fewer for larger images);
    their arrays are read-only because they are shared: copy before editing in place.

    Args:
        split: one of ``SPLITS``.
        n: number of images, 1..1_000_000.
        size: image width = height in pixels, >= 64.
        seed: non-negative base seed.
        domain: a key of ``DOMAINS`` (``source``: the calibrated generator).
    """

    def __init__(
        self, split: str = "train", n: int = 100, size: int = 256, seed: int = 0, domain: str = "source"
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= _MAX_INDEX:
            raise ValueError(f"n must be an integer in 1..{_MAX_INDEX} (number of images), got {n!r}")
        _check_size(size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        _domain(domain)
        self.split, self.n, self.size, self.seed, self.domain = split, int(n), int(size), int(seed), domain
        self._cached = functools.lru_cache(maxsize=self._cache_size())(self._generate)

    def _cache_size(self) -> int:
        return max(8, _CACHE_SIZE * 256**2 // self.size**2)

    def image_seed(self, index: int) -> int:
        """The ``generate_fundus`` seed of item ``index`` (0 <= index < n)."""
        return self.seed * _SEED_STRIDE + _SPLIT_OFFSET[self.split] + index

    def sample_id(self, index: int) -> str:
        prefix = "synthetic" if self.domain == "source" else f"synthetic-{self.domain}"
        prefix += f"-{self.split}" if self.seed == 0 else f"-s{self.seed}-{self.split}"
        return f"{prefix}-{index:04d}"

    def _generate(self, index: int) -> VesselSample:
        sample = generate_fundus(
            self.image_seed(index), self.size, sample_id=self.sample_id(index), domain=self.domain
        )
        for arr in (sample.image, sample.mask, sample.fov):
            arr.flags.writeable = False
        return sample

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> VesselSample: ...

    @overload
    def __getitem__(self, index: slice) -> list[VesselSample]: ...

    def __getitem__(self, index: int | slice) -> VesselSample | list[VesselSample]:
        if isinstance(index, slice):
            return [self._cached(i) for i in range(*index.indices(self.n))]
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int or a slice, got {type(index).__name__}")
        i = int(index) + self.n if index < 0 else int(index)
        if not 0 <= i < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        return self._cached(i)

    def __iter__(self) -> Iterator[VesselSample]:
        for i in range(self.n):
            yield self._cached(i)

    def __repr__(self) -> str:
        domain = "" if self.domain == "source" else f", domain={self.domain!r}"
        return (
            f"SyntheticFundus(split={self.split!r}, n={self.n}, size={self.size}, seed={self.seed}{domain})"
        )

    # The LRU cache wraps a bound method, which does not pickle (Ray ships datasets to workers).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_cached", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cached = functools.lru_cache(maxsize=self._cache_size())(self._generate)
