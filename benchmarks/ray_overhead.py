"""Ray system overhead: the same iterations through Ray (actors + Ray Train) and in one process -> JSON.

    .venv/bin/python benchmarks/ray_overhead.py --sft runs/sft_baseline_bench/sft/model [--iterations 12]

Both paths run the same RolloutWorker / RewardWorker / Learner code on the same config and seed; validation
is off in both. Reported: mean iteration time of each path excluding start-up and the first (warm-up)
iteration, their ratio, the Ray path's share of time in rollout / reward / update / weight sync, and the
bytes of one weight sync against the full model size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

import harness
import numpy as np

from raysys import keys
from raysys.testing.rl_small import metric_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default=str(harness.RUNS / "sft_baseline_bench/sft/model"))
    parser.add_argument("--config", default=str(harness.ROOT / "examples/tiny_synthetic.yaml"))
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--json", default=str(harness.result_path("ray_overhead")))
    args = parser.parse_args()

    from raysys.config_io import load_config
    from raysys.coordinator import LocalCoordinator
    from raysys.learner import Learner
    from raysys.reward import RewardWorker
    from raysys.rollout import RolloutWorker
    from raysys.train import iteration_indices, run_training

    out_dir = harness.RUNS / "ray_overhead"
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = [
        f"policy.checkpoint={args.sft}",
        f"learner.iterations={args.iterations}",
        "eval.every=100000",
        f"learner.checkpoint_every={args.iterations}",
        f"run.output_dir={out_dir}",
        "run.name=ray",
    ]
    cfg = load_config(args.config, overrides)

    # 1. Through Ray: start-up is everything before the first iteration.
    t0 = time.perf_counter()
    res = run_training(cfg, progress=False)
    ray_total = time.perf_counter() - t0
    rows = metric_rows(res.run_dir / "metrics.jsonl")
    steady = rows[1:]
    ray_iter = float(np.mean([r[keys.TIME_ITERATION] for r in steady]))
    shares = {}
    for key in (keys.TIME_ROLLOUT, keys.TIME_UPDATE, keys.TIME_SYNC):
        shares[key.split("/")[1].removesuffix("_s")] = float(np.mean([r[key] for r in steady])) / ray_iter
    # Reward scoring overlaps sampling across actors; report its actor time relative to the iteration too.
    shares["reward_actor_time"] = float(np.mean([r[keys.TIME_REWARD] for r in steady])) / ray_iter
    shares["sample_actor_time"] = float(np.mean([r[keys.TIME_SAMPLE] for r in steady])) / ray_iter

    # 2. One process, same classes, same iterations.

    local_cfg = cfg
    rollout = [RolloutWorker(local_cfg, i) for i in range(local_cfg.rollout.num_workers)]
    reward = [RewardWorker(local_cfg) for _ in range(local_cfg.reward.num_actors)]
    learner = Learner(local_cfg)
    co = LocalCoordinator(rollout, reward)
    local_times = []
    n_train = len(learner.train)
    for it in range(args.iterations):
        t = time.perf_counter()
        scored, _ = co.collect(iteration_indices(local_cfg, it, n_train), iteration=it)
        learner.update(scored, iteration=it)
        co.push_weights(learner.trainable_state_dict(), learner.version)
        local_times.append(time.perf_counter() - t)
    local_iter = float(np.mean(local_times[1:]))
    out = {
        "iterations": args.iterations,
        "ray_total_s": round(ray_total, 2),
        "ray_startup_s": round(ray_total - sum(r[keys.TIME_ITERATION] for r in rows), 2),
        "ray_iteration_s": ray_iter,
        "local_iteration_s": local_iter,
        "ratio_ray_over_local": ray_iter / local_iter,
        "ray_time_shares": shares,
        "sync_bytes": rows[-1][keys.SYNC_BYTES],
        "model_bytes": learner.policy.model_bytes(),
        "sync_fraction_of_model": rows[-1][keys.SYNC_BYTES] / learner.policy.model_bytes(),
        "rollout_workers": cfg.rollout.num_workers,
        "reward_actors": cfg.reward.num_actors,
        "learner_workers": cfg.learner.num_workers,
    }
    harness.write_result("ray_overhead", out, args.json)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
