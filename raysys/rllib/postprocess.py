"""`raysys postproc-rl`: RLlib PPO picks the post-processing of each probability map.

Observation = image features + a histogram of the probability map, action = (threshold, closing radius,
minimum component size) per image, reward = the GT reward of the post-processed mask; compared with the best
global setting from a grid search on the same training images. Selection on the validation split, results on
the test split, per seed.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from envs.environments import PostProcessEnv
from envs.rewards import MultiObjectiveReward
from raysys import keys
from raysys.config import Config, ConfigError
from raysys.rllib.common import (
    dist_inputs,
    load_splits,
    metrics_sink,
    over_seeds,
    ppo_algorithm,
    seed_result,
    segmenter,
    summarise,
    train_with_early_stopping,
)

log = logging.getLogger(__name__)


class RLlibPostProcessEnv(PostProcessEnv):
    """PostProcessEnv built from an RLlib ``env_config`` (probability maps precomputed)."""

    def __init__(self, config: dict[str, Any]) -> None:
        probs = config["probs"]
        super().__init__(
            config["samples"],
            lambda s: probs[s.id],
            reward=MultiObjectiveReward(config["reward"]),
            max_closing_radius=config["max_radius"],
            max_min_size=config["max_min_size"],
        )


def _probability_maps(cfg: Config, splits) -> dict[str, dict[str, np.ndarray]]:
    from policies.evaluation import predict_probs
    from raysys.data import inference_for

    if cfg.policy.kind == "tiny" and not cfg.policy.checkpoint:
        raise ConfigError(
            "postproc-rl needs a trained segmenter: set policy.checkpoint (e.g. runs/tiny/sft/model from "
            "raysys sft); an untrained tiny policy's probability maps mean nothing"
        )
    policy = segmenter(cfg, None)
    return {
        split: dict(
            zip(
                [s.id for s in v],
                predict_probs(lambda im, pr: policy.mask_logits(im, pr), v, inference_for(cfg)),
                strict=True,
            )
        )
        for split, v in splits.items()
    }


def _score_setting(samples, probs, reward: MultiObjectiveReward, targets, setting) -> tuple[float, float]:
    from envs.postprocess import postprocess

    th, radius, min_size = setting
    totals, dices = [], []
    for s, target in zip(samples, targets, strict=True):
        mask = postprocess(probs[s.id], threshold=th, closing_radius=radius, min_size=min_size, fov=s.fov)
        res = reward.score(mask & s.fov, target)
        totals.append(res.total)
        dices.append(res.components["dice_raw"])
    return float(np.mean(totals)), float(np.mean(dices))


def run_postproc_rl(cfg: Config, seeds: list[int], out: Path) -> dict[str, Any]:
    """Per-image post-processing PPO for each seed vs the best global grid setting; ``out/results.json``."""
    rc = cfg.rllib
    t0 = time.perf_counter()
    splits = load_splits(cfg)
    probs = _probability_maps(cfg, splits)
    reward = MultiObjectiveReward(cfg.reward)
    targets = {k: [reward.prepare_target(s.mask, s.fov) for s in v] for k, v in splits.items()}
    t_grid = time.perf_counter()
    grid = list(itertools.product(rc.grid_thresholds, rc.grid_closing, rc.grid_min_size))
    scores = [_score_setting(splits["train"], probs["train"], reward, targets["train"], g)[0] for g in grid]
    best_setting = grid[int(np.argmax(scores))]
    grid_s = time.perf_counter() - t_grid
    test_args = (splits["test"], probs["test"], reward, targets["test"])
    fixed_reward, fixed_dice = _score_setting(*test_args, best_setting)
    default_reward, default_dice = _score_setting(*test_args, (cfg.eval.threshold, 0, 0))
    baselines = {
        "grid_size": len(grid),
        "grid_seconds": grid_s,
        "best_global_setting": {
            "threshold": best_setting[0],
            "closing_radius": best_setting[1],
            "min_size": best_setting[2],
        },
        "test": {
            "global_reward": fixed_reward,
            "global_dice": fixed_dice,
            "default_reward": default_reward,
            "default_dice": default_dice,
        },
    }
    per_seed = over_seeds(
        cfg,
        seeds,
        lambda seed: _postproc_seed(cfg, splits, probs, reward, targets, seed, out / f"seed_{seed}"),
    )
    results = {
        "experiment": "postproc-rl",
        "n_images": {k: len(v) for k, v in splits.items()},
        "baselines": baselines,
        "seeds": per_seed,
        "summary": summarise(per_seed, ["reward", "dice"]),
        "seconds": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


def _postproc_seed(cfg: Config, splits, probs, reward, targets, seed: int, out: Path) -> dict[str, Any]:
    from ray.rllib.utils.spaces.space_utils import unsquash_action

    rc = cfg.rllib
    max_radius, max_min_size = max(rc.grid_closing), max(rc.grid_min_size)
    env_config = {
        "samples": splits["train"],
        "probs": probs["train"],
        "reward": cfg.reward,
        "max_radius": max_radius,
        "max_min_size": max_min_size,
    }
    algo = ppo_algorithm(cfg, RLlibPostProcessEnv, env_config, seed)
    sink = metrics_sink(out)
    # Observations exactly as the environment builds them, for the greedy (mean) action per image.
    envs = {
        split: RLlibPostProcessEnv({**env_config, "samples": v, "probs": probs[split]})
        for split, v in splits.items()
    }
    obs = {split: np.stack([e.observe(i) for i in range(len(e.samples))]) for split, e in envs.items()}
    space = envs["train"].action_space

    def actions(module, split: str) -> np.ndarray:
        inputs = dist_inputs(module, obs[split])
        mean = inputs[:, : space.shape[0]]  # diagonal Gaussian: means, then log-stds
        return np.stack([np.clip(unsquash_action(m, space), space.low, space.high) for m in mean])

    def score(module, split: str) -> tuple[float, float, np.ndarray]:
        acts = actions(module, split)
        totals, dices = [], []
        for i, (s, target) in enumerate(zip(splits[split], targets[split], strict=True)):
            setting = (float(acts[i, 0]), round(float(acts[i, 1])), round(float(acts[i, 2])))
            t, d = _score_setting([s], probs[split], reward, [target], setting)
            totals.append(t)
            dices.append(d)
        return float(np.mean(totals)), float(np.mean(dices)), acts

    def evaluate_val(module) -> dict[str, float]:
        r, d, _ = score(module, "val")
        return {"reward": r, "dice": d}

    def extra(module) -> dict[str, float]:
        acts = actions(module, "train")
        return {
            keys.POSTPROCESS_THRESHOLD_MEAN: float(acts[:, 0].mean()),
            keys.POSTPROCESS_THRESHOLD_STD: float(acts[:, 0].std()),
            keys.POSTPROCESS_CLOSING_RADIUS_MEAN: float(acts[:, 1].mean()),
            keys.POSTPROCESS_MIN_SIZE_MEAN: float(acts[:, 2].mean()),
        }

    try:
        info = train_with_early_stopping(cfg, algo, evaluate_val, sink, extra)
        r, d, acts = score(algo.get_module(), "test")
        test = {
            "reward": r,
            "dice": d,
            "threshold_mean": float(acts[:, 0].mean()),
            "threshold_std": float(acts[:, 0].std()),
            "closing_radius_mean": float(acts[:, 1].mean()),
            "min_size_mean": float(acts[:, 2].mean()),
        }
    finally:
        sink.close()
        algo.stop()
    return seed_result(out, seed, info, test)
