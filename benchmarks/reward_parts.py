"""A rollout shard scored by 1, 2, ... reward actors at once (``RayCoordinator`` splits each shard into
``ceil(reward.num_actors / rollout.num_workers)`` parts) -> JSON.

    .venv/bin/python benchmarks/reward_parts.py [--actors 1 2] [--repeats 5] [key=value ...]

One rollout actor samples the tiny config's 8 images x K masks per iteration; for each count of reward actors
the same iterations are collected (after one warm-up collection that fills the actors' GT caches) and timed:
``collect_s`` (sampling, then the parts scored in parallel) and ``reward_part_s`` (the slowest part's own
scoring time). Identical rewards across counts are checked, not assumed. Each reward actor scores on one
core, so the gain is bounded by the free cores (2 on this machine, where the rollout actor also runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import harness
import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(harness.ROOT / "examples/tiny_synthetic.yaml"))
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=str(harness.result_path("reward_parts")))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args()

    import ray

    from raysys.config_io import load_config
    from raysys.coordinator import RayCoordinator
    from raysys.reward import RewardWorker
    from raysys.rollout import RolloutWorker
    from raysys.train import iteration_indices

    cfg = load_config(args.config, ["rollout.num_workers=1", *args.overrides])
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        rollout = ray.remote(num_cpus=0.5)(RolloutWorker).remote(cfg, 0)
        state = RolloutWorker(cfg, 0).policy.trainable_state_dict()
        n_train = cfg.data.n_train
        iterations = list(range(1, args.repeats + 1))
        rows, rewards = {}, {}
        for n in args.actors:
            reward = [ray.remote(num_cpus=0.5)(RewardWorker).remote(cfg) for _ in range(n)]
            co = RayCoordinator([rollout], reward)
            co.push_weights(state, 1)
            for it in iterations:  # warm-up: GT targets of every image the timed iterations score
                co.collect(iteration_indices(cfg, it, n_train), iteration=it)
            collect_s, part_s, got = [], [], []
            for it in iterations:
                t0 = time.perf_counter()
                scored, _ = co.collect(iteration_indices(cfg, it, n_train), iteration=it)
                collect_s.append(time.perf_counter() - t0)
                part_s.append(max(s.seconds for s in scored))
                got.append(np.concatenate([s.rewards for s in scored]))
            rewards[n] = got
            rows[n] = {
                "reward_actors": n,
                "parts_per_shard": len(scored),
                "collect_s_median": float(np.median(collect_s)),
                "reward_part_s_median": float(np.median(part_s)),
            }
            for handle in reward:
                ray.kill(handle)
    finally:
        ray.shutdown()
    first = args.actors[0]
    same = all(
        np.array_equal(a, b, equal_nan=True)
        for n in args.actors
        for a, b in zip(rewards[n], rewards[first], strict=True)
    )
    out = {
        "config": harness.display_path(args.config),
        "overrides": args.overrides,
        "images_per_shard": cfg.rollout.images_per_iteration,
        "samples_per_image": cfg.rollout.samples_per_image,
        "image_size": cfg.data.size,
        "repeats": args.repeats,
        "identical_rewards": same,
        "runs": list(rows.values()),
        "collect_speedup": {
            str(n): rows[first]["collect_s_median"] / rows[n]["collect_s_median"] for n in args.actors
        },
        "reward_speedup": {
            str(n): rows[first]["reward_part_s_median"] / rows[n]["reward_part_s_median"] for n in args.actors
        },
    }
    harness.write_result("reward_parts", out, args.json)
    print(json.dumps(out, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
