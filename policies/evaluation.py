"""Greedy evaluation of a segmenter on labelled samples (per-image metrics, macro means, threshold sweep)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from envs.metrics import segmentation_metrics, threshold_sweep
from envs.types import VesselSample
from envs.windows import Box

LogitsFn = Callable[[np.ndarray, list[str]], torch.Tensor]
"""(images uint8 [B,H,W,3], prompts) -> logits [B,H,W]."""

METRIC_KEYS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "specificity",
    "accuracy",
    "cldice",
    "betti0_err",
    "betti1_err",
)


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

    jobs = []  # (sample index, scaled sample, box) in order
    scaled = []
    for i in range(len(samples)):
        s = rescale_sample(samples[i], inference.scale)
        scaled.append(s)
        h, w = s.mask.shape
        boxes = (
            window_boxes(h, w, inference.window, overlap=inference.overlap, fov=s.fov)
            if inference.window
            else [Box(0, 0, h, w)]
        )
        jobs.extend((i, box) for box in boxes or [Box(0, 0, h, w)])
    pieces: dict[int, list] = {i: [] for i in range(len(samples))}
    start = 0
    while start < len(jobs):  # consecutive windows of one shape share a forward pass
        shape = (jobs[start][1].h, jobs[start][1].w)
        end = start
        while (
            end < len(jobs)
            and end - start < inference.batch_size
            and (jobs[end][1].h, jobs[end][1].w) == shape
        ):
            end += 1
        chunk = jobs[start:end]
        images = np.stack([scaled[i].image[box.slices] for i, box in chunk])
        prompts = [scaled[i].prompt for i, _ in chunk]
        if keyed:
            keys = [(i, box.y0, box.x0, box.h, box.w) for i, box in chunk]
            logits = logits_fn(images, prompts, keys)
        else:
            logits = logits_fn(images, prompts)
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        for (i, box), p in zip(chunk, probs, strict=True):
            pieces[i].append((p, box))
        start = end
    out = []
    for i, s in enumerate(scaled):
        h, w = s.mask.shape
        prob = stitch([p for p, _ in pieces[i]], [b for _, b in pieces[i]], h, w)
        native = samples[i]
        prob = rescale_probs(prob, *native.mask.shape)
        out.append(np.where(native.fov, prob, 0.0).astype(np.float32))
    return out


@dataclass
class EvalResult:
    """Metrics at ``threshold`` (macro mean over images), the per-image rows, and a threshold sweep."""

    threshold: float
    mean: dict[str, float]
    per_image: list[dict[str, float | str]]
    sweep: dict[str, list[float]] = field(default_factory=dict)

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
    thresholds: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
) -> EvalResult:
    """Score probability maps (one [H,W] per sample) against the samples' masks inside their FOVs."""
    labelled = [i for i, s in enumerate(samples) if s.has_mask]
    if not labelled:
        raise ValueError("evaluation needs samples with ground-truth masks")
    rows: list[dict[str, float | str]] = []
    sweeps = []
    for i in labelled:
        s = samples[i]
        row: dict[str, float | str] = {"id": s.id}
        row.update(segmentation_metrics(probs[i] >= threshold, s.mask, s.fov))
        rows.append(row)
        sweeps.append(threshold_sweep(probs[i], s.mask, np.asarray(thresholds), s.fov))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRIC_KEYS}
    sweep = {"thresholds": [float(t) for t in thresholds]}
    for k in ("dice", "precision", "recall"):
        sweep[k] = np.mean([sw[k] for sw in sweeps], axis=0).tolist()
    return EvalResult(threshold=threshold, mean=mean, per_image=rows, sweep=sweep)


def evaluate(
    logits_fn: LogitsFn,
    samples: Sequence[VesselSample],
    *,
    threshold: float = 0.5,
    thresholds: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    inference: Inference = WholeImage,
) -> EvalResult:
    probs = predict_probs(logits_fn, samples, inference)
    return evaluate_probs(probs, samples, threshold=threshold, thresholds=thresholds)
