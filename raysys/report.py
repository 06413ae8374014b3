"""A static ``report.html`` (no server, opens offline) with PNG figures next to it."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from raysys import keys
from raysys.config import Config
from raysys.viz import _pyplot

TABLE_KEYS = ("threshold", "dice", "recall", "precision", "cldice", "betti0_err", "betti1_err")
CURVES = (
    ("Reward", (keys.REWARD_MEAN, *map(keys.reward_component, ("dice", "recall", "topology", "length")))),
    ("KL and entropy", (keys.LOSS_KL, keys.KL_OLD_NEW, keys.ENTROPY)),
    ("Validation", (keys.VAL_DICE, keys.VAL_RECALL, keys.VAL_PRECISION, keys.VAL_CLDICE)),
)


def error_overlay(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray, image: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3]: TP green, FP red, FN blue over a dimmed image, inside the FOV."""
    out = (image.astype(np.float32) * 0.45).astype(np.uint8)
    for mask, colour in (
        (pred & gt, (40, 220, 40)),
        (pred & ~gt, (235, 40, 40)),
        (~pred & gt, (60, 110, 255)),
    ):
        out[mask & fov] = colour
    return out


def _curves(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for ax, (title, names) in zip(axes, CURVES, strict=True):
        for key in names:
            pts = [(r["iteration"], r[key]) for r in rows if key in r and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=key, marker="." if title == "Validation" else None)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _overlays(cfg: Config, eval_dir: Path, path: Path, n: int = 3) -> None:
    from envs.datasets import load_dataset
    from raysys.data import dataset_for_split

    plt = _pyplot()
    test = dataset_for_split(cfg.data, "test", load=load_dataset)
    from raysys.evaluate import load_probs

    n = min(n, len(test))
    probs = {k: load_probs(eval_dir / k / "probs.npz", range(n))[0] for k in ("sft", "rl")}
    fig, axes = plt.subplots(n, 3, figsize=(9.6, 3.3 * n), squeeze=False)
    t = cfg.eval.threshold
    for i in range(n):
        s = test[i]
        axes[i, 0].imshow(s.image)
        axes[i, 0].set_title(s.id, fontsize=8)
        for j, k in enumerate(("sft", "rl"), start=1):
            axes[i, j].imshow(error_overlay(probs[k][i] >= t, s.mask, s.fov, s.image))
            axes[i, j].set_title(f"{k.upper()} @ {t:g}: TP green, FP red, FN blue", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(cfg: Config, inputs: dict[str, Path], out: Path) -> Path:
    """report.html + curves.png + overlays.png + calibration.png (+ data preview)."""
    comparison = json.loads((inputs["eval"] / "comparison.json").read_text())
    rows = [json.loads(x) for x in (inputs["rl"] / "metrics.jsonl").read_text().splitlines() if x.strip()]
    _curves(rows, out / "curves.png")
    _overlays(cfg, inputs["eval"], out / "overlays.png")
    figures = [("Learning curves", "curves.png"), ("Errors on held-out images", "overlays.png")]
    for src, name, title in (
        (inputs["reward_net"] / "calibration.png", "calibration.png", "Reward net calibration (held-out)"),
        (inputs["data"] / "preview.png", "data_preview.png", "Training data"),
    ):
        if src.is_file():
            shutil.copy(src, out / name)
            figures.append((title, name))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in TABLE_KEYS)
    body = "".join(
        "<tr><td>" + html.escape(model) + "</td>"
        + "".join(f"<td>{vals[k]:.4f}</td>" if k in vals else "<td></td>" for k in TABLE_KEYS) + "</tr>"
        for model, vals in comparison.items()
    )  # fmt: skip
    figs = "".join(f'<h2>{html.escape(t)}</h2><img src="{n}" alt="{html.escape(t)}">' for t, n in figures)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>raysys report: {html.escape(cfg.run.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>raysys report: {html.escape(cfg.run.name)}</h1>
<p>SFT baseline vs RL (best validation checkpoint) on {html.escape(cfg.data.kind)} test images; thresholds
0.5 and each model's best validation threshold. Metrics are means over images, inside the FOV.</p>
<table><tr><th>model</th>{head}</tr>{body}</table>
{figs}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
