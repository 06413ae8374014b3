"""Validation during RL: the policy's greedy masks on the validation split, a threshold sweep, the reward-gap
monitor (a learned reward against GT Dice), and the best-so-far selection by ``eval.select_metric``.

The learner owns one :class:`Validator` (its best value is learner state, saved with the checkpoints); the
driver calls it on rank 0 every ``eval.every`` iterations (``raysys.train``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from envs.datasets import load_dataset
from policies.evaluation import evaluate_probs, predict_probs
from raysys import keys
from raysys.config import Config
from raysys.data import dataset_for_split, inference_for
from raysys.features import FeatureCache


class Validator:
    """Full-image validation of ``policy`` (an AdapterPolicy the learner trains) on ``device``."""

    def __init__(self, cfg: Config, policy, *, device: torch.device) -> None:
        self.cfg, self.policy, self.device = cfg, policy, device
        self.best: float | None = None  # best eval.select_metric so far
        self._val: tuple[Sequence, FeatureCache] | None = None  # loaded on first use
        self._scorer = None  # learned reward net for the reward gap, loaded on first use

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        """Greedy masks on the validation split: metrics at eval.threshold plus a threshold sweep (and the
        reward gap with a learned reward)."""
        if self._val is None:
            val = dataset_for_split(self.cfg.data, "val", load=load_dataset)
            # Windows are fixed, so their features serve every validation, up to 1 GiB (FIVES-sized
            # validation sets recompute the rest).
            self._val = (val, FeatureCache(self.policy, max_bytes=1 << 30))
        val, cache = self._val

        def logits(images: np.ndarray, prompts: list[str], cache_keys: list) -> torch.Tensor:
            feats = cache.get(cache_keys, images).to(self.device)
            return self.policy.mask_logits(images, prompts, features=feats)

        probs = predict_probs(logits, val, inference_for(self.cfg), keyed=True)
        res = evaluate_probs(
            probs, val, threshold=self.cfg.eval.threshold, thresholds=self.cfg.eval.thresholds
        )
        out = {keys.val(k): v for k, v in res.mean.items()}
        out[keys.VAL_BEST_THRESHOLD] = res.best_threshold
        out[keys.VAL_BEST_THRESHOLD_DICE] = float(max(res.sweep["dice"]))
        # clDice at the best threshold too, so a sweep can select on Dice + clDice as deployed (tune.metric
        # "val/best_threshold_dice + val/best_threshold_cldice").
        at_best = (
            res
            if res.best_threshold == res.threshold
            else evaluate_probs(probs, val, threshold=res.best_threshold)
        )
        out[keys.VAL_BEST_THRESHOLD_CLDICE] = at_best.mean["cldice"]
        for t, d in zip(res.sweep["thresholds"], res.sweep["dice"], strict=True):
            out[keys.val_dice_at(t)] = float(d)
        if self.cfg.reward.reward_net:
            out.update(self._reward_gap(val, [p >= self.cfg.eval.threshold for p in probs], res))
        return out

    def improved(self, val_metrics: dict[str, float]) -> bool:
        """True (and remembered) when the selection metric beats every earlier validation."""
        ec = self.cfg.eval
        if ec.select_metric not in val_metrics:
            raise KeyError(f"eval.select_metric {ec.select_metric!r} is not among {sorted(val_metrics)}")
        value = val_metrics[ec.select_metric]
        better = self.best is None or (value > self.best if ec.select_mode == "max" else value < self.best)
        if better:
            self.best = value
        return better

    def _reward_gap(self, val: Sequence, masks: Sequence[np.ndarray], res) -> dict[str, float]:
        """Learned reward vs GT Dice of the greedy validation masks: reward hacking shows up here first."""
        from policies.reward_net import RewardNetScorer

        if self._scorer is None:
            self._scorer = RewardNetScorer.from_checkpoint(self.cfg.reward.reward_net)
        labelled = [i for i, s in enumerate(val) if s.has_mask]  # the rows of res.per_image
        learned = np.array(
            [self._scorer.score(val[i].image, masks[i][None], fov=val[i].fov).values[0] for i in labelled]
        )
        gt = np.array([row["dice"] for row in res.per_image])
        return {
            keys.VAL_LEARNED_SCORE: float(learned.mean()),
            keys.VAL_REWARD_GAP: float((learned - gt).mean()),
            keys.VAL_REWARD_GAP_ABS: float(np.abs(learned - gt).mean()),
        }
