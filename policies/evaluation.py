"""Greedy evaluation of a segmenter on labelled samples (per-image metrics, macro means, threshold sweep)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from envs.metrics import (
    SEGMENTATION_METRICS,
    SWEEP_THRESHOLDS,
    ReferenceTopology,
    reference_topology,
    segmentation_metrics,
    threshold_sweep,
)
from envs.types import VesselSample
from envs.windows import Box

log = logging.getLogger(__name__)

LogitsFn = Callable[[np.ndarray, list[str]], torch.Tensor]
"""(images uint8 [B,H,W,3], prompts) -> logits [B,H,W]."""


@dataclass(frozen=True)
class Inference:
    """How full-image probabilities are produced (the same for validation, ``raysys eval`` and reports).

    Attributes:
        window: side of the sliding windows in (scaled) pixels; None runs each whole image at once.
        overlap: fraction of a window shared with its neighbours; blended with ``envs.windows.blend_weights``.
        scale: images are resampled by this factor before the policy sees them; probabilities are mapped
            back, so metrics are always at native resolution.
        batch_size: windows (or images) per forward pass.
    """

    window: int | None = None
    overlap: float = 0.25
    scale: float = 1.0
    batch_size: int = 8


WholeImage = Inference()


@torch.no_grad()
def predict_probs(
    logits_fn: LogitsFn,
    samples: Sequence[VesselSample],
    inference: Inference = WholeImage,
    *,
    keyed: bool = False,
) -> list[np.ndarray]:
    """Probability maps float32 [H, W] per sample at its native size (sigmoid of the logits, no
    temperature), zero outside the FOV.

    With ``keyed``, ``logits_fn(images, prompts, keys)`` also gets one hashable key per window
    ``(sample index, y0, x0, h, w)``, stable across calls, so a caller can cache frozen features.
    """
    from envs.windows import rescale_probs, rescale_sample, stitch, window_boxes

    out: list[np.ndarray | None] = [None] * len(samples)
    live: dict[int, tuple[VesselSample, VesselSample, list[Box], list[np.ndarray]]] = {}
    pending: list[tuple[int, Box]] = []  # windows waiting for a forward pass, in image order

    def run_pending() -> None:
        images = np.stack([live[i][1].image[box.slices] for i, box in pending])
        prompts = [live[i][1].prompt for i, _ in pending]
        if keyed:
            keys = [(i, box.y0, box.x0, box.h, box.w) for i, box in pending]
            logits = logits_fn(images, prompts, keys)
        else:
            logits = logits_fn(images, prompts)
        for (i, _), p in zip(pending, torch.sigmoid(logits.float()).cpu().numpy(), strict=True):
            live[i][3].append(p)
        pending.clear()
        for i in [i for i, (_, _, boxes, pieces) in live.items() if len(pieces) == len(boxes)]:
            native, scaled, boxes, pieces = live.pop(i)  # stitched as soon as complete: memory stays flat
            prob = rescale_probs(stitch(pieces, boxes, *scaled.mask.shape), *native.mask.shape)
            out[i] = np.where(native.fov, prob, 0.0).astype(np.float32)

    for i in range(len(samples)):
        native = samples[i]
        scaled = rescale_sample(native, inference.scale)
        h, w = scaled.mask.shape
        if inference.window:
            boxes = window_boxes(h, w, inference.window, overlap=inference.overlap, fov=scaled.fov)
        else:
            boxes = [Box(0, 0, h, w)]
        if not boxes:  # no FOV pixel at all
            out[i] = np.zeros(native.mask.shape, np.float32)
            continue
        live[i] = (native, scaled, boxes, [])
        for box in boxes:  # consecutive windows of one shape share a forward pass
            if pending and (
                len(pending) == inference.batch_size or (pending[0][1].h, pending[0][1].w) != (box.h, box.w)
            ):
                run_pending()
            pending.append((i, box))
    if pending:
        run_pending()
    missing = [samples[i].id for i, p in enumerate(out) if p is None]
    if missing:
        raise RuntimeError(f"no probabilities were produced for {missing}")
    return out  # type: ignore[return-value]


@dataclass
class EvalResult:
    """Metrics at ``threshold`` (macro mean over images), the per-image rows, and a threshold sweep."""

    threshold: float
    mean: dict[str, float]
    per_image: list[dict[str, float | str | bool]]
    sweep: dict[str, list[float]] = field(default_factory=dict)
    n_without_vessels: int = 0
    """Labelled images with no vessel pixel in their FOV: in ``per_image``, not in ``mean`` or ``sweep``."""

    @property
    def best_threshold(self) -> float:
        """Threshold with the highest mean Dice in the sweep (choose it on validation images only)."""
        dices = self.sweep["dice"]
        return float(self.sweep["thresholds"][int(np.argmax(dices))])


def evaluate_probs(
    probs: Sequence[np.ndarray],
    samples: Sequence[VesselSample],
    *,
    threshold: float = 0.5,
    thresholds: Sequence[float] = SWEEP_THRESHOLDS,
) -> EvalResult:
    """Score probability maps (one [H,W] per sample) against the samples' masks inside their FOVs.

    Images whose ground truth has no vessel pixel inside the FOV get a per-image row (``has_vessels``
    False) but stay out of the means and the sweep, as vessel benchmarks do: an empty mask would score
    Dice 1.0 for predicting nothing. A loud warning names them; if no image has vessels, it is an error.
    """
    labelled = [i for i, s in enumerate(samples) if s.has_mask]
    if not labelled:
        raise ValueError("evaluation needs samples with ground-truth masks")
    rows: list[dict[str, float | str | bool]] = []
    sweeps = []
    for i in labelled:
        s = samples[i]
        has_vessels = bool((s.mask & s.fov).any())
        row: dict[str, float | str | bool] = {"id": s.id, "has_vessels": has_vessels}
        row.update(segmentation_metrics(probs[i] >= threshold, s.mask, s.fov, reference=_reference(s)))
        rows.append(row)
        if has_vessels:
            sweeps.append(threshold_sweep(probs[i], s.mask, np.asarray(thresholds), s.fov))
    scored = [r for r in rows if r["has_vessels"]]
    empty = [str(r["id"]) for r in rows if not r["has_vessels"]]
    if not scored:
        raise ValueError(
            f"none of the {len(rows)} labelled images has a vessel pixel inside its FOV (e.g. {empty[0]}); "
            "check the masks (empty or misread annotations) and the FOV masks"
        )
    if empty:
        log.warning(
            "%d of %d labelled images have no vessel pixel inside their FOV (%s): reported per image, "
            "left out of the means",
            len(empty),
            len(rows),
            ", ".join(empty[:5]),
        )
    full = [str(r["id"]) for r, i in zip(rows, labelled, strict=True) if _mostly_vessel(samples[i])]
    if full:
        log.warning("the ground truth of %s covers most of its FOV: an inverted mask?", ", ".join(full[:5]))
    mean = {k: float(np.mean([r[k] for r in scored])) for k in SEGMENTATION_METRICS}
    sweep = {"thresholds": [float(t) for t in thresholds]}
    for k in ("dice", "precision", "recall"):
        sweep[k] = np.mean([sw[k] for sw in sweeps], axis=0).tolist()
    return EvalResult(
        threshold=threshold, mean=mean, per_image=rows, sweep=sweep, n_without_vessels=len(empty)
    )


_REFERENCES: weakref.WeakKeyDictionary[VesselSample, ReferenceTopology] = weakref.WeakKeyDictionary()
"""Each sample's ground-truth topology, kept while the sample lives: validation scores the same images every
few iterations, and a pipeline scores each test image at two thresholds (samples are never modified)."""


def _reference(s: VesselSample) -> ReferenceTopology:
    ref = _REFERENCES.get(s)
    if ref is None:
        ref = _REFERENCES[s] = reference_topology(s.mask, s.fov)
    return ref


def _mostly_vessel(s: VesselSample) -> bool:
    """Vessels fill 8-14 % of a fundus FOV; more than half is a misread or inverted annotation."""
    return bool(s.fov.any() and s.mask[s.fov].mean() > 0.5)


def evaluate(
    logits_fn: LogitsFn,
    samples: Sequence[VesselSample],
    *,
    threshold: float = 0.5,
    thresholds: Sequence[float] = SWEEP_THRESHOLDS,
    inference: Inference = WholeImage,
) -> EvalResult:
    probs = predict_probs(logits_fn, samples, inference)
    return evaluate_probs(probs, samples, threshold=threshold, thresholds=thresholds)
