"""Learned reward network: a GT-free estimate of mask quality from (image, mask).

The original experiments' ``LightweightRewardNetwork`` (140,193 parameters) regresses the quality of a
vessel mask, true Dice inside the FOV or the multi-objective reward rescaled to [0, 1], from the RGB image
and the mask alone, so that images without ground truth can still be rewarded. Its scores are tagged
``source="learned"`` so training can down-weight them and monitor learned-vs-GT divergence.

Pieces, in the order they are used::

    ds = build_reward_dataset(samples, masks_per_image=8, seed=0)   # perturbed masks + true Dice
    report = train_reward_net(train, val, RewardNetConfig(), out_dir="runs/rn")
    scorer = RewardNetScorer.from_checkpoint("runs/rn/best_reward_net.pth")
    scorer.score(image, masks).values                               # float32 [K], source "learned"

Training masks come from :func:`perturb_mask`: controlled corruptions of the GT (boundary
erosion/dilation, shifts, dropped branches, cuts whose distal part vanishes, gaps, spurious blobs and
lines, salt-and-pepper noise, thresholded noise, empty and full masks) sized so that the true Dice of the
set spans 0..1 about uniformly. Masks from a segmentation policy can be mixed in (``policy_masks``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from scipy.stats import rankdata
from torch import nn
from torch.utils.data import DataLoader, Dataset

from envs.metrics import EIGHT, dice, junction_pixels, skeleton
from envs.rewards import MultiObjectiveReward, RewardSource
from envs.types import VesselSample
from policies.config import RewardNetConfig

__all__ = [
    "PARAM_COUNT",
    "LearnedScores",
    "LightweightRewardNetwork",
    "PolicyMasks",
    "RewardDataset",
    "RewardNetReport",
    "RewardNetScorer",
    "build_reward_dataset",
    "dice_histogram",
    "load_reward_net",
    "pearson",
    "perturb_mask",
    "predict_dataset",
    "spearman",
    "to_inputs",
    "train_reward_net",
]

logger = logging.getLogger(__name__)

PARAM_COUNT = 140_193
"""Parameters of :class:`LightweightRewardNetwork` (the original experiments' network)."""

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint dict written by :func:`train_reward_net` (stored under config)."""

MIN_SIZE = 64
"""Smallest input side: three stride-2 convolutions and three 2x2 max-pools need 64 px to keep 1x1."""


# ---------------------------------------------------------------------------------------------- network


class LightweightRewardNetwork(nn.Module):
    """Mask-quality regressor: (image, mask) -> score in (0, 1).

    Layers (the original experiments): image (3 ch) and mask (1 ch) concatenated ->
    Conv 4->32 k7 s2 p3, BN, ReLU, MaxPool 2 -> Conv 32->64 k5 s2 p2, BN, ReLU, MaxPool 2 ->
    Conv 64->128 k3 s2 p1, BN, ReLU, MaxPool 2 -> global average pool -> FC 128->64, ReLU -> FC 64->1 ->
    sigmoid. 140,193 parameters; any input of at least 64x64 pixels (the global pool removes the size).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(4, 32, kernel_size=7, stride=2, padding=3),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, stride=2, padding=2),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, 1),
        )

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Score a batch of masks.

        Args:
            image: float [B, 3, H, W] in [0, 1] (uint8 [B, 3, H, W] is divided by 255).
            mask: [B, 1, H, W] or [B, H, W], float 0/1 or bool.
        Returns:
            float [B] in (0, 1).
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0]:
            raise ValueError(
                f"mask must be [B, 1, H, W] or [B, H, W] with B = {image.shape[0]}, got {tuple(mask.shape)}"
            )
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"mask is {tuple(mask.shape[-2:])} but image is {tuple(image.shape[-2:])} (H, W)"
            )
        h, w = image.shape[-2:]
        if min(h, w) < MIN_SIZE:
            raise ValueError(f"image is {h}x{w}; the reward net needs at least {MIN_SIZE}x{MIN_SIZE} pixels")
        x = torch.cat([image, mask.to(image.dtype)], dim=1)
        return torch.sigmoid(self.head(self.features(x))).squeeze(1)


