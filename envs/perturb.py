"""Controlled corruptions of ground-truth vessel masks, with the Dice they leave: the training masks of the learned
reward net (policies/reward_data.py). Pure numpy and scipy."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from envs.metrics import EIGHT, junction_pixels, skeleton

__all__ = ["PerturbMode", "perturb_mask", "perturb_with_kind"]

# ----------------------------------------------------------------------------------------- perturbations

PerturbMode = Literal["compound", "noise", "empty", "full"]

_MODE_PROBS: dict[str, float] = {"compound": 0.88, "noise": 0.06, "empty": 0.03, "full": 0.03}
"""How often each mode is drawn when no severity is given (compound masks aim at a drawn Dice)."""

_BASE_PROBS: dict[str, float] = {"none": 0.4, "erode": 0.15, "dilate": 0.25, "shift": 0.2}
"""First step of a compound perturbation: a whole-mask structural error (kept only if Dice stays >= target)."""

_REMOVE_PROBS: dict[str, float] = {"branches": 0.4, "cuts": 0.25, "gaps": 0.2, "pepper": 0.15}
"""How the missed pixels of a compound perturbation are chosen."""

_ADD_STYLES = ("blobs", "lines", "thicken", "salt")
"""How the false positives of a compound perturbation are drawn (a random mix per mask)."""


def perturb_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    fov: np.ndarray | None = None,
    severity: float | None = None,
    mode: PerturbMode | None = None,
) -> np.ndarray:
    """A corrupted copy of a GT vessel mask, for training the reward net.

    With ``severity=None`` a mode is drawn (compound 88 %, thresholded noise 6 %, empty 3 %, full FOV 3 %)
    and compound masks aim at a Dice drawn from [0, 1] so that a set of perturbed masks covers every Dice
    decile about evenly. A compound perturbation is:

    1. optionally one structural error: erosion or dilation by 1-2 px, or a shift by a few pixels (kept
       only when the Dice it leaves is still >= the target);
    2. missed vessel pixels: dropped skeleton segments (thin ones first, so distal branches vanish), cuts
       whose detached distal part is dropped, gaps (discs along vessels) or pepper noise;
    3. false positives: ellipse blobs, spurious vessel-like lines, thickened boundaries, salt noise.

    The amounts in 2 and 3 are solved from Dice = 2 TP / (2 TP + FP + FN) so that the result lands near
    the target Dice (within ~0.05 on synthetic fundus masks: pieces are removed whole).

    Args:
        mask: bool [H, W] ground truth.
        rng: the only source of randomness (same generator state -> same output).
        fov: optional bool [H, W]; the GT is restricted to it and nothing is drawn outside it.
        severity: in [0, 1]; forces a compound perturbation aiming at Dice = 1 - severity.
        mode: force a mode ("compound" draws its target Dice unless ``severity`` is given).
    Returns:
        bool [H, W], inside the FOV.
    """
    return perturb_with_kind(mask, rng, fov=fov, severity=severity, mode=mode)[0]


def perturb_with_kind(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    fov: np.ndarray | None,
    severity: float | None,
    mode: PerturbMode | None,
) -> tuple[np.ndarray, str]:
    """:func:`perturb_mask` and a short description of what was done ("empty", "branches+blobs", ...)."""
    g = np.asarray(mask).astype(bool)
    if g.ndim != 2:
        raise ValueError(f"mask must be a 2-D bool array [H, W], got shape {g.shape}")
    f = np.ones_like(g) if fov is None else np.asarray(fov).astype(bool)
    if f.shape != g.shape:
        raise ValueError(f"fov is {f.shape} but mask is {g.shape}; pass the FOV of the same image")
    if severity is not None and not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity is {severity!r}; choose a value in [0, 1] (0 = no change)")
    if mode is not None and mode not in _MODE_PROBS:
        raise ValueError(f"mode is {mode!r}; choose one of {sorted(_MODE_PROBS)}")
    g = g & f
    if mode is None:
        mode = "compound" if severity is not None else _choice(rng, _MODE_PROBS)
    if mode == "empty":
        return np.zeros_like(g), "empty"
    if mode == "full":
        return f.copy(), "full"
    if mode == "noise":
        return _thresholded_noise(g, f, rng), "noise"
    target = 1.0 - severity if severity is not None else _draw_target(rng)
    return _compound(g, f, rng, target)


def _draw_target(rng: np.random.Generator) -> float:
    """Target Dice of a compound mask: uniform, thinned below 0.3 where the noise/empty/full modes
    (12 % of masks, Dice ~0-0.3) already put their mass, so the whole set is about uniform."""
    t = float(rng.uniform())
    if t < 0.3 and rng.uniform() > 0.55:
        t = float(rng.uniform(0.3, 1.0))
    return t


def _choice(rng: np.random.Generator, probs: dict[str, float]) -> str:
    keys = list(probs)
    p = np.array([probs[k] for k in keys])
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _scale(shape: tuple[int, ...]) -> float:
    """Pixel sizes of the perturbations are tuned at 128 px and scale with the image."""
    return max(min(shape) / 128.0, 0.5)


def _thresholded_noise(g: np.ndarray, f: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smoothed white noise thresholded to a vessel-like pixel fraction: a mask unrelated to the image."""
    sigma = rng.uniform(0.7, 2.0) * _scale(g.shape)
    field = ndi.gaussian_filter(rng.standard_normal(g.shape), sigma)
    fraction = max(g.sum() / max(f.sum(), 1), 0.02) * rng.uniform(0.5, 2.0)
    inside = field[f]
    if inside.size == 0:
        return np.zeros_like(g)
    return (field >= np.quantile(inside, 1.0 - min(fraction, 0.9))) & f


