"""Held-out accuracy of the learned reward net on synthetic fundus images.

Trains :class:`policies.reward_net.LightweightRewardNetwork` with the ``RewardNetConfig`` defaults (Adam
1e-3, batch 4, MSE, 10 epochs, 8 perturbed masks per image) on the synthetic *train* split and evaluates
it on the *val* split (disjoint image seeds), then writes JSON with the held-out MSE / MAE / Pearson /
Spearman (pooled and within image), the mean-predictor baseline, timings, dataset sizes and the true-Dice
histogram of both sets. Checkpoints, metrics.json and calibration.png go to ``--out-dir``.

    python benchmarks/reward_net_heldout.py                    # 48 + 16 images at 128 px, ~3-5 min on 2 cores
    python benchmarks/reward_net_heldout.py --size 256 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import fields
from pathlib import Path

import harness
import numpy as np
import torch

from envs.synthetic import SyntheticFundus
from policies.config import RewardNetConfig
from policies.reward_data import build_reward_dataset, dice_histogram
from policies.reward_train import predict_dataset, train_reward_net

DEFAULTS = RewardNetConfig()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    p.add_argument("--n-train", type=int, default=DEFAULTS.n_train, help="training images")
    p.add_argument("--n-val", type=int, default=DEFAULTS.n_val, help="held-out images")
    p.add_argument("--masks-per-image", type=int, default=DEFAULTS.masks_per_image)
    p.add_argument("--target", choices=("dice", "reward"), default=DEFAULTS.target)
    p.add_argument(
        "--size", type=int, default=128, help="image side in pixels (128 fits a CPU; 256 is 4x slower)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; more threads than free cores makes these small convolutions far slower",
    )
    p.add_argument("--out-dir", type=Path, default=harness.RUNS / "reward_net_bench")
    p.add_argument("--json", type=Path, default=harness.result_path("reward_net_heldout"))
    return p.parse_args(argv)


def mae_by_decile(true: np.ndarray, pred: np.ndarray) -> list[float | None]:
    """Mean |pred - true| per true-value decile (None for an empty decile): where the net is wrong."""
    bins = np.minimum((np.clip(true, 0, 1) * 10).astype(int), 9)
    return [
        round(float(np.mean(np.abs(pred[bins == b] - true[bins == b]))), 4) if np.any(bins == b) else None
        for b in range(10)
    ]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    cfg = RewardNetConfig(
        epochs=args.epochs,
        n_train=args.n_train,
        n_val=args.n_val,
        masks_per_image=args.masks_per_image,
        target=args.target,
    )
    t0 = time.perf_counter()

    # 1. Data: disjoint splits of the synthetic generator, perturbed masks with their true quality.
    train_src = SyntheticFundus("train", cfg.n_train, args.size, seed=args.seed)
    val_src = SyntheticFundus("val", cfg.n_val, args.size, seed=args.seed)
    kw = {"masks_per_image": cfg.masks_per_image, "target": cfg.target}
    train_ds = build_reward_dataset(list(train_src), seed=args.seed, **kw)
    val_ds = build_reward_dataset(list(val_src), seed=args.seed + 1, **kw)
    data_s = time.perf_counter() - t0

    # 2. Train and evaluate held out.
    report = train_reward_net(train_ds, val_ds, cfg, out_dir=args.out_dir, seed=args.seed)
    assert report.net is not None
    pred = predict_dataset(report.net, val_ds, device="cpu")
    true = val_ds.targets.astype(np.float64)

    machine = harness.machine()
    result = {
        "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
        "image_size": args.size,
        "seed": args.seed,
        "heldout": {
            "mse": round(report.val_mse, 5),
            "mae": round(report.val_mae, 5),
            "pearson": round(report.val_pearson, 4),
            "spearman": round(report.val_spearman, 4),
            "spearman_within_image": round(report.val_spearman_within_image, 4),
            "mse_mean_predictor": round(report.val_mse_baseline, 5),
            "best_epoch": report.best_epoch,
            "final_epoch_mse": round(report.final_val_mse, 5),
            "final_epoch_pearson": round(report.final_val_pearson, 4),
            "final_epoch_spearman": round(report.final_val_spearman, 4),
            "mae_by_true_decile": mae_by_decile(true, pred),
        },
        "train_mse_per_epoch": [round(v, 5) for v in report.train_mse],
        "heldout_mse_per_epoch": [round(v, 5) for v in report.val_mse_per_epoch],
        "dataset": {
            "n_train_images": report.n_train_images,
            "n_val_images": report.n_val_images,
            "n_train_masks": report.n_train,
            "n_val_masks": report.n_val,
            "dice_histogram_bins": [round(b, 1) for b in np.linspace(0, 1, 11)],
            "dice_histogram_train": dice_histogram(train_ds.dice),
            "dice_histogram_val": dice_histogram(val_ds.dice),
        },
        "seconds": {
            "data": round(data_s, 1),
            "train_and_eval": round(report.seconds, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "outputs": {"out_dir": str(args.out_dir), "best": report.best_path, "final": report.final_path},
        "environment": {  # as first recorded; the result's "machine" block has the machine's own
            "python": machine["python"],
            "torch": torch.__version__,
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "machine": machine["arch"],
        },
    }
    harness.write_result("reward_net_heldout", result, args.json, machine_block=machine)
    print(json.dumps(result["heldout"], indent=2))
    print(f"train {result['seconds']['train_and_eval']} s, data {result['seconds']['data']} s -> {args.json}")
    return result


if __name__ == "__main__":
    main()
