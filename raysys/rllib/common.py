"""What the RLlib experiments share: the data splits, the segmenter they query, the PPO algorithm (new API
stack), training with early stopping on the validation reward, metrics sinks and per-seed summaries."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from envs.types import VesselSample
from raysys import keys
from raysys.config import Config, ConfigError

log = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")


def load_splits(cfg: Config) -> dict[str, list[VesselSample]]:
    from envs.datasets import load_dataset
    from raysys.data import dataset_for_split

    out = {split: list(dataset_for_split(cfg.data, split, load=load_dataset)) for split in SPLITS}
    for split, samples in out.items():
        if not samples:
            raise ConfigError(f"split '{split}' of data kind '{cfg.data.kind}' has no images")
        if not all(s.has_mask for s in samples):
            raise ConfigError(f"split '{split}' has unlabelled images; evaluation needs ground truth")
    return out


def segmenter(cfg: Config, checkpoint: str | None):
    from policies.factory import build_policy

    pcfg = cfg.policy if checkpoint is None else dataclasses.replace(cfg.policy, checkpoint=str(checkpoint))
    policy = build_policy(pcfg, seed=cfg.run.seed)
    policy.model.eval()
    return policy


def embedding(features: Any) -> np.ndarray:
    """Image embedding from frozen features: mean and std of the vision tokens, float32 [B, 2D]."""
    tokens = features.tokens if hasattr(features, "tokens") else features
    return np.concatenate([tokens.mean(1).numpy(), tokens.std(1).numpy()], axis=1).astype(np.float32)


def ppo_algorithm(cfg: Config, env_cls, env_config: dict[str, Any], seed: int):
    from ray.rllib.algorithms.ppo import PPOConfig

    rc = cfg.rllib
    return (
        PPOConfig()
        .environment(env=env_cls, env_config=env_config)
        .framework("torch")
        .env_runners(num_env_runners=rc.num_env_runners, num_envs_per_env_runner=1)
        .learners(num_learners=0)
        .training(
            lr=rc.lr,
            train_batch_size_per_learner=rc.train_batch_size,
            minibatch_size=rc.minibatch_size,
            num_epochs=rc.num_epochs,
            entropy_coeff=rc.entropy_coeff,
            gamma=0.99,
            lambda_=1.0,
            use_kl_loss=False,
        )
        .rl_module(model_config={"fcnet_hiddens": [64, 64], "vf_share_layers": False})
        .debugging(seed=seed, log_level="WARN")
        .build_algo()
    )


def dist_inputs(module, obs: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = module.forward_inference({"obs": torch.as_tensor(obs, dtype=torch.float32)})
    return out["action_dist_inputs"].numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(np.clip(p, 1e-12, 1))).sum(axis=1).mean())


def result_value(result: dict[str, Any], *path: str) -> float:
    node: Any = result
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return math.nan
        node = node[key]
    try:
        return float(node)
    except (TypeError, ValueError):
        return math.nan


def train_with_early_stopping(cfg: Config, algo, evaluate_val, sink, extra_metrics) -> dict[str, Any]:
    """PPO iterations with early stopping on the validation reward; restores the best module state."""
    rc = cfg.rllib
    module = algo.get_module()
    best, best_it, best_state, since = -math.inf, -1, None, 0
    for it in range(rc.iterations):
        t0 = time.perf_counter()
        result = algo.train()
        row: dict[str, Any] = {
            "iteration": it,
            keys.EP_REW_MEAN: result_value(result, "env_runners", "episode_return_mean"),
            keys.ENTROPY: result_value(result, "learners", "default_policy", "entropy"),
            keys.LOSS_POLICY: result_value(result, "learners", "default_policy", "policy_loss"),
            keys.LOSS_VALUE: result_value(result, "learners", "default_policy", "vf_loss"),
        }
        row[keys.REWARD_MEAN] = row[keys.EP_REW_MEAN]
        row.update(extra_metrics(module))
        val = evaluate_val(module)
        row.update({keys.val(k): v for k, v in val.items()})
        row[keys.TIME_ITERATION] = time.perf_counter() - t0
        sink.log(row)
        if val["reward"] > best + 1e-9:
            best, best_it, since = val["reward"], it, 0
            best_state = module.get_state()
        else:
            since += 1
        log.info(
            "iteration %d: train return %.4f, val reward %.4f (best %.4f @ %d)",
            it,
            row[keys.EP_REW_MEAN],
            val["reward"],
            best,
            best_it,
        )
        if rc.patience and since >= rc.patience:
            log.info("early stop: no better validation reward for %d iterations", since)
            break
    if best_state is not None:
        module.set_state(best_state)
    return {"iterations_run": it + 1, "best_iteration": best_it, "best_val_reward": best}


def metrics_sink(out: Path):
    from raysys.sink import MetricsSink

    return MetricsSink(str(out))


def over_seeds(cfg: Config, seeds: list[int], run_one) -> list[dict[str, Any]]:
    """``run_one(seed)`` for each seed on the configured (or a private local) Ray."""
    from raysys.runtime import init_ray

    started = init_ray(cfg)
    try:
        return [run_one(seed) for seed in seeds]
    finally:
        if started:
            import ray

            ray.shutdown()


def seed_result(out: Path, seed: int, info: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    result = {"seed": seed, **info, "test": test}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def summarise(per_seed: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    return {k: mean_std([r["test"][k] for r in per_seed]) for k in names}