def _dice_counts(p: np.ndarray, g: np.ndarray) -> tuple[int, int, int]:
    tp = int(np.count_nonzero(p & g))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp


def _dice_of(tp: int, fp: int, fn: int) -> float:
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else 2 * tp / den


def _compound(
    g: np.ndarray, f: np.ndarray, rng: np.random.Generator, target: float
) -> tuple[np.ndarray, str]:
    """Structural error, then missed pixels and false positives sized to land near Dice = ``target``."""
    s = _scale(g.shape)
    cur = g.copy()
    steps: list[str] = []

    # 1. One structural error, unless it already undershoots the target.
    base = _choice(rng, _BASE_PROBS)
    if base != "none" and g.any():
        if base == "erode":
            cand = ndi.binary_erosion(g, structure=_disc(1), iterations=int(rng.integers(1, 3)))
        elif base == "dilate":
            cand = ndi.binary_dilation(g, structure=_disc(1), iterations=int(rng.integers(1, 3))) & f
        else:
            cand = _shift(g, rng, max(1, round(3 * s))) & f
        if _dice_of(*_dice_counts(cand, g)) >= target:
            cur, steps = cand, [base]

    # 2. Budgets: remove r TP pixels and add q FP pixels so that 2(tp-r) / (2tp - r + fp + fn + q) = target.
    tp, fp, fn = _dice_counts(cur, g)
    t = max(target, 1e-3)
    if _dice_of(tp, fp, fn) > target and tp > 0:
        r_max = (2 * tp - t * (2 * tp + fp + fn)) / (2 - t)
        r = rng.uniform() * r_max
        q = 2 * (tp - r) / t - (2 * tp - r + fp + fn)
        # More false positives than a few vessel trees looks like no policy output; miss more instead.
        q_cap = min(3.0 * max(tp + fn, 1), 0.5 * np.count_nonzero(f & ~cur))
        if q > q_cap:
            q = q_cap
            r = max(0.0, (2 * tp - t * (2 * tp + fp + fn + q)) / (2 - t))
        if r >= 1:
            style = _choice(rng, _REMOVE_PROBS)
            cur = _remove(cur, g, round(r), rng, style)
            steps.append(style)
        if q >= 1:
            # Only outside the GT: an "addition" that re-covered a removed vessel would not be a false positive.
            cur, used = _add(cur, f & ~g, round(q), rng)
            steps.extend(used)
    return cur & f, "+".join(steps) or "identity"


