"""`raysys prompt-rl` and `raysys postproc-rl`: RLlib PPO (new API stack) on the single-step environments.

Prompt selection: observation = an image embedding from the segmenter's frozen features, action = one
prompt of ``rllib.prompt_bank``, reward = the GT multi-objective reward or the learned reward net only.
Every (image, prompt) pair runs the segmenter once, on the driver, before RL starts; the environments get
the outcomes pre-filled. With the tiny policy the prompt must matter, so a prompt-conditioned tiny
segmenter is trained first: each prompt has its own SFT target (all vessels, dilated, major only, thin
only, centerlines, ...).

Post-processing: observation = image features + a histogram of the probability map, action = (threshold,
closing radius, minimum component size) per image, reward = the GT reward of the post-processed mask;
compared with the best global setting from a grid search on the same training images.

Both select on the validation split (early stopping on the validation reward) and report on the test
split, per seed, against fixed baselines; metrics go to metrics.jsonl / TensorBoard and a results JSON.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs.environments import PostProcessEnv, PromptSelectionEnv
from envs.rewards import MultiObjectiveReward, RewardResult
from envs.types import VesselSample
from raysys import keys
from raysys.config import Config, ConfigError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------------- data
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


def target_mask(mask: np.ndarray, kind: str) -> np.ndarray:
    """The SFT target for a prompt of ``kind`` (see raysys.config.PROMPT_TARGETS)."""
    from scipy import ndimage
    from skimage.morphology import disk, skeletonize

    m = np.array(mask, dtype=bool)  # a writable copy (dataset arrays are read-only)
    if kind == "vessels":
        return m
    if kind == "dilated":
        return ndimage.binary_dilation(m, disk(1))
    if kind == "wide":
        return ndimage.binary_dilation(m, disk(2))
    if kind == "core":
        return ndimage.binary_erosion(m, disk(1)) | skeletonize(m)  # 1-2 px vessels keep their centreline
    if kind == "thick":
        return ndimage.binary_opening(m, disk(1))
    if kind == "thin":
        return m & ~ndimage.binary_opening(m, disk(1))
    if kind == "centerline":
        return skeletonize(m)
    raise ValueError(f"unknown prompt target kind {kind!r}")


def train_prompt_segmenter(cfg: Config, splits: dict[str, list[VesselSample]], out: Path) -> Path:
    """SFT of a tiny segmenter on (image, prompt, prompt's target) triples; returns the model folder."""
    import torch

    from policies.sft import train_sft
    from policies.tiny import TinySa2VA

    rc = cfg.rllib
    train = [
        dataclasses.replace(s, mask=target_mask(s.mask, kind), prompts=(prompt,))
        for s in splits["train"]
        for prompt, kind in zip(rc.prompt_bank, rc.prompt_targets, strict=True)
    ]
    val = [dataclasses.replace(s, prompts=(rc.prompt_bank[0],)) for s in splits["val"]]
    torch.manual_seed(cfg.run.seed)
    sft = dataclasses.replace(cfg.sft, steps=rc.segmenter_steps, eval_every=max(1, rc.segmenter_steps // 4))
    res = train_sft(
        TinySa2VA(), train, val, sft, out_dir=out, seed=cfg.run.seed, threshold=cfg.eval.threshold
    )
    log.info(
        "prompt-conditioned segmenter: %d steps in %.0fs, val dice %.4f",
        res.steps,
        res.seconds,
        res.val["dice"],
    )
    return Path(res.checkpoint)


def _prompt_segmenter(cfg: Config, splits, seg_dir: Path) -> Path:
    """The prompt-conditioned segmenter in ``seg_dir``: reused when trained with the same settings."""
    import shutil

    from raysys.config import config_hash

    key = config_hash([cfg.rllib.prompt_bank, cfg.rllib.prompt_targets, cfg.rllib.segmenter_steps, cfg.data,
                       cfg.sft, cfg.run.seed])  # fmt: skip
    stamp = seg_dir / "settings.hash"
    if stamp.is_file() and stamp.read_text() == key and (seg_dir / "model").is_dir():
        log.info("reusing the prompt-conditioned segmenter in %s", seg_dir)
        return seg_dir / "model"
    shutil.rmtree(seg_dir, ignore_errors=True)
    model = train_prompt_segmenter(cfg, splits, seg_dir)
    stamp.write_text(key)  # written last: an interrupted training is redone
    return model


def _segmenter(cfg: Config, checkpoint: str | None):
    from policies.factory import build_policy

    pcfg = cfg.policy if checkpoint is None else dataclasses.replace(cfg.policy, checkpoint=str(checkpoint))
    policy = build_policy(pcfg, seed=cfg.run.seed)
    policy.model.eval()
    return policy


def _embedding(features: Any) -> np.ndarray:
    """Image embedding from frozen features: mean and std of the vision tokens, float32 [B, 2D]."""
    tokens = features.tokens if hasattr(features, "tokens") else features
    return np.concatenate([tokens.mean(1).numpy(), tokens.std(1).numpy()], axis=1).astype(np.float32)


@dataclass
class PromptTable:
    """Per split: embeddings [N, D]; GT reward, Dice and (optionally) learned reward [N, P]; outcomes."""

    embedding: np.ndarray
    gt: np.ndarray
    dice: np.ndarray
    learned: np.ndarray | None
    outcomes_gt: dict[tuple[int, int], RewardResult]
    outcomes_learned: dict[tuple[int, int], RewardResult] | None


def prompt_table(
    policy, samples, bank, reward: MultiObjectiveReward, scorer=None, batch: int = 8
) -> PromptTable:
    """Runs the segmenter once per (image, prompt) and scores every mask."""
    import torch

    n, p = len(samples), len(bank)
    emb, gt, dice = [], np.zeros((n, p)), np.zeros((n, p))
    learned = np.zeros((n, p)) if scorer is not None else None
    out_gt: dict[tuple[int, int], RewardResult] = {}
    for lo in range(0, n, batch):
        chunk = samples[lo : lo + batch]
        images = np.stack([s.image for s in chunk])
        with torch.no_grad():
            feats = policy.frozen_features(images)
            emb.append(_embedding(feats))
            masks = np.stack(
                [
                    (policy.mask_logits(images, [prompt] * len(chunk), features=feats) > 0).numpy()
                    for prompt in bank
                ],
                axis=1,
            )  # [b, P, H, W]; logit > 0 is probability > 0.5
        for j, s in enumerate(chunk):
            i = lo + j
            target = reward.prepare_target(s.mask, s.fov)
            for a in range(p):
                res = reward.score(masks[j, a] & s.fov, target)
                out_gt[(i, a)] = res
                gt[i, a], dice[i, a] = res.total, res.components["dice_raw"]
            if scorer is not None:
                learned[i] = scorer.score(s.image, masks[j], fov=s.fov).values
    out_learned = None
    if learned is not None:
        out_learned = {
            (i, a): RewardResult(float(learned[i, a]), {}, "learned") for i in range(n) for a in range(p)
        }
    return PromptTable(np.concatenate(emb), gt, dice, learned, out_gt, out_learned)


# ------------------------------------------------------------------------------------------- environments
class _Lookup:
    """Featurizer that returns precomputed observations by sample id (picklable for env runners)."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    def __call__(self, sample: VesselSample) -> np.ndarray:
        return self.table[sample.id]


class RLlibPromptEnv(PromptSelectionEnv):
    """PromptSelectionEnv built from an RLlib ``env_config`` (outcomes pre-filled; no segmenter calls)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(
            config["samples"],
            None,
            config["bank"],
            featurizer=_Lookup(config["features"]),
            outcomes=config["outcomes"],
        )


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


# ------------------------------------------------------------------------------------------- PPO
def _ppo(cfg: Config, env_cls, env_config: dict[str, Any], seed: int):
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


def _dist_inputs(module, obs: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = module.forward_inference({"obs": torch.as_tensor(obs, dtype=torch.float32)})
    return out["action_dist_inputs"].numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(np.clip(p, 1e-12, 1))).sum(axis=1).mean())


def _result_value(result: dict[str, Any], *path: str) -> float:
    node: Any = result
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return math.nan
        node = node[key]
    try:
        return float(node)
    except (TypeError, ValueError):
        return math.nan


def _train(cfg: Config, algo, evaluate_val, sink, extra_metrics) -> dict[str, Any]:
    """PPO iterations with early stopping on the validation reward; restores the best module state."""
    rc = cfg.rllib
    module = algo.get_module()
    best, best_it, best_state, since = -math.inf, -1, None, 0
    for it in range(rc.iterations):
        t0 = time.perf_counter()
        result = algo.train()
        row: dict[str, Any] = {
            "iteration": it,
            keys.EP_REW_MEAN: _result_value(result, "env_runners", "episode_return_mean"),
            keys.ENTROPY: _result_value(result, "learners", "default_policy", "entropy"),
            keys.LOSS_POLICY: _result_value(result, "learners", "default_policy", "policy_loss"),
            keys.LOSS_VALUE: _result_value(result, "learners", "default_policy", "vf_loss"),
        }
        row[keys.REWARD_MEAN] = row[keys.EP_REW_MEAN]
        row.update(extra_metrics(module))
        val = evaluate_val(module)
        row.update({f"val/{k}": v for k, v in val.items()})
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


def _sink(out: Path):
    from raysys.sink import MetricsSink

    return MetricsSink(str(out))


def _over_seeds(cfg: Config, seeds: list[int], run_one) -> list[dict[str, Any]]:
    """``run_one(seed)`` for each seed on the configured (or a private local) Ray."""
    from raysys.runtime import init_ray

    started = init_ray(cfg)
    try:
        return [run_one(seed) for seed in seeds]
    finally:
        if started:
            import ray

            ray.shutdown()


def _seed_result(out: Path, seed: int, info: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    result = {"seed": seed, **info, "test": test}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def _summarise(per_seed: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    return {k: _mean_std([r["test"][k] for r in per_seed]) for k in keys}


# ------------------------------------------------------------------------------------------- prompt-rl
def run_prompt_rl(cfg: Config, seeds: list[int], out: Path) -> dict[str, Any]:
    """Prompt-selection PPO for each seed; writes ``out/results.json``."""
    from scipy.stats import pearsonr, spearmanr

    rc = cfg.rllib
    t0 = time.perf_counter()
    splits = load_splits(cfg)
    checkpoint = cfg.policy.checkpoint
    if cfg.policy.kind == "tiny" and not checkpoint:
        checkpoint = str(_prompt_segmenter(cfg, splits, out / "segmenter"))
    policy = _segmenter(cfg, checkpoint)
    reward = MultiObjectiveReward(cfg.reward)
    scorer = None
    if rc.reward == "learned" or cfg.reward.reward_net:
        if not cfg.reward.reward_net:
            raise ConfigError(
                "rllib.reward=learned needs reward.reward_net (a checkpoint from raysys reward-net)"
            )
        from policies.reward_net import RewardNetScorer

        scorer = RewardNetScorer.from_checkpoint(cfg.reward.reward_net)
    t_tab = time.perf_counter()
    tables = {k: prompt_table(policy, v, rc.prompt_bank, reward, scorer) for k, v in splits.items()}
    table_s = time.perf_counter() - t_tab
    n_pairs = sum(len(v) for v in splits.values()) * len(rc.prompt_bank)
    train_reward = tables["train"].learned if rc.reward == "learned" else tables["train"].gt
    spread = float(np.ptp(train_reward.mean(0)))
    if spread < 1e-6:
        raise ConfigError(
            "every prompt of rllib.prompt_bank gives the same training reward with this segmenter, so there is "
            "nothing to learn; use a prompt-conditioned segmenter (leave policy.checkpoint unset for tiny)"
        )
    test = tables["test"]
    fixed_train = int(train_reward.mean(0).argmax())  # the best single prompt by the training reward
    fixed_gt = int(tables["train"].gt.mean(0).argmax())
    baselines = {
        "fixed_best_prompt": fixed_train,
        "fixed_best_prompt_gt": fixed_gt,
        "test_per_prompt_reward": test.gt.mean(0).tolist(),
        "test_per_prompt_dice": test.dice.mean(0).tolist(),
        "test": {
            "fixed_reward": float(test.gt[:, fixed_train].mean()),
            "fixed_dice": float(test.dice[:, fixed_train].mean()),
            "fixed_gt_reward": float(test.gt[:, fixed_gt].mean()),
            "fixed_gt_dice": float(test.dice[:, fixed_gt].mean()),
            "random_reward": float(test.gt.mean()),
            "random_dice": float(test.dice.mean()),
            "oracle_reward": float(test.gt.max(1).mean()),
            "oracle_dice": float(test.dice[np.arange(len(test.gt)), test.gt.argmax(1)].mean()),
        },
    }
    disagreement = None
    if test.learned is not None:
        disagreement = {
            "pearson": float(pearsonr(test.learned.ravel(), test.gt.ravel())[0]),
            "spearman": float(spearmanr(test.learned.ravel(), test.gt.ravel())[0]),
            "argmax_agreement": float((test.learned.argmax(1) == test.gt.argmax(1)).mean()),
            "gt_reward_of_learned_argmax": float(
                test.gt[np.arange(len(test.gt)), test.learned.argmax(1)].mean()
            ),
        }
    per_seed = _over_seeds(
        cfg, seeds, lambda seed: _prompt_seed(cfg, splits, tables, seed, out / f"seed_{seed}")
    )
    results = {
        "experiment": "prompt-rl",
        "reward": rc.reward,
        "segmenter": checkpoint,
        "prompt_bank": list(rc.prompt_bank),
        "n_images": {k: len(v) for k, v in splits.items()},
        "segmenter_runs": n_pairs,
        "table_seconds": table_s,
        "baselines": baselines,
        "learned_vs_gt_reward_on_test": disagreement,
        "seeds": per_seed,
        "summary": _summarise(per_seed, ["reward", "dice", "max_action_share"]),
        "seconds": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


def _prompt_seed(cfg: Config, splits, tables, seed: int, out: Path) -> dict[str, Any]:
    rc = cfg.rllib
    train_table = tables["train"]
    outcomes = train_table.outcomes_learned if rc.reward == "learned" else train_table.outcomes_gt
    env_config = {
        "samples": splits["train"],
        "bank": list(rc.prompt_bank),
        "features": {s.id: train_table.embedding[i] for i, s in enumerate(splits["train"])},
        "outcomes": outcomes,
    }
    algo = _ppo(cfg, RLlibPromptEnv, env_config, seed)
    sink = _sink(out)
    p = len(rc.prompt_bank)

    def greedy(module, split: str) -> np.ndarray:
        return _dist_inputs(module, tables[split].embedding).argmax(1)

    def evaluate_val(module) -> dict[str, float]:
        t = tables["val"]
        a = greedy(module, "val")
        idx = np.arange(len(a))
        val_reward = t.learned if rc.reward == "learned" else t.gt  # selection never sees GT when GT-free
        return {
            "reward": float(val_reward[idx, a].mean()),
            "gt_reward": float(t.gt[idx, a].mean()),
            "dice": float(t.dice[idx, a].mean()),
        }

    def extra(module) -> dict[str, float]:
        probs = _softmax(_dist_inputs(module, train_table.embedding))
        share = np.bincount(probs.argmax(1), minlength=p) / len(probs)
        row = {f"policy/action_{a}_share": float(share[a]) for a in range(p)}
        row.update({f"policy/action_{a}_prob": float(probs[:, a].mean()) for a in range(p)})
        row["policy/greedy_entropy"] = _entropy(probs)
        return row

    try:
        info = _train(cfg, algo, evaluate_val, sink, extra)
        module = algo.get_module()
        t = tables["test"]
        a = greedy(module, "test")
        idx = np.arange(len(a))
        share = np.bincount(a, minlength=p) / len(a)
        probs = _softmax(_dist_inputs(module, t.embedding))
        test = {
            "reward": float(t.gt[idx, a].mean()),
            "dice": float(t.dice[idx, a].mean()),
            "action_share": share.tolist(),
            "max_action_share": float(share.max()),
            "policy_entropy": _entropy(probs),
        }
        if t.learned is not None:
            test["learned_reward"] = float(t.learned[idx, a].mean())
    finally:
        sink.close()
        algo.stop()
    return _seed_result(out, seed, info, test)


# ------------------------------------------------------------------------------------------- postproc-rl
def _probability_maps(cfg: Config, splits) -> dict[str, dict[str, np.ndarray]]:
    from policies.evaluation import predict_probs
    from raysys.data import inference_for

    if cfg.policy.kind == "tiny" and not cfg.policy.checkpoint:
        raise ConfigError(
            "postproc-rl needs a trained segmenter: set policy.checkpoint (e.g. runs/tiny/sft/model from "
            "raysys sft); an untrained tiny policy's probability maps mean nothing"
        )
    policy = _segmenter(cfg, None)
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
    per_seed = _over_seeds(
        cfg,
        seeds,
        lambda seed: _postproc_seed(cfg, splits, probs, reward, targets, seed, out / f"seed_{seed}"),
    )
    results = {
        "experiment": "postproc-rl",
        "n_images": {k: len(v) for k, v in splits.items()},
        "baselines": baselines,
        "seeds": per_seed,
        "summary": _summarise(per_seed, ["reward", "dice"]),
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
    algo = _ppo(cfg, RLlibPostProcessEnv, env_config, seed)
    sink = _sink(out)
    # Observations exactly as the environment builds them, for the greedy (mean) action per image.
    envs = {
        split: RLlibPostProcessEnv({**env_config, "samples": v, "probs": probs[split]})
        for split, v in splits.items()
    }
    obs = {split: np.stack([e._observe(i) for i in range(len(e.samples))]) for split, e in envs.items()}
    space = envs["train"].action_space

    def actions(module, split: str) -> np.ndarray:
        inputs = _dist_inputs(module, obs[split])
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
            "policy/threshold_mean": float(acts[:, 0].mean()),
            "policy/threshold_std": float(acts[:, 0].std()),
            "policy/closing_radius_mean": float(acts[:, 1].mean()),
            "policy/min_size_mean": float(acts[:, 2].mean()),
        }

    try:
        info = _train(cfg, algo, evaluate_val, sink, extra)
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
    return _seed_result(out, seed, info, test)
