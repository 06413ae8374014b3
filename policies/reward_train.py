"""Training the learned reward net: MSE regression with held-out selection, correlations and a calibration
plot; the checkpoint it writes is what policies/reward_net.py loads."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch.utils.data import DataLoader

from envs.rewards import MultiObjectiveReward
from envs.types import VesselSample
from policies.config import RewardNetConfig
from policies.reward_data import RewardDataset, build_reward_dataset, dice_histogram
from policies.reward_net import CHECKPOINT_FORMAT, PARAM_COUNT, LightweightRewardNetwork, to_inputs

__all__ = ["RewardNetReport", "pearson", "predict_dataset", "spearman", "train_reward_net"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- correlations


def _finite_or_zero(value: float) -> float:
    return 0.0 if not math.isfinite(value) else float(value)


def _correlation(statistic, name: str, x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"{name} needs two arrays of the same length >= 2, got {x.shape} and {y.shape}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return _finite_or_zero(statistic(x, y).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two arrays [N] (scipy); 0.0 when either is constant (no association measurable)."""
    return _correlation(pearsonr, "pearson", x, y)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation [N] (scipy; ties get their average rank); 0.0 if either is constant."""
    return _correlation(spearmanr, "spearman", x, y)


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