def _disc(radius: float) -> np.ndarray:
    """Bool disc structuring element of the given radius (radius 1: the 4-neighbour cross)."""
    r = math.ceil(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= radius**2


def _shift(m: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """``m`` moved by a random non-zero (dy, dx), |dy|, |dx| <= max_shift, filled with False."""
    dy = dx = 0
    while dy == 0 and dx == 0:
        dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    out = np.zeros_like(m)
    h, w = m.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = m[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


# ------------------------------------------------------------------------------ missed vessel pixels


def _remove(cur: np.ndarray, g: np.ndarray, budget: int, rng: np.random.Generator, style: str) -> np.ndarray:
    """Remove about ``budget`` true-positive pixels of ``cur`` in pieces of the given style."""
    cur = cur.copy()
    tp = cur & g
    if style == "branches":
        cur &= ~_drop_segments(tp, budget, rng)
    elif style in ("cuts", "gaps"):
        cur &= ~_cut(tp, budget, rng, drop_distal=style == "cuts")
    left = budget - (int(np.count_nonzero(tp)) - int(np.count_nonzero(cur & g)))
    if left > 0:  # pepper, and the remainder when pieces ran out
        idx = np.flatnonzero(cur & g)
        if idx.size:
            cur.ravel()[rng.choice(idx, size=min(left, idx.size), replace=False)] = False
    return cur


def _drop_segments(m: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Pixels of whole vessel segments (skeleton cut at junctions), thin segments first; bool [H, W]."""
    sk = skeleton(m)
    cut = sk & ~ndi.binary_dilation(junction_pixels(sk), structure=EIGHT)
    labels, n = ndi.label(cut, structure=EIGHT)
    if n == 0:
        return np.zeros_like(m)
    # Every vessel pixel belongs to the segment of its nearest skeleton pixel.
    _, (iy, ix) = ndi.distance_transform_edt(~cut, return_indices=True)
    owner = np.where(m, labels[iy, ix], 0)
    sizes = np.bincount(owner.ravel(), minlength=n + 1)[1:]
    width = np.asarray(ndi.mean(2.0 * ndi.distance_transform_edt(m), labels, np.arange(1, n + 1)))
    # Weighted order without replacement (Efraimidis-Spirakis keys u^(1/w)); thin = distal = likely missed.
    keys = rng.uniform(size=n) ** (1.0 / np.maximum(1.0 / np.maximum(width, 1.0) ** 2, 1e-6))
    order = np.argsort(-keys)
    take = order[: int(np.searchsorted(np.cumsum(sizes[order]), budget)) + 1]
    return np.isin(owner, take + 1)


def _cut(m: np.ndarray, budget: int, rng: np.random.Generator, *, drop_distal: bool) -> np.ndarray:
    """Pixels removed by discs across vessels (and, with ``drop_distal``, the smaller parts they detach)."""
    s = _scale(m.shape)
    dist = ndi.distance_transform_edt(m)
    sk = skeleton(m)
    keep = m.copy()
    removed = 0
    for _ in range(64):
        if removed >= budget:
            break
        cand = np.flatnonzero(sk & keep)
        if cand.size == 0:
            break
        y, x = divmod(int(rng.choice(cand)), m.shape[1])
        radius = dist[y, x] + (rng.uniform(0.5, 1.5) if drop_distal else rng.uniform(0.5, 3.0) * s)
        r = math.ceil(radius)
        y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, m.shape[0]), max(x - r, 0), min(x + r + 1, m.shape[1])
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
        before = int(np.count_nonzero(keep))
        keep[y0:y1, x0:x1] &= ~disc
        if drop_distal:
            # The parts that touched the disc, except the largest (the proximal side), vanish.
            labels, _ = ndi.label(keep, structure=EIGHT)
            ring = np.zeros_like(m)
            ring[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
            touching = np.unique(labels[ring & keep])
            touching = touching[touching > 0]
            if touching.size > 1:
                sizes = np.bincount(labels.ravel())[touching]
                small = touching[np.argsort(sizes)[:-1]]
                small_px = np.isin(labels, small)
                # A cut near the root would drop most of a tree: only drop what the budget allows.
                if np.count_nonzero(small_px) <= 1.5 * (budget - removed) + 10:
                    keep &= ~small_px
        removed += before - int(np.count_nonzero(keep))
    return m & ~keep


# ------------------------------------------------------------------------------------ false positives


def _add(
    cur: np.ndarray, f: np.ndarray, budget: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[str]]:
    """Add about ``budget`` pixels inside ``f`` (the allowed region: FOV minus GT) as a random mix of styles.

    Every adder below takes (cur, f, want, rng), paints into ``cur`` in place, only inside ``f``, and
    returns how many pixels it added."""
    cur = cur.copy()
    k = int(rng.integers(1, len(_ADD_STYLES) + 1))
    styles = [_ADD_STYLES[i] for i in sorted(rng.choice(len(_ADD_STYLES), size=k, replace=False))]
    shares = rng.dirichlet(np.ones(k)) * budget
    carry = 0.0
    for style, share in zip(styles, shares, strict=True):
        want = round(share + carry)
        got = _ADDERS[style](cur, f, want, rng) if want > 0 else 0
        carry = max(want - got, 0)
    if carry > 0:  # e.g. nothing left to thicken: top up with salt noise
        _add_salt(cur, f, int(carry), rng)
    return cur, styles


def _paint(cur: np.ndarray, f: np.ndarray, shape: np.ndarray, y0: int, x0: int) -> int:
    """OR ``shape`` (bool [h, w], top-left at y0, x0, clipped to the image and FOV) into ``cur``; new pixels."""
    h, w = cur.shape
    sy0, sx0 = max(-y0, 0), max(-x0, 0)
    y1, x1 = min(y0 + shape.shape[0], h), min(x0 + shape.shape[1], w)
    y0c, x0c = max(y0, 0), max(x0, 0)
    if y1 <= y0c or x1 <= x0c:
        return 0
    piece = shape[sy0 : sy0 + y1 - y0c, sx0 : sx0 + x1 - x0c] & f[y0c:y1, x0c:x1]
    window = cur[y0c:y1, x0c:x1]
    new = int(np.count_nonzero(piece & ~window))
    window |= piece
    return new


def _anchors(cur: np.ndarray, f: np.ndarray, rng: np.random.Generator) -> Callable[[], tuple[int, int]]:
    """Sampler of anchor pixels: half of the time on the mask's boundary (false positives hug vessels),
    else anywhere in the FOV. Candidates are computed once per call of an adder, not per shape."""
    edge = np.flatnonzero(cur & ~ndi.binary_erosion(cur))
    anywhere = np.flatnonzero(f)
    w = cur.shape[1]

    def draw() -> tuple[int, int]:
        idx = edge if edge.size and rng.uniform() < 0.5 else anywhere
        y, x = divmod(int(idx[rng.integers(idx.size)]), w)
        return y, x

    return draw


def _add_blobs(cur: np.ndarray, f: np.ndarray, want: int, rng: np.random.Generator) -> int:
    s = _scale(cur.shape)
    anchor = _anchors(cur, f, rng)
    got = 0
    for _ in range(4 * want + 16):
        if got >= want:
            break
        a, b = rng.uniform(1.0, 6.0, size=2) * s
        th = rng.uniform(0.0, np.pi)
        r = math.ceil(max(a, b))
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        u = xx * np.cos(th) + yy * np.sin(th)
        v = -xx * np.sin(th) + yy * np.cos(th)
        y, x = anchor()
        got += _paint(cur, f, (u / a) ** 2 + (v / b) ** 2 <= 1.0, y - r, x - r)
    return got


def _add_lines(cur: np.ndarray, f: np.ndarray, want: int, rng: np.random.Generator) -> int:
    """Spurious vessel-like curves: a smooth random walk, 1-2 px wide, often starting on a vessel."""
    s = _scale(cur.shape)
    h, w = cur.shape
    anchor = _anchors(cur, f, rng)
    got = 0
    for _ in range(want + 16):
        if got >= want:
            break
        y, x = (float(v) for v in anchor())
        theta = rng.uniform(0, 2 * np.pi)
        n = int(rng.uniform(8, 40) * s * 2)  # half-pixel steps
        turns = np.cumsum(rng.normal(0.0, 0.08, size=n))
        ys = np.clip(np.round(y + np.cumsum(0.5 * np.sin(theta + turns))), 0, h - 1).astype(int)
        xs = np.clip(np.round(x + np.cumsum(0.5 * np.cos(theta + turns))), 0, w - 1).astype(int)
        line = np.zeros((h, w), dtype=bool)
        line[ys, xs] = True
        if rng.uniform() < 0.4:
            line = ndi.binary_dilation(line, structure=_disc(1))
        line &= f
        new = line & ~cur
        cur |= line
        got += int(np.count_nonzero(new))
    return got


def _add_thicken(cur: np.ndarray, f: np.ndarray, want: int, rng: np.random.Generator) -> int:
    """Fatter vessels in patches: the 1-px outer ring where a smooth noise field is highest."""
    ring = ndi.binary_dilation(cur, structure=EIGHT) & ~cur & f
    idx = np.flatnonzero(ring)
    if idx.size == 0:
        return 0
    field = ndi.gaussian_filter(rng.standard_normal(cur.shape), 4.0 * _scale(cur.shape)).ravel()[idx]
    take = idx[np.argsort(-field)[: min(want, idx.size)]]
    cur.ravel()[take] = True
    return int(take.size)


def _add_salt(cur: np.ndarray, f: np.ndarray, want: int, rng: np.random.Generator) -> int:
    idx = np.flatnonzero(f & ~cur)
    take = rng.choice(idx, size=min(want, idx.size), replace=False) if idx.size else idx
    cur.ravel()[take] = True
    return int(take.size)


_ADDERS: dict[str, Callable[[np.ndarray, np.ndarray, int, np.random.Generator], int]] = {
    "blobs": _add_blobs,
    "lines": _add_lines,
    "thicken": _add_thicken,
    "salt": _add_salt,
}
