"""`raysys prompt-rl`: RLlib PPO picks a prompt per image.

Observation = an image embedding from the segmenter's frozen features, action = one prompt of
``rllib.prompt_bank``, reward = the GT multi-objective reward or the learned reward net only. Every
(image, prompt) pair runs the segmenter once, on the driver, before RL starts; the environments get the
outcomes pre-filled. With the tiny policy the prompt must matter, so a prompt-conditioned tiny segmenter is
trained first: each prompt has its own SFT target (envs/morphology.py: all vessels, dilated, major only, thin
only, centerlines, ...). Selection on the validation split, results on the test split, per seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs.environments import PromptSelectionEnv
from envs.morphology import target_mask
from envs.rewards import MultiObjectiveReward, RewardResult
from envs.types import VesselSample
from raysys import keys
from raysys.config import Config, ConfigError
from raysys.rllib.common import (
    dist_inputs,
    embedding,
    entropy,
    load_splits,
    metrics_sink,
    over_seeds,
    ppo_algorithm,
    seed_result,
    segmenter,
    softmax,
    summarise,
    train_with_early_stopping,
)

log = logging.getLogger(__name__)


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

    from raysys.config_io import config_hash

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
            emb.append(embedding(feats))
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


def run_prompt_rl(cfg: Config, seeds: list[int], out: Path) -> dict[str, Any]:
    """Prompt-selection PPO for each seed; writes ``out/results.json``."""
    from scipy.stats import pearsonr, spearmanr

    rc = cfg.rllib
    t0 = time.perf_counter()
    splits = load_splits(cfg)
    checkpoint = cfg.policy.checkpoint
    if cfg.policy.kind == "tiny" and not checkpoint:
        checkpoint = str(_prompt_segmenter(cfg, splits, out / "segmenter"))
    policy = segmenter(cfg, checkpoint)
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
    per_seed = over_seeds(
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
        "summary": summarise(per_seed, ["reward", "dice", "max_action_share"]),
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
    algo = ppo_algorithm(cfg, RLlibPromptEnv, env_config, seed)
    sink = metrics_sink(out)
    p = len(rc.prompt_bank)

    def greedy(module, split: str) -> np.ndarray:
        return dist_inputs(module, tables[split].embedding).argmax(1)

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
        probs = softmax(dist_inputs(module, train_table.embedding))
        share = np.bincount(probs.argmax(1), minlength=p) / len(probs)
        row = {keys.prompt_action_share(a): float(share[a]) for a in range(p)}
        row.update({keys.prompt_action_prob(a): float(probs[:, a].mean()) for a in range(p)})
        row[keys.PROMPT_GREEDY_ENTROPY] = entropy(probs)
        return row

    try:
        info = train_with_early_stopping(cfg, algo, evaluate_val, sink, extra)
        module = algo.get_module()
        t = tables["test"]
        a = greedy(module, "test")
        idx = np.arange(len(a))
        share = np.bincount(a, minlength=p) / len(a)
        probs = softmax(dist_inputs(module, t.embedding))
        test = {
            "reward": float(t.gt[idx, a].mean()),
            "dice": float(t.dice[idx, a].mean()),
            "action_share": share.tolist(),
            "max_action_share": float(share.max()),
            "policy_entropy": entropy(probs),
        }
        if t.learned is not None:
            test["learned_reward"] = float(t.learned[idx, a].mean())
    finally:
        sink.close()
        algo.stop()
    return seed_result(out, seed, info, test)