def to_inputs(images: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Numpy batch -> network inputs.

    Args:
        images: uint8 [B, H, W, 3] (or one image [H, W, 3]).
        masks: bool/0-1 [B, H, W] (or one mask [H, W]).
    Returns:
        (image float32 [B, 3, H, W] in [0, 1], mask float32 [B, 1, H, W]).
    """
    images, masks = np.asarray(images), np.asarray(masks)
    if images.ndim == 3:
        images = images[None]
    if masks.ndim == 2:
        masks = masks[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    if masks.ndim != 3 or masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be [B, H, W] = {images.shape[:3]}, got {masks.shape}")
    # torch.tensor copies: callers' arrays may be read-only (SyntheticFundus shares cached ones).
    img = torch.tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    msk = torch.from_numpy(masks != 0).unsqueeze(1).float()
    return img, msk


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
    return _perturb(mask, rng, fov=fov, severity=severity, mode=mode)[0]


def _perturb(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    fov: np.ndarray | None,
    severity: float | None,
    mode: PerturbMode | None,
) -> tuple[np.ndarray, str]:
    """:func:`perturb_mask` plus a short description of what was done (for the dataset's diagnostics)."""
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


# ---------------------------------------------------------------------------------------------- dataset

PolicyMasks = Callable[[VesselSample, np.random.Generator], np.ndarray] | Sequence[Any]
"""Extra masks per image: a callable ``(sample, rng) -> bool [K, H, W]`` (or [H, W]), or a sequence with
one entry per sample, each a bool array [K, H, W] / [H, W] or a list of [H, W] masks (K may be 0)."""


class RewardDataset(Dataset):
    """(image, mask, target) triples for the reward net; images are stored once and shared by their masks.

    Attributes:
        images: uint8 [N, H, W, 3].
        masks: bool [M, H, W], inside each image's FOV.
        image_index: int64 [M], the image of each mask.
        targets: float32 [M] in [0, 1] (what the net regresses).
        dice: float32 [M], true Dice in the FOV (kept for diagnostics whatever the target).
        kinds: [M] how each mask was made ("policy", "empty", "branches+blobs", ...).
        sample_ids: [N] ids of the images.
        target: "dice" or "reward".
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        image_index: np.ndarray,
        targets: np.ndarray,
        dice: np.ndarray,
        kinds: Sequence[str],
        sample_ids: Sequence[str],
        target: str,
    ) -> None:
        m = masks.shape[0]
        if not (image_index.shape == targets.shape == dice.shape == (m,) and len(kinds) == m):
            raise ValueError("image_index, targets, dice and kinds must all have one entry per mask")
        self.images, self.masks, self.image_index = images, masks, image_index
        self.targets, self.dice = targets.astype(np.float32), dice.astype(np.float32)
        self.kinds, self.sample_ids, self.target = tuple(kinds), tuple(sample_ids), target

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image float32 [3, H, W] in [0, 1], mask float32 [1, H, W], target float32 [])."""
        img = torch.from_numpy(self.images[self.image_index[i]]).permute(2, 0, 1).float().div_(255.0)
        msk = torch.from_numpy(self.masks[i]).unsqueeze(0).float()
        return img, msk, torch.tensor(self.targets[i])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


def build_reward_dataset(
    samples: Sequence[VesselSample],
    *,
    masks_per_image: int,
    seed: int,
    target: Literal["dice", "reward"] = "dice",
    reward_fn: MultiObjectiveReward | None = None,
    policy_masks: PolicyMasks | None = None,
) -> RewardDataset:
    """Perturbed masks of every sample's GT (plus optional policy masks) with their true quality.

    Targets:
        "dice": Dice of the mask against the GT inside the FOV (:func:`envs.metrics.dice`).
        "reward": the multi-objective GT reward (``reward_fn``, default ``MultiObjectiveReward()``) mapped
            to [0, 1] with its bounds: (total - low) / (high - low), ``(low, high) = reward_fn.bounds()``
            (default weights: [-4.9, 6.0]). The bounds are worst/best cases of every term at once, so real
            masks use the middle of [0, 1]; the mapping is linear, so rankings (what GRPO uses) are kept.

    Args:
        samples: labelled images, all of one size (batches stack them).
        masks_per_image: perturbed masks per image (:func:`perturb_mask`).
        seed: mask ``j`` of sample ``i`` depends only on (seed, i), not on other samples.
        target: "dice" or "reward".
        reward_fn: the reward for target="reward" (not allowed with "dice").
        policy_masks: extra masks per image (see :data:`PolicyMasks`), ANDed with the FOV, kind "policy".
    Returns:
        a :class:`RewardDataset` of M = n_samples x masks_per_image (+ policy masks) items.
    """
    if target not in ("dice", "reward"):
        raise ValueError(f"target is {target!r}; choose 'dice' or 'reward'")
    if reward_fn is not None and target != "reward":
        raise ValueError("reward_fn is only used with target='reward'; drop it or set target='reward'")
    if masks_per_image < 0 or (masks_per_image == 0 and policy_masks is None):
        raise ValueError(f"masks_per_image is {masks_per_image}; give >= 1 (or policy_masks with 0)")
    if len(samples) == 0:
        raise ValueError("no samples: the reward dataset needs at least one labelled image")
    if policy_masks is not None and not callable(policy_masks) and len(policy_masks) != len(samples):
        raise ValueError(f"policy_masks has {len(policy_masks)} entries but there are {len(samples)} samples")
    shape = samples[0].shape
    for s in samples:
        if not s.has_mask:
            raise ValueError(f"sample {s.id!r} has no GT mask; the reward net trains on labelled images only")
        if s.shape != shape:
            raise ValueError(
                f"sample {s.id!r} is {s.shape[1]}x{s.shape[0]} (WxH) but {samples[0].id!r} is "
                f"{shape[1]}x{shape[0]}; resize them to one size first"
            )
    if min(shape) < MIN_SIZE:
        raise ValueError(f"images are {shape[1]}x{shape[0]}; the reward net needs at least {MIN_SIZE} px")
    reward = (reward_fn or MultiObjectiveReward()) if target == "reward" else None
    lo, hi = reward.bounds() if reward is not None else (0.0, 1.0)

    masks: list[np.ndarray] = []
    index: list[int] = []
    targets: list[float] = []
    dices: list[float] = []
    kinds: list[str] = []
    for i, (s, ss) in enumerate(zip(samples, np.random.SeedSequence(seed).spawn(len(samples)), strict=True)):
        rng = np.random.default_rng(ss)
        gt, fov = s.mask & s.fov, s.fov
        made = [_perturb(gt, rng, fov=fov, severity=None, mode=None) for _ in range(masks_per_image)]
        if policy_masks is not None:
            extra = _policy_masks_for(policy_masks, s, i, rng)
            made += [(m & fov, "policy") for m in extra]
        prepared = reward.prepare_target(gt, fov) if reward is not None else None
        for m, kind in made:
            d = dice(m, gt, fov)
            if reward is not None:
                total = reward.score(m, prepared).total
                y = min(max((total - lo) / (hi - lo), 0.0), 1.0)
            else:
                y = d
            masks.append(m)
            index.append(i)
            targets.append(y)
            dices.append(d)
            kinds.append(kind)
    ds = RewardDataset(
        images=np.stack([s.image for s in samples]),
        masks=np.stack(masks),
        image_index=np.asarray(index, dtype=np.int64),
        targets=np.asarray(targets, dtype=np.float32),
        dice=np.asarray(dices, dtype=np.float32),
        kinds=kinds,
        sample_ids=[s.id for s in samples],
        target=target,
    )
    logger.info(
        "reward dataset: %d masks of %d images (%s target), Dice deciles %s",
        len(ds),
        len(samples),
        target,
        dice_histogram(ds.dice),
    )
    return ds


def _policy_masks_for(
    policy_masks: PolicyMasks, sample: VesselSample, i: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """The policy masks of one sample as a list of bool [H, W], validated against the sample's shape."""
    raw = policy_masks(sample, rng) if callable(policy_masks) else policy_masks[i]
    arr = np.asarray(raw)
    if arr.size == 0:
        return []
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != sample.shape:
        raise ValueError(
            f"policy masks for sample {sample.id!r} are {arr.shape}; expected [K, H, W] with "
            f"H, W = {sample.shape}"
        )
    return [np.asarray(m).astype(bool) for m in arr]


def dice_histogram(values: np.ndarray, bins: int = 10) -> list[int]:
    """Counts of ``values`` (float [M] in [0, 1]) per equal-width bin; 1.0 falls in the last bin."""
    counts, _ = np.histogram(np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0), bins=bins, range=(0, 1))
    return [int(c) for c in counts]


# --------------------------------------------------------------------------------------- correlations


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two float arrays [N]; 0.0 when either is constant (no association measurable)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"pearson needs two arrays of the same length >= 2, got {x.shape} and {y.shape}")
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return 0.0 if den == 0.0 else float(np.clip((xc @ yc) / den, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation [N] (Pearson of ranks, ties get their average rank); 0.0 if either is constant."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs two arrays of the same length, got {x.shape} and {y.shape}")
    return pearson(rankdata(x), rankdata(y))


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RewardNetReport:
    """Outcome of :func:`train_reward_net`; ``val_*`` are of the best checkpoint on the held-out set.

    The best epoch is chosen by held-out MSE, so ``val_*`` is slightly optimistic; ``final_val_*`` (last
    epoch, no selection) is the unbiased number. ``val_spearman_within_image`` is the mean over held-out
    images of the Spearman correlation among that image's masks: the ranking a group baseline (GRPO) uses.
    """

    target: str
    val_mse: float
    val_mae: float
    val_pearson: float
    val_spearman: float
    val_spearman_within_image: float
    val_mse_baseline: float
    """MSE of always predicting the mean training target (what "learned nothing" scores)."""
    final_val_mse: float
    final_val_pearson: float
    final_val_spearman: float
    best_epoch: int
    train_mse: list[float]
    """Mean training MSE of each epoch (train mode, running average over the epoch)."""
    val_mse_per_epoch: list[float]
    n_train: int
    """Training masks."""
    n_val: int
    """Held-out masks."""
    n_train_images: int
    n_val_images: int
    image_size: list[int]
    seconds: float
    train_dice_histogram: list[int]
    val_dice_histogram: list[int]
    best_path: str
    final_path: str
    net: LightweightRewardNetwork | None = field(default=None, repr=False, compare=False)
    """The best network in eval mode on the CPU (not part of :meth:`as_dict`)."""

    def as_dict(self) -> dict[str, Any]:
        """Every field but ``net``, as JSON-ready plain types."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "net"}


def train_reward_net(
    train: Sequence[VesselSample] | RewardDataset,
    val: Sequence[VesselSample] | RewardDataset,
    cfg: RewardNetConfig,
    *,
    out_dir: str | Path,
    seed: int = 0,
    reward_fn: MultiObjectiveReward | None = None,
    device: str | torch.device = "cpu",
) -> RewardNetReport:
    """Train the reward net (Adam, MSE, cfg.epochs epochs of cfg.batch_size) and evaluate it held out.

    Writes into ``out_dir``: ``best_reward_net.pth`` (lowest held-out MSE), ``final_reward_net.pth``,
    ``metrics.json`` (the report) and ``calibration.png`` (held-out predicted vs true). Checkpoints are
    ``{"model_state_dict", "config", "epoch", "val_mse"}`` of plain types (loadable with weights_only=True).

    Args:
        train, val: labelled samples (datasets are built with cfg.masks_per_image and cfg.target from
            disjoint seeds derived from ``seed``) or prebuilt :class:`RewardDataset` s (e.g. with policy masks).
        cfg: epochs, batch size, learning rate, masks per image, target.
        out_dir: created if missing.
        seed: weights init, shuffling and mask generation.
        reward_fn: reward for cfg.target == "reward" (default MultiObjectiveReward()).
        device: torch device.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_seed, val_seed = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(2))
    train_ds = _as_dataset(train, cfg, seed=train_seed, reward_fn=reward_fn, name="train")
    val_ds = _as_dataset(val, cfg, seed=val_seed, reward_fn=reward_fn, name="val")
    if train_ds.image_size != val_ds.image_size:
        logger.warning(
            "train images are %s but held-out images are %s", train_ds.image_size, val_ds.image_size
        )

    # Weights init from ``seed`` without touching the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LightweightRewardNetwork().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    y_val = val_ds.targets.astype(np.float64)
    config = _checkpoint_config(cfg, train_ds, seed, reward_fn)

    best: tuple[float, int, dict[str, torch.Tensor]] = (math.inf, 0, {})
    train_mse: list[float] = []
    val_mse_per_epoch: list[float] = []
    for epoch in range(1, cfg.epochs + 1):
        # 1. One pass over the training masks.
        net.train()
        total = torch.zeros((), dtype=torch.float64, device=device)  # on device: no sync per step
        for image, mask, y in loader:
            image, mask, y = image.to(device), mask.to(device), y.to(device)
            loss = F.mse_loss(net(image, mask), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * y.shape[0]
        train_mse.append(float(total) / len(train_ds))
        # 2. Held-out MSE decides the best checkpoint.
        pred = predict_dataset(net, val_ds, device=device)
        mse = float(np.mean((pred - y_val) ** 2))
        val_mse_per_epoch.append(mse)
        if mse < best[0]:
            best = (mse, epoch, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        logger.info(
            "reward net epoch %d/%d: train MSE %.4f, held-out MSE %.4f", epoch, cfg.epochs, train_mse[-1], mse
        )

    # 3. Save both checkpoints, then report on the best one.
    final_pred = predict_dataset(net, val_ds, device=device)
    best_path, final_path = out / "best_reward_net.pth", out / "final_reward_net.pth"
    final_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if not best[2]:  # held-out MSE was NaN every epoch (diverged): the final weights are all there is
        best = (val_mse_per_epoch[-1], cfg.epochs, final_state)
    _save(final_path, final_state, config, cfg.epochs, val_mse_per_epoch[-1])
    _save(best_path, best[2], config, best[1], best[0])
    net.load_state_dict(best[2])
    pred = predict_dataset(net, val_ds, device=device)

    report = RewardNetReport(
        target=cfg.target,
        val_mse=float(np.mean((pred - y_val) ** 2)),
        val_mae=float(np.mean(np.abs(pred - y_val))),
        val_pearson=pearson(pred, y_val),
        val_spearman=spearman(pred, y_val),
        val_spearman_within_image=_within_image_spearman(pred, y_val, val_ds.image_index),
        val_mse_baseline=float(np.mean((float(train_ds.targets.mean()) - y_val) ** 2)),
        final_val_mse=float(np.mean((final_pred - y_val) ** 2)),
        final_val_pearson=pearson(final_pred, y_val),
        final_val_spearman=spearman(final_pred, y_val),
        best_epoch=best[1],
        train_mse=train_mse,
        val_mse_per_epoch=val_mse_per_epoch,
        n_train=len(train_ds),
        n_val=len(val_ds),
        n_train_images=int(train_ds.images.shape[0]),
        n_val_images=int(val_ds.images.shape[0]),
        image_size=list(train_ds.image_size),
        seconds=time.perf_counter() - t0,
        train_dice_histogram=dice_histogram(train_ds.dice),
        val_dice_histogram=dice_histogram(val_ds.dice),
        best_path=str(best_path),
        final_path=str(final_path),
        net=net.cpu().eval(),
    )
    (out / "metrics.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    _calibration_plot(out / "calibration.png", y_val, pred, report)
    logger.info(
        "reward net: held-out MSE %.4f (mean-predictor %.4f), Pearson %.3f, Spearman %.3f, best epoch %d, %.1f s",
        report.val_mse,
        report.val_mse_baseline,
        report.val_pearson,
        report.val_spearman,
        report.best_epoch,
        report.seconds,
    )
    return report


def _as_dataset(
    data: Sequence[VesselSample] | RewardDataset,
    cfg: RewardNetConfig,
    *,
    seed: int,
    reward_fn: MultiObjectiveReward | None,
    name: str,
) -> RewardDataset:
    if isinstance(data, RewardDataset):
        if data.target != cfg.target:
            raise ValueError(
                f"the {name} dataset has target {data.target!r} but cfg.target is {cfg.target!r}"
            )
        return data
    return build_reward_dataset(
        data, masks_per_image=cfg.masks_per_image, seed=seed, target=cfg.target, reward_fn=reward_fn
    )


def _checkpoint_config(
    cfg: RewardNetConfig, ds: RewardDataset, seed: int, reward_fn: MultiObjectiveReward | None
) -> dict[str, Any]:
    """Plain-typed description stored with the weights (str/int/float/lists only: weights_only loading)."""
    config: dict[str, Any] = {
        "architecture": "LightweightRewardNetwork",
        "format": CHECKPOINT_FORMAT,
        "in_channels": 4,
        "param_count": PARAM_COUNT,
        "target": cfg.target,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": float(cfg.lr),
        "masks_per_image": cfg.masks_per_image,
        "image_size": list(ds.image_size),
        "seed": int(seed),
    }
    if cfg.target == "reward":
        config["reward_bounds"] = list((reward_fn or MultiObjectiveReward()).bounds())
    return config


def _save(
    path: Path, state: dict[str, torch.Tensor], config: dict[str, Any], epoch: int, val_mse: float
) -> None:
    torch.save(
        {"model_state_dict": state, "config": config, "epoch": int(epoch), "val_mse": float(val_mse)}, path
    )


@torch.no_grad()
def predict_dataset(
    net: LightweightRewardNetwork,
    ds: RewardDataset,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> np.ndarray:
    """Eval-mode predictions float64 [M] for every mask of ``ds`` (train/eval mode is restored after)."""
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, len(ds), batch_size):
        idx = np.arange(start, min(start + batch_size, len(ds)))
        image, mask = to_inputs(ds.images[ds.image_index[idx]], ds.masks[idx])
        out.append(net(image.to(device), mask.to(device)).double().cpu().numpy())
    net.train(was_training)
    return np.concatenate(out)


def _within_image_spearman(pred: np.ndarray, y: np.ndarray, image_index: np.ndarray) -> float:
    """Mean Spearman over images with >= 3 masks and a non-constant target; 0.0 if there are none."""
    rhos = []
    for i in np.unique(image_index):
        sel = image_index == i
        if sel.sum() >= 3 and np.ptp(y[sel]) > 0:
            rhos.append(spearman(pred[sel], y[sel]))
    return float(np.mean(rhos)) if rhos else 0.0


def _calibration_plot(path: Path, y: np.ndarray, pred: np.ndarray, report: RewardNetReport) -> None:
    """Held-out predicted vs true with the diagonal (object-oriented Agg: no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="ideal")
    ax.scatter(y, pred, s=8, alpha=0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"true {report.target}")
    ax.set_ylabel("reward net")
    ax.set_title(
        f"held out: MSE {report.val_mse:.4f}, r {report.val_pearson:.3f}, rho {report.val_spearman:.3f}",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------------- loading


def load_reward_net(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> LightweightRewardNetwork:
    """A trained reward net in eval mode from a checkpoint written by :func:`train_reward_net`.

    Loads with ``weights_only=True`` (no code runs from the file). Raises FileNotFoundError for a missing
    file and ValueError naming the file for an unreadable file, a file without ``model_state_dict``, or
    weights that do not fit the architecture (counts of missing, unexpected and mis-shaped keys).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reward net checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"reward net checkpoint {p} could not be read ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        found = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"reward net checkpoint {p} has no 'model_state_dict' (found {found}); expected the dict written "
            f"by train_reward_net"
        )
    state = ckpt["model_state_dict"]
    net = LightweightRewardNetwork()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(
        k
        for k in set(expected) & set(state)
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"reward net checkpoint {p} does not fit LightweightRewardNetwork: {len(missing)} missing keys "
            f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}, {len(bad_shape)} with the "
            f"wrong shape {bad_shape[:4]}"
        )
    net.load_state_dict(state)
    return net.to(map_location).eval()


# ----------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True, eq=False)
class LearnedScores:
    """Reward-net scores of K masks of one image.

    Attributes:
        values: float32 [K] in (0, 1), estimates of the training target (Dice or rescaled reward).
        source: always "learned" (GT-free), so training can tell them from GT rewards.
    """

    values: np.ndarray
    source: RewardSource = "learned"


class RewardNetScorer:
    """Scores K candidate masks of one image with a trained reward net (eval mode, no gradients).

    Args:
        net: a trained :class:`LightweightRewardNetwork` (put in eval mode here).
        device: where to run it.
        batch_size: masks per forward pass (bounds memory for large K).
    """

    def __init__(
        self, net: LightweightRewardNetwork, *, device: str | torch.device = "cpu", batch_size: int = 32
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}; give >= 1")
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 32
    ) -> RewardNetScorer:
        return cls(load_reward_net(path, map_location="cpu"), device=device, batch_size=batch_size)

    @torch.no_grad()
    def score(self, image: np.ndarray, masks: np.ndarray, *, fov: np.ndarray | None = None) -> LearnedScores:
        """Scores of K masks of one image.

        Args:
            image: uint8 [H, W, 3].
            masks: bool/0-1 [K, H, W] (or one mask [H, W]).
            fov: optional bool [H, W]; masks are ANDed with it, as the training masks were.
        Returns:
            :class:`LearnedScores` with values float32 [K].
        """
        img_np = np.asarray(image)
        if img_np.dtype != np.uint8 or img_np.ndim != 3 or img_np.shape[2] != 3:
            raise ValueError(f"image must be uint8 [H, W, 3], got {img_np.dtype} {img_np.shape}")
        m = np.asarray(masks) != 0
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[1:] != img_np.shape[:2]:
            raise ValueError(f"masks must be [K, H, W] with H, W = {img_np.shape[:2]}, got {m.shape}")
        if fov is not None:
            m = m & np.asarray(fov, dtype=bool)
        if m.shape[0] == 0:
            return LearnedScores(values=np.zeros(0, dtype=np.float32))
        img, _ = to_inputs(img_np, m[0])
        img = img.to(self.device)
        self.net.eval()  # a caller may have switched it back to train mode
        out = []
        for start in range(0, m.shape[0], self.batch_size):
            chunk = torch.from_numpy(m[start : start + self.batch_size]).to(self.device).unsqueeze(1).float()
            # expand: the image is shared by the chunk, not copied per mask (cat copies once)
            out.append(self.net(img.expand(chunk.shape[0], -1, -1, -1), chunk).float().cpu().numpy())
        return LearnedScores(values=np.concatenate(out))
