"""GT-free domain adaptation: SFT on the source domain, RL on unlabelled target images with the learned
reward only -> JSON (and a Markdown table).

The lab's situation: a model trained on one site (``data.domain=source``) and many unlabelled images of its
own (``data.domain=shifted``: smaller field of view, thinner and fainter vessels, more blur and noise). The
target's labels are used for nothing but the reported numbers and the hacking monitor:

1. The learned reward net is trained on labelled *source* images (``raysys reward-net``, masks of the SFT
   model mixed in) and never sees the target.
2. ``raysys train data.domain=shifted reward.source=learned`` from the SFT checkpoint. The run's checkpoint
   is chosen without labels: ``eval.select_metric=val/learned_score`` (the reward net's score of the greedy
   masks of the target's validation images); the last checkpoint is reported too.
3. Every model is thresholded where the *source* validation set says (the target has no labels to tune on):
   ``<model>@source-best``; ``sft@target-best`` (the threshold chosen on the target's labelled validation
   set) is an oracle shown for reference only.

The learned-vs-GT gap over training is the reward-hacking monitor: per iteration, the reward net's mean
score of the sampled masks against their true Dice (``custom/reward_net_score`` vs ``custom/gt_dice``), and
on the validation images the same for the greedy masks (``val/reward_gap``).

    .venv/bin/python benchmarks/sft_baseline.py        # writes runs/sft_baseline_bench/sft/model
    .venv/bin/python benchmarks/gt_free_adaptation.py --sft runs/sft_baseline_bench/sft/model [--seeds 0 1 2]

Each seed's scores are kept in ``<output-dir>/rl_s<seed>.json`` (and the reward net in
``<output-dir>/reward_net``), so an interrupted benchmark goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import harness
import numpy as np
import torch
from rl_common import FIRST_RECIPE, best_threshold, markdown, scores, summary, train

from raysys import keys

TARGET = [
    *FIRST_RECIPE, "data.domain=shifted", "reward.source=learned", "eval.select_metric=val/learned_score",
]  # fmt: skip
"""RL on the target: the learned reward alone (of the raw masks, as first measured), and a checkpoint chosen
without labels."""
CURVE_KEYS = (
    "custom/reward_net_score",
    "custom/gt_dice",
    keys.LEARNED_GT_ALIGNMENT,
    "val/learned_score",
    keys.VAL_DICE,
    "val/reward_gap",
)


def reward_net(config: str, sft: str, out: Path) -> Path:
    """The learned reward net, trained on labelled source images only (cached in ``out``)."""
    ckpt = out / "best_reward_net.pth"
    if not ckpt.is_file():
        harness.run_cli(
            "reward-net", config, "data.domain=source", "--out", str(out), "--policy-checkpoint", sft
        )
    return ckpt


def evaluate(config: str, overrides: list[str], models: dict[str, Path | None]) -> dict:
    """Each model's threshold chosen on the source's validation set, then scored on the target's test set
    at 0.5 and at that threshold; ``sft`` also at the target-val-best threshold (oracle)."""
    from envs.datasets import load_dataset
    from policies.evaluation import predict_probs
    from policies.factory import load_policy
    from raysys.config_io import load_config
    from raysys.data import dataset_for_split, inference_for

    cfg = {d: load_config(config, [*overrides, f"data.domain={d}"]) for d in ("source", "shifted")}
    src_val = list(dataset_for_split(cfg["source"].data, "val", load=load_dataset))
    tgt_val = list(dataset_for_split(cfg["shifted"].data, "val", load=load_dataset))
    tgt_test = list(dataset_for_split(cfg["shifted"].data, "test", load=load_dataset))
    inference, th = inference_for(cfg["shifted"]), cfg["shifted"].eval.thresholds
    out: dict = {"n_test": len(tgt_test)}
    for label, ckpt in models.items():
        pol = load_policy(cfg["shifted"].policy, ckpt, seed=cfg["shifted"].run.seed)

        def probs(samples, p=pol):
            return predict_probs(lambda im, pr: p.mask_logits(im, pr), samples, inference)

        test_p = probs(tgt_test)
        t_src = best_threshold(probs(src_val), src_val, th)
        out[f"{label}_source_best_threshold"] = t_src
        out[f"{label}@0.5"] = scores(test_p, tgt_test, 0.5)
        out[f"{label}@source-best"] = scores(test_p, tgt_test, t_src)
        if label == "sft":
            t_tgt = best_threshold(probs(tgt_val), tgt_val, th)
            out["sft_target_best_threshold"] = t_tgt
            out["sft@target-best (oracle)"] = scores(test_p, tgt_test, t_tgt)
    return out


def run_seed(config: str, sft: str, rn: Path, seed: int, out_dir: Path, extra: list[str]) -> dict:
    name = f"rl_s{seed}"
    overrides = [
        f"policy.checkpoint={sft}", f"run.seed={seed}", f"run.name={name}", f"run.output_dir={out_dir}",
        f"reward.reward_net={rn}", *TARGET, *extra,
    ]  # fmt: skip
    run = train(config, overrides)
    cfg, rows = run.cfg, run.rows
    best = json.loads((cfg.run_dir / "checkpoints" / "best" / "meta.json").read_text())
    ckpts = cfg.run_dir / "checkpoints"
    base = [f"policy.checkpoint={sft}", f"run.seed={seed}"]
    result = {
        "seed": seed,
        "overrides": [*TARGET, *extra],
        "train_wall_s": round(run.wall_s, 1),
        "iterations": cfg.learner.iterations,
        "best_iteration": best["iteration"],
        **evaluate(config, base, {"sft": None, "rl": ckpts / "best", "rl_last": ckpts / "latest"}),
        "curve": [
            {"iteration": r["iteration"], **{k: r[k] for k in CURVE_KEYS if k in r}}
            for r in rows
            if any(k in r for k in CURVE_KEYS)
        ],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=1), flush=True)
    return result


def mean_logged(runs: list[dict], key: str) -> float | None:
    """Mean of ``key`` over every iteration of every run's curve that logged it; None if none did."""
    vals = [row[key] for run in runs for row in run["curve"] if key in row]
    return float(np.mean(vals)) if vals else None


