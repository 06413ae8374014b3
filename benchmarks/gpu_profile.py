"""GPU profile of the tiny policy: rollout masks/s and learner update steps/s (in-process, no Ray) -> JSON.

    python benchmarks/gpu_profile.py [--size 256] [--iterations 5] [--json PATH]

Runs the same RolloutWorker / RewardWorker / Learner classes the Ray actors wrap, with the policy on CUDA
(rewards stay on the CPU). Falls back to the CPU when no GPU is present, and says so in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import harness
import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--json", default=str(harness.result_path("gpu_profile")))
    args = parser.parse_args()

    from raysys.config_io import load_config
    from raysys.learner import Learner
    from raysys.reward import RewardWorker
    from raysys.rollout import RolloutWorker
    from raysys.train import iteration_indices

    cuda = torch.cuda.is_available()
    cfg = load_config(
        None,
        [
            f"data.size={args.size}",
            "data.n_train=32",
            "data.n_val=8",
            f"rollout.samples_per_image={args.k}",
            f"rollout.images_per_iteration={args.images}",
            f"rollout.gpus_per_worker={1 if cuda else 0}",
            f"learner.use_gpu={str(cuda).lower()}",
        ],
    )
    device = "cuda" if cuda else "cpu"
    rollout, reward = RolloutWorker(cfg, 0), RewardWorker(cfg)
    learner = Learner(cfg, device=device)
    idx_all = [iteration_indices(cfg, it, 32) for it in range(args.iterations + 1)]
    rollout.sample(idx_all[0], iteration=0)  # warm-up: feature cache, kernels
    rows = []
    for it in range(1, args.iterations + 1):
        idx = idx_all[it]
        _sync()
        t0 = time.perf_counter()
        batch = rollout.sample(idx, iteration=it)
        _sync()
        t_roll = time.perf_counter() - t0
        t0 = time.perf_counter()
        scored = reward.score(batch)
        t_rew = time.perf_counter() - t0
        _sync()
        t0 = time.perf_counter()
        m = learner.update([scored], iteration=it)
        _sync()
        t_upd = time.perf_counter() - t0
        rollout.set_weights(learner.trainable_state_dict(), learner.version)
        steps = cfg.learner.epochs * -(-len(idx) // cfg.learner.minibatch_size)
        rows.append(
            {
                "rollout_s": t_roll,
                "reward_s": t_rew,
                "update_s": t_upd,
                "steps": steps,
                "loss": m.get("loss/total"),
            }
        )
    warm = rows[1:] if len(rows) > 1 else rows
    roll = sum(r["rollout_s"] for r in warm)
    upd = sum(r["update_s"] for r in warm)
    out = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA)",
        "torch": torch.__version__,
        "image_size": args.size,
        "images_per_iteration": args.images,
        "samples_per_image": args.k,
        "amp_bf16": bool(cuda and cfg.learner.amp),
        "rollout_masks_per_s": args.images * args.k * len(warm) / roll,
        "update_steps_per_s": sum(r["steps"] for r in warm) / upd,
        "reward_s_per_iteration_cpu": sum(r["reward_s"] for r in warm) / len(warm),
        "iterations": rows,
    }
    harness.write_result("gpu_profile", out, args.json)
    print(json.dumps({k: v for k, v in out.items() if k != "iterations"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
