"""A behaviour digest of the learner: SHA-256 of the final trainable weights and of every metric after short
seeded in-process trainings on the tiny policy, so a refactor can show that the same seeds still give the
same weights and the same numbers (``benchmarks/results/refactor_equivalence.json``).

Each scenario builds a Learner and the rollout and reward workers in one process (no Ray), runs a few
iterations of sample -> score (the real GT or learned reward) -> ``Learner.update`` -> weight push, and digests
the trainable weights (plus the PPO value head) and the metrics (timings left out: they are the only numbers
that are not seeded). The scenarios cover the paths of the learner's batch: GRPO with tiles, self-critical
baselines (greedy masks) with multi-scale tiles and a shard scored in parts, multi-scale tiles with RLOO, PPO
(value head on minibatch rows), asynchronous rollouts (importance weights from the behaviour logits), DPO, a
down-weighted learned reward with validation and the reward-gap monitor, and greedy masks under a learned
reward.

    .venv/bin/python benchmarks/behaviour_digest.py                       # print the digests
    .venv/bin/python benchmarks/behaviour_digest.py --record benchmarks/results/refactor_equivalence.json \
        --label before                                                    # or --label after

About 25 s on one core. It does not import the harness: with ``PYTHONPATH=<another checkout>`` it digests
that checkout's code (the harness would put this one first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SMALL = [
    "data.size=64", "data.n_train=6", "data.n_val=2", "rollout.samples_per_image=4",
    "rollout.images_per_iteration=4", "learner.minibatch_size=2", "learner.epochs=2", "run.seed=11",
]  # fmt: skip
"""The tests' tiny setup (tests/rl_small.py), with two epochs so every step path runs more than once."""

SCENARIOS: dict[str, list[str]] = {
    "grpo_tiles": [],
    "self_critical_multiscale_parts": ["learner.advantage=self_critical", "reward.tile_sizes=[16,8,32]"],
    "rloo_multiscale": ["learner.advantage=rloo", "reward.tile_sizes=[16,8,32]", "learner.policy_loss=pg"],
    "ppo_value_head": ["learner.algorithm=ppo"],
    "async_staleness_1": ["rollout.max_staleness=1", "learner.is_cap=1.5"],
    "dpo": ["learner.algorithm=dpo"],
    "learned_weight_validate": ["reward.source=learned", "reward.learned_weight=0.5"],
    # Scores the greedy masks with the learned net. Before the fix recorded as "after_selfcritical_fix" every
    # step was non-finite (no tile is valid under a learned reward: the self-critical tile std was NaN).
    "learned_self_critical": ["learner.advantage=self_critical", "reward.source=learned"],
}
ITERATIONS = 3
N_TRAIN = 6


def _indices(iteration: int) -> list[int]:
    """4 of the 6 training images, another set each iteration (fixed here, not the driver's seeded choice)."""
    return sorted((iteration + j) % N_TRAIN for j in range(4))


def _hash_state(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _hash_metrics(rows: list[dict[str, float]]) -> str:
    # repr of a float round-trips exactly, so equal digests mean bit-equal metrics
    kept = [{k: repr(float(v)) for k, v in sorted(r.items()) if not k.startswith("time/")} for r in rows]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _validate(learner) -> dict[str, float]:
    # Learner.validate before issue 28's refactor, Learner.validator.run after it
    validator = getattr(learner, "validator", None)
    return validator.run() if validator is not None else learner.validate()


def run_scenario(name: str, overrides: list[str], reward_net: Path) -> dict[str, object]:
    from raysys.config_io import load_config
    from raysys.coordinator import LocalCoordinator
    from raysys.learner import Learner
    from raysys.reward import RewardWorker
    from raysys.rollout import RolloutWorker

    extra = (
        [f"reward.reward_net={reward_net}"] if "reward.source=learned" in overrides else []
    )  # + reward gap
    cfg = load_config(None, [*SMALL, *overrides, *extra])
    learner = Learner(cfg)
    rollout, reward = RolloutWorker(cfg, 0), RewardWorker(cfg)
    co = LocalCoordinator([rollout], [reward])
    co.push_weights(learner.behaviour_state_dict(), learner.version)
    rows: list[dict[str, float]] = []
    lag = cfg.rollout.max_staleness
    pending = {}
    for it in range(ITERATIONS):
        for j in range(
            it, min(it + lag, ITERATIONS - 1) + 1
        ):  # asynchronous: sampled ahead, as train.py does
            if j not in pending:
                if name.endswith("_parts"):  # one shard scored in two parts (more reward than rollout actors)
                    batch = rollout.sample(_indices(j), iteration=j)
                    pending[j] = [reward.score(batch, (p, 2)) for p in range(2)]
                else:
                    pending[j] = co.dispatch(_indices(j), iteration=j)[0]
        rows.append(learner.update(pending.pop(it), iteration=it))
        co.push_weights(learner.behaviour_state_dict(), learner.version)
    if name.endswith("_validate"):
        rows.append(_validate(learner))
    state = dict(learner.trainable_state_dict())
    if learner.value_head is not None:
        state.update({f"value_head.{k}": v for k, v in learner.value_head.state_dict().items()})
    return {"weights": _hash_state(state), "metrics": _hash_metrics(rows), "rows": len(rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", help="JSON file to record the digests in, under --label")
    parser.add_argument("--label", default="run", help="e.g. before / after")
    parser.add_argument("--only", nargs="*", help="scenario names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, and no thread-count-dependent reductions
    torch.use_deterministic_algorithms(True)

    import raysys
    from policies.reward_net import LightweightRewardNetwork

    code_root = Path(raysys.__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(code_root), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "-C", str(code_root), "status", "--porcelain", "--", "raysys", "policies", "envs"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    t0 = time.perf_counter()
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)  # a random but seeded reward net for the learned-reward scenario
        net = Path(tmp) / "reward_net.pth"
        torch.save({"model_state_dict": LightweightRewardNetwork().state_dict()}, net)
        for name, overrides in SCENARIOS.items():
            if args.only and name not in args.only:
                continue
            t = time.perf_counter()
            out[name] = run_scenario(name, overrides, net)
            print(f"{name:34s} weights {out[name]['weights'][:16]}  metrics {out[name]['metrics'][:16]}  "
                  f"{time.perf_counter() - t:5.1f}s", flush=True)  # fmt: skip
    total = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
    result = {
        "digest": total,
        "scenarios": out,
        "code": str(code_root),
        "commit": commit,
        "uncommitted_changes": dirty,
        "seconds": round(time.perf_counter() - t0, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    print(f"digest {total}")
    if args.record:
        path = Path(args.record)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[args.label] = result
        if "before" in data and "after" in data:
            data["equal"] = data["before"]["scenarios"] == data["after"]["scenarios"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
