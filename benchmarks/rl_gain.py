"""RL gain over the SFT baseline on held-out synthetic images, over several seeds -> JSON.

The RL model is the run's best validation checkpoint (``eval.select_metric`` on the val split); the final
weights are reported too (``rl_last``). The test split is used for nothing but these numbers.

    .venv/bin/python benchmarks/rl_gain.py --sft runs/sft_baseline_bench/sft/model [--seeds 0 1 2]

For each seed: ``raysys train examples/tiny_synthetic.yaml policy.checkpoint=SFT run.seed=S`` (the real CLI,
timed), then both models are scored on the test split (never used for training or model selection) at
threshold 0.5 and at each model's best validation threshold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from raysys import keys

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("dice", "recall", "precision", "cldice", "betti0_err", "betti1_err")
FIRST_RECIPE = [
    "reward.postprocess=false", "reward.weights.cldice=0", "reward.weights.betti=0", "eval.select_metric=val/dice",
]  # fmt: skip
"""The RL recipe of examples/tiny_synthetic.yaml when the levers were first screened (raw masks scored, no
clDice or Betti term, checkpoint kept by val Dice): the benchmarks that compare against earlier measurements
pin it, since the example has since moved to the recipe they chose."""


def scores(probs, samples, threshold: float) -> dict:
    """Mean test metrics (KEYS) of probability maps at ``threshold``."""
    from policies.evaluation import evaluate_probs

    mean = evaluate_probs(probs, samples, threshold=threshold).mean
    return {k: mean[k] for k in KEYS}


def best_threshold(probs, samples, thresholds) -> float:
    from policies.evaluation import evaluate_probs

    return evaluate_probs(probs, samples, thresholds=thresholds).best_threshold


def raysys_cli(*argv: str) -> float:
    """Run the real CLI (``raysys <argv>``); its wall time in seconds. A failure stops with its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raysys", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"raysys {' '.join(argv[:2])} failed")
    return time.perf_counter() - t0


def resume_flag(cfg) -> list[str]:
    """``--resume`` for a run an interrupted benchmark left behind (its own folder), so it goes on from its
    last checkpoint instead of refusing to overwrite it (the wall time then covers the rest only)."""
    from raysys.runtime import holds_results

    return ["--resume"] if holds_results(cfg.run_dir) else []


def train_and_score(config: str, sft: str, seed: int, name: str, output_dir: str, overrides) -> dict:
    """``raysys train`` from the SFT checkpoint, then SFT, the best-validation RL checkpoint ("rl") and the
    last one ("rl_last") scored on the test split at 0.5 and at each model's best validation threshold."""
    from envs.datasets import load_dataset
    from policies.evaluation import predict_probs
    from policies.factory import load_policy
    from raysys.config_io import load_config
    from raysys.data import dataset_for_split, inference_for

    overrides = [
        f"policy.checkpoint={sft}", f"run.seed={seed}", f"run.name={name}", f"run.output_dir={output_dir}",
        *overrides,
    ]  # fmt: skip
    cfg = load_config(config, overrides)
    wall = raysys_cli("train", config, *overrides, "--no-progress", *resume_flag(cfg))
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if keys.VAL_DICE in r]
    test = list(dataset_for_split(cfg.data, "test", load=load_dataset))
    val = list(dataset_for_split(cfg.data, "val", load=load_dataset))
    best_meta = json.loads((cfg.run_dir / "checkpoints" / "best" / "meta.json").read_text())
    out = {
        "seed": seed,
        "train_wall_s": round(wall, 1),
        "iterations": cfg.learner.iterations,
        "best_iteration": best_meta["iteration"],
        "select_metric": cfg.eval.select_metric,
        "n_test": len(test),
    }
    models = {
        "sft": load_policy(cfg.policy, seed=seed),
        "rl": load_policy(cfg.policy, cfg.run_dir / "checkpoints" / "best", seed=seed),
        "rl_last": load_policy(cfg.policy, cfg.run_dir / "checkpoints" / "latest", seed=seed),
    }
    th, inference = cfg.eval.thresholds, inference_for(cfg)
    for label, pol in models.items():
        val_p, test_p = (
            predict_probs(lambda im, pr, p=pol: p.mask_logits(im, pr), v, inference) for v in (val, test)
        )
        best_t = best_threshold(val_p, val, th)
        out[f"{label}_test_at_0.5"] = scores(test_p, test, 0.5)
        out[f"{label}_best_val_threshold"] = best_t
        out[f"{label}_test_at_best_threshold"] = scores(test_p, test, best_t)
        out[f"{label}_val_at_best_threshold"] = scores(val_p, val, best_t)
    out["val_curve"] = [
        {k: r[k] for k in ("iteration", keys.VAL_DICE, keys.VAL_RECALL, keys.VAL_CLDICE) if k in r}
        for r in val_rows
    ]
    print(json.dumps({k: v for k, v in out.items() if k != "val_curve"}, indent=1), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="tiny SFT checkpoint folder (model.safetensors)")
    parser.add_argument("--config", default=str(ROOT / "examples/tiny_synthetic.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default=str(ROOT / "runs/rl_gain"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/rl_gain.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for raysys train")
    args = parser.parse_args()

    torch.set_num_threads(2)
    per_seed = [train_and_score(args.config, args.sft, seed, f"rl_gain_s{seed}", args.output_dir, args.overrides)
                for seed in args.seeds]  # fmt: skip
    test_n = per_seed[0]["n_test"]

    def gain(metric: str, rl_key: str, sft_key: str) -> list[float]:
        return [s[rl_key][metric] - s[sft_key][metric] for s in per_seed]

    result = {
        "benchmark": "rl_gain",
        "config": args.config,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "n_test": test_n,
    }
    for metric in ("recall", "cldice", "dice", "precision"):
        g = gain(metric, "rl_test_at_0.5", "sft_test_at_0.5")
        result[f"{metric}_gain"] = float(np.mean(g))
        result[f"{metric}_gain_std"] = float(np.std(g))
    for metric in ("dice", "cldice"):
        g = gain(metric, "rl_test_at_best_threshold", "sft_test_at_best_threshold")
        result[f"{metric}_gain_vs_best_threshold"] = float(np.mean(g))
        result[f"{metric}_gain_vs_best_threshold_std"] = float(np.std(g))
    result["train_wall_s_max"] = max(s["train_wall_s"] for s in per_seed)
    result["per_seed"] = per_seed
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_seed"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
