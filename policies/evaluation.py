"""Greedy evaluation of a segmenter on labelled samples (per-image metrics, macro means, threshold sweep)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from envs.metrics import segmentation_metrics, threshold_sweep
from envs.types import VesselSample

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


@torch.no_grad()
def predict_probs(logits_fn: LogitsFn, samples: Sequence[VesselSample], *, batch_size: int = 8) -> np.ndarray:
    """Probability maps float32 [N, H, W] (sigmoid of the logits, no temperature)."""
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = [samples[j] for j in range(i, min(i + batch_size, len(samples)))]
        images = np.stack([s.image for s in chunk])
        logits = logits_fn(images, [s.prompt for s in chunk])
        out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0, 0), np.float32)


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
    probs: np.ndarray,
    samples: Sequence[VesselSample],
    *,
    threshold: float = 0.5,
    thresholds: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
) -> EvalResult:
    """Score probability maps [N,H,W] against the samples' masks inside their FOVs."""
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
    batch_size: int = 8,
) -> EvalResult:
    probs = predict_probs(logits_fn, samples, batch_size=batch_size)
    return evaluate_probs(probs, samples, threshold=threshold, thresholds=thresholds)
