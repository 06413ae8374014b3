"""Figures written by the CLI and the report (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from envs.types import VesselSample


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mask_overlay(
    image: np.ndarray, mask: np.ndarray, *, color=(0, 255, 255), alpha: float = 0.6
) -> np.ndarray:
    """uint8 [H,W,3] image with ``mask`` [H,W] painted in ``color``."""
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def preview_grid(samples: Sequence[VesselSample], path: str | Path, *, dpi: int = 110) -> Path:
    """One row per sample: the image, its vessel mask (FOV outline in grey) and the mask over the image."""
    plt = _pyplot()
    n = len(samples)
    if n == 0:
        raise ValueError("preview_grid needs at least one sample")
    h, w = samples[0].mask.shape
    fig, axes = plt.subplots(n, 3, figsize=(3 * 3.2, n * 3.2 * h / w), squeeze=False)
    for row, s in zip(axes, samples, strict=True):
        fov_px = max(int(s.fov.sum()), 1)
        frac = float((s.mask & s.fov).sum()) / fov_px
        mask_rgb = np.zeros((*s.mask.shape, 3), np.uint8)
        mask_rgb[s.fov] = 40
        mask_rgb[s.mask] = 255
        panels = (
            (s.image, f"{s.id}"),
            (mask_rgb, f"vessels {100 * frac:.1f}% of FOV" if s.has_mask else "no ground truth"),
            (mask_overlay(s.image, s.mask), "overlay"),
        )
        for ax, (img, title) in zip(row, panels, strict=True):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def sweep_plot(table, params: Sequence[str], metric: str, path: str | Path) -> Path:
    """One panel per swept parameter: the trials' best metric against its value (failed trials as x)."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = list(params) or ["trial_id"]
    fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.2), squeeze=False)
    failed = table["status"] == "ERROR"
    for ax, key in zip(axes[0], params, strict=True):
        values = table[key]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.dropna())
        if numeric and values.notna().any():
            x = values.astype(float)
        else:  # categorical: one position per distinct value
            labels = sorted({str(v) for v in values})
            position = {label: i for i, label in enumerate(labels)}
            x = values.map(lambda v, position=position: position[str(v)]).astype(float)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        y = table[metric].astype(float)
        ok = ~failed & y.notna()
        ax.scatter(x[ok], y[ok], s=28, c="tab:blue", label="trial")
        if failed.any():
            bottom = float(y[ok].min()) if ok.any() else 0.0
            ax.scatter(x[failed], [bottom] * int(failed.sum()), marker="x", c="tab:red", label="failed")
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
