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
import sys

import harness
import numpy as np
import torch
from rl_common import train_and_score


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="tiny SFT checkpoint folder (model.safetensors)")
    parser.add_argument("--config", default=str(harness.ROOT / "examples/tiny_synthetic.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default=str(harness.RUNS / "rl_gain"))
    parser.add_argument("--json", default=str(harness.result_path("rl_gain")))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for raysys train")
    args = parser.parse_args()

    torch.set_num_threads(2)
    per_seed = [train_and_score(args.config, args.sft, seed, f"rl_gain_s{seed}", args.output_dir, args.overrides)
                for seed in args.seeds]  # fmt: skip
    test_n = per_seed[0]["n_test"]

    def gain(metric: str, rl_key: str, sft_key: str) -> list[float]:
        return [s[rl_key][metric] - s[sft_key][metric] for s in per_seed]

    result = {
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
    harness.write_result("rl_gain", result, args.json)
    print(json.dumps({k: v for k, v in result.items() if k != "per_seed"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