def gap_curve(runs: list[dict], every: int = 10) -> list[dict[str, float]]:
    """Learned score, GT Dice and their gap of the sampled masks, mean over seeds, every ``every`` iterations
    (mean over the window), the learned-vs-GT advantage alignment (``custom/learned_gt_alignment``) where it
    was logged, and the validation gap where it was measured."""
    n = max(r["iterations"] for r in runs)
    out = []
    for start in range(0, n, every):
        learned, gt, val_gap, alignment = [], [], [], []
        for run in runs:
            for row in run["curve"]:
                if start <= row["iteration"] < start + every:
                    if "custom/reward_net_score" in row and "custom/gt_dice" in row:
                        learned.append(row["custom/reward_net_score"])
                        gt.append(row["custom/gt_dice"])
                    if "custom/learned_gt_alignment" in row:
                        alignment.append(row["custom/learned_gt_alignment"])
                    if "val/reward_gap" in row:
                        val_gap.append(row["val/reward_gap"])
        if learned:
            out.append(
                {
                    "iterations": f"{start}-{start + every - 1}",
                    "learned_score": float(np.mean(learned)),
                    "gt_dice": float(np.mean(gt)),
                    "gap": float(np.mean(learned) - np.mean(gt)),
                    "alignment": float(np.mean(alignment)) if alignment else None,
                    "val_gap": float(np.mean(val_gap)) if val_gap else None,
                }
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="tiny SFT checkpoint trained on the source domain")
    parser.add_argument("--config", default=str(harness.ROOT / "examples/tiny_synthetic.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default=str(harness.RUNS / "gt_free_adaptation"))
    parser.add_argument("--json", default=str(harness.result_path("gt_free_adaptation")))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the RL run")
    args = parser.parse_args()

    torch.set_num_threads(2)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rn = reward_net(args.config, args.sft, out_dir / "reward_net")
    runs = []
    for seed in args.seeds:
        cached = out_dir / f"rl_s{seed}.json"
        if not cached.is_file():
            cached.write_text(json.dumps(run_seed(args.config, args.sft, rn, seed, out_dir, args.overrides)))
        runs.append(json.loads(cached.read_text()))
    rows = ["sft@0.5", "sft@source-best", "sft@target-best (oracle)", "rl@0.5", "rl@source-best"]
    rows += ["rl_last@0.5", "rl_last@source-best"]
    table = {row: summary([r[row] for r in runs]) for row in rows}
    base = table["sft@source-best"]
    result = {
        "config": harness.display_path(args.config),
        "source_domain": "source",
        "target_domain": "shifted",
        "rl_overrides": [*TARGET, *args.overrides],
        "seeds": args.seeds,
        "n_test": runs[0]["n_test"],
        "baseline": "sft@source-best: the SFT model at the threshold chosen on the source's validation set",
        "target_dice_gain": table["rl@source-best"]["dice"] - base["dice"],
        "target_cldice_gain": table["rl@source-best"]["cldice"] - base["cldice"],
        "target_dice_gain_last": table["rl_last@source-best"]["dice"] - base["dice"],
        "best_iterations": [r["best_iteration"] for r in runs],
        "thresholds": {
            k: [r[k] for r in runs]
            for k in ("sft_source_best_threshold", "sft_target_best_threshold", "rl_source_best_threshold")
        },
        "train_wall_s_mean": float(np.mean([r["train_wall_s"] for r in runs])),
        "wall_s": round(time.perf_counter() - t0, 1),
        "table": table,
        "learned_gt_alignment": mean_logged(runs, keys.LEARNED_GT_ALIGNMENT),
        "reward_gap_curve": gap_curve(runs),
    }
    harness.write_result("gt_free_adaptation", result, args.json)
    print(markdown(table))
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
