"""The learner: advantages and PPO/GRPO/RCE updates of the trainable (LoRA + head) weights.

``Learner`` is plain torch so the same update runs in a Ray Train worker (``raysys.train``) and in one
process (``benchmarks/ray_overhead.py``). :meth:`Learner.update` is the whole optimisation step, as named
steps (docs/design.md, "The RL problem"):

    batch            valid, on-policy images (stale versions and NaN rewards are dropped and counted)
    rollout_logprobs the rollout policy's pixel log-probabilities and the reference logits, no grad
    advantages       whole-image and per-tile baselines, mixed per pixel
    minibatch_steps  E epochs of: policy loss + beta * KL(pi || pi_ref) - c * entropy (+ value loss)
    drift            KL(pi_old || pi_new) over the batch after the update

The maths lives in policies/losses.py and policies/distributions.py; this file orders it and logs it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from envs.datasets import load_dataset
from policies.distributions import kl_bernoulli, pixel_log_probs
from policies.evaluation import evaluate_probs, predict_probs
from policies.factory import build_policy
from policies.losses import (
    baseline_advantages,
    dpo_loss,
    entropy_bonus,
    get_advantage_fn,
    get_policy_loss,
    kl_penalty,
    masked_mean,
    mixed_advantages,
    rce_loss,
    rce_weights,
    tile_advantages,
    value_loss,
)
from raysys import keys
from raysys.batches import ScoredRollout
from raysys.config import Config
from raysys.data import dataset_for_split, inference_for, train_view
from raysys.features import FeatureCache, feature_cache

log = logging.getLogger(__name__)

HEADS = ("text_hidden_fcs", "mask_decoder")


def iteration_indices(cfg: Config, iteration: int, n_train: int) -> list[int]:
    """The training images of ``iteration`` (seeded, so resumed runs see the same images)."""
    rng = np.random.default_rng([cfg.run.seed, iteration])
    n = min(cfg.rollout.images_per_iteration, n_train)
    return sorted(rng.choice(n_train, size=n, replace=False).tolist())


class ValueHead(nn.Module):
    """PPO baseline from frozen low-resolution features: a value per image and per reward tile."""

    def __init__(self, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, 2, 1)
        )

    def forward(self, low: torch.Tensor, tiles: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """low [B,C,h,w] -> (image values [B], tile values [B,ty,tx])."""
        out = self.body(low)
        return out[:, 0].mean((1, 2)), nn.functional.adaptive_avg_pool2d(out[:, 1:], tiles)[:, 0]


@dataclass
class _Batch:
    indices: list[int]
    keys: list  # feature-cache keys (image, or image + crop box)
    samples: list  # VesselSample per row: the image or crop the masks were sampled on
    masks: torch.Tensor  # bool [B,K,H,W]
    rewards: torch.Tensor  # [B,K]
    tile_rewards: torch.Tensor  # [B,K,ty,tx]
    tile_valid: torch.Tensor  # bool [B,ty,tx]
    fov: torch.Tensor  # bool [B,H,W]
    weight: torch.Tensor  # [B] loss weight per image (reward.learned_weight for learned rewards)
    baseline: torch.Tensor | None = None  # [B] greedy-mask rewards (self-critical)
    tile_baseline: torch.Tensor | None = None  # [B,ty,tx] their per-tile rewards
    # more tile sizes: size -> (tile rewards [B,K,ty,tx], valid [B,ty,tx], greedy tile rewards [B,ty,tx] | None)
    scales: dict = field(default_factory=dict)
    lag: torch.Tensor | None = None  # [B] learner version - sampling version (rollout.max_staleness >= 1)
    behaviour_logits: torch.Tensor | None = None  # [B,H,W] the sampling policy's logits (idem)


class Learner:
    def __init__(
        self, cfg: Config, *, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1
    ):
        if cfg.learner.torch_threads > 0:
            torch.set_num_threads(cfg.learner.torch_threads)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.policy = build_policy(cfg.policy, seed=cfg.run.seed, device=self.device)
        self.module = self.policy.model  # what the minibatch steps call: DDP- or DeepSpeed-wrapped if set up
        self.train = train_view(cfg, dataset_for_split(cfg.data, "train", load=load_dataset))
        self.features = feature_cache(self.policy, self.train, cfg.rollout.images_per_iteration)
        self._val: tuple[Sequence, FeatureCache] | None = None
        self._scorer = None  # learned reward net for the validation reward gap, loaded on first use
        self.value_head = None
        params = list(self.policy.trainable_parameters())
        if cfg.learner.algorithm == "ppo":
            key, first = self.train.get(0, 0)
            low = self.features.get([key], [first.image]).low  # sized from the frozen features
            self.value_head = ValueHead(low.shape[1]).to(self.device)
            params += list(self.value_head.parameters())
        self.optimizer = torch.optim.Adam(params, lr=cfg.learner.lr)
        # dpo learns offline: the rollout actors keep sampling from the weights it starts from
        self._behaviour = None
        if cfg.learner.algorithm == "dpo":
            self._behaviour = {k: v.detach().clone() for k, v in self.trainable_state_dict().items()}
        self.engine = None  # a DeepSpeed engine after use_deepspeed()
        self.version = 0
        self.best_reward = -math.inf
        self.best_val: float | None = None  # best eval.select_metric so far

    # ------------------------------------------------------------------------------------------ phases
    def phase(self, iteration: int) -> str:
        lc = self.cfg.learner
        if lc.algorithm == "rce_grpo":
            return "rce" if iteration < lc.rce_epochs else "grpo"
        return lc.algorithm

    def _enter_phase(self, phase: str) -> None:
        lc = self.cfg.learner
        lr = lc.grpo_lr if (lc.algorithm == "rce_grpo" and phase == "grpo" and lc.grpo_lr) else lc.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if lc.algorithm == "rce_grpo" and phase == "grpo" and lc.heads_only_after_rce:
            self.policy.set_trainable_parts([p for p in HEADS if p in self.policy.spec.trainable])

    # ------------------------------------------------------------------------------------------ batch
    def _assemble(self, scored: Sequence[ScoredRollout]) -> tuple[_Batch | None, dict[str, float]]:
        """Valid rows at most ``rollout.max_staleness`` versions old; counts of what was dropped and why."""
        rows, stale, invalid, skipped_learned = [], 0, 0, 0
        rc = self.cfg.reward
        max_lag = self.cfg.rollout.max_staleness
        for s in scored:
            lag = self.version - s.batch.version
            if not 0 <= lag <= max_lag:
                stale += len(s)
                continue
            masks = s.batch.unpack()
            for i in range(len(s)):
                if not s.valid[i]:
                    invalid += 1
                    continue
                learned = s.sources[i] == "learned"
                if learned and rc.skip_learned:
                    skipped_learned += 1
                    continue
                w = rc.learned_weight if learned else 1.0
                key, sample = self.train.get(s.batch.indices[i], s.batch.iteration)
                if sample.id != s.batch.ids[i]:  # the crop ids name the box: actors must agree on it
                    log.warning(
                        "rollout sampled %s but the learner derives %s; skipped", s.batch.ids[i], sample.id
                    )
                    invalid += 1
                    continue
                greedy = None
                if s.greedy_rewards is not None:
                    greedy = (s.greedy_rewards[i], s.greedy_tile_rewards[i])
                rows.append(
                    (
                        s.batch.indices[i],
                        masks[i],
                        s.rewards[i],
                        s.tile_rewards[i],
                        s.tile_valid[i],
                        w,
                        key,
                        sample,
                        greedy,
                        {
                            t: (tr[i], tv[i], None if g is None else g[i])
                            for t, (tr, tv, g) in s.scales.items()
                        },
                        lag,
                        None if s.batch.logits is None else s.batch.logits[i],
                    )
                )
        counts = {
            "batch/images": float(len(rows)),
            keys.STALE: float(stale),
            "batch/invalid": float(invalid),
            "batch/skipped_learned": float(skipped_learned),
        }
        if not rows:
            return None, counts
        idx = [r[0] for r in rows]
        dev = self.device
        batch = _Batch(
            indices=idx,
            keys=[r[6] for r in rows],
            samples=[r[7] for r in rows],
            masks=torch.from_numpy(np.stack([r[1] for r in rows])).to(dev),
            rewards=torch.from_numpy(np.stack([r[2] for r in rows])).float().to(dev),
            tile_rewards=torch.from_numpy(np.stack([r[3] for r in rows])).float().to(dev),
            tile_valid=torch.from_numpy(np.stack([r[4] for r in rows])).to(dev),
            fov=torch.from_numpy(np.stack([r[7].fov for r in rows])).to(dev),
            weight=torch.tensor([r[5] for r in rows], dtype=torch.float32, device=dev),
        )
        if max_lag > 0:
            if any(r[11] is None for r in rows):
                raise ValueError("rollout.max_staleness >= 1 but the rollouts carry no behaviour logits")
            batch.lag = torch.tensor([r[10] for r in rows], device=dev)
            batch.behaviour_logits = torch.from_numpy(np.stack([r[11] for r in rows])).float().to(dev)
        for t in self.cfg.reward.tile_sizes[1:]:
            if not all(t in r[9] for r in rows):
                raise ValueError(f"reward.tile_sizes has {t} but the scored rollouts carry no {t}-px tiles")
            per = [r[9][t] for r in rows]
            batch.scales[t] = (
                torch.from_numpy(np.stack([x[0] for x in per])).float().to(dev),
                torch.from_numpy(np.stack([x[1] for x in per])).to(dev),
                None
                if per[0][2] is None
                else torch.from_numpy(np.stack([x[2] for x in per])).float().to(dev),
            )
        if all(r[8] is not None for r in rows):
            batch.baseline = torch.tensor(np.array([r[8][0] for r in rows]), dtype=torch.float32, device=dev)
            batch.tile_baseline = torch.from_numpy(np.stack([r[8][1] for r in rows])).float().to(dev)
        elif self.cfg.learner.advantage == "self_critical":
            raise ValueError("learner.advantage=self_critical but the rollouts carry no greedy-mask rewards")
        return batch, counts

    def _values(self, b: _Batch, feats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PPO value head: (image values [B], tile values [B,ty,tx], value loss against the rewards)."""
        v_img, v_tile = self.value_head(feats.low, tuple(b.tile_rewards.shape[-2:]))
        vt = v_tile[:, None].expand_as(b.tile_rewards)
        valid = b.tile_valid[:, None].expand_as(vt)
        vloss = value_loss(v_img[:, None].expand_as(b.rewards), b.rewards) + value_loss(
            vt[valid], b.tile_rewards[valid]
        )
        return v_img, v_tile, vloss

    def _advantages(self, b: _Batch, feats) -> torch.Tensor:
        """[B,K,H,W] advantages: group (GRPO) or value (PPO) baselines, whole-image and per tile."""
        lc, h, w = self.cfg.learner, *b.masks.shape[-2:]
        if self.value_head is not None:
            with torch.no_grad():
                v_img, v_tile, _ = self._values(b, feats)
            img = baseline_advantages(b.rewards, v_img[:, None])
            tiles = baseline_advantages(b.tile_rewards, v_tile[:, None], valid=b.tile_valid)
        elif lc.advantage == "self_critical":  # the greedy mask's reward is the baseline
            img = baseline_advantages(b.rewards, b.baseline[:, None])
            tiles = baseline_advantages(b.tile_rewards, b.tile_baseline[:, None], valid=b.tile_valid)
        else:
            img = get_advantage_fn(lc.advantage)(b.rewards)
            tiles = tile_advantages(b.tile_rewards, valid=b.tile_valid, method=lc.advantage)
        sizes, advs = [self.cfg.reward.tile_sizes[0]], [tiles]
        for t, (tr, tv, greedy) in b.scales.items():  # multi-scale tiles (never with a value head)
            sizes.append(t)
            if lc.advantage == "self_critical":
                advs.append(baseline_advantages(tr, greedy[:, None], valid=tv))
            else:
                advs.append(tile_advantages(tr, valid=tv, method=lc.advantage))
        # Images without tile rewards (learned reward net) use the whole-image advantage only.
        w_tile = lc.tile_advantage_weight * b.tile_valid.flatten(1).any(1).float()
        adv = mixed_advantages(img, advs, tile=sizes, height=h, width=w, tile_weight=w_tile)
        return adv * b.weight[:, None, None, None]

    def _logits(self, b: _Batch, feats, rows: torch.Tensor | slice, *, module=None) -> torch.Tensor:
        """Logits of the batch ``rows`` through ``module`` (default: the possibly wrapped policy model)."""
        samples = b.samples[rows] if isinstance(rows, slice) else [b.samples[i] for i in rows.tolist()]
        sub = feats.index(rows)
        fn = module or self.module
        with self._autocast():
            out = fn(np.stack([s.image for s in samples]), [s.prompt for s in samples], features=sub)
        return out.float()

    def _chunked_logits(self, b: _Batch, feats, *, module=None) -> torch.Tensor:
        """Logits of the whole batch, one minibatch at a time."""
        step = self.cfg.learner.minibatch_size
        return torch.cat(
            [
                self._logits(b, feats, slice(i, i + step), module=module)
                for i in range(0, len(b.indices), step)
            ]
        )

    def _autocast(self):
        """bf16 autocast on GPU when ``learner.amp``; log-probs and losses stay in float32."""
        enabled = self.cfg.learner.amp and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------------------------------------ update
    def update(self, scored: Sequence[ScoredRollout], *, iteration: int) -> dict[str, float]:
        """One iteration's optimisation on ``scored`` rollouts; returns metrics (and bumps the version)."""
        t0 = time.perf_counter()
        phase = self.phase(iteration)
        self._enter_phase(phase)
        b, metrics = self._assemble(scored)
        metrics.update(self._reward_metrics(scored))
        if b is None:
            log.warning("iteration %d: no valid on-policy images; update skipped", iteration)
            metrics[keys.SKIPPED] = 1.0
            return metrics
        feats = self.features.get(b.keys, [s.image for s in b.samples]).to(self.device)
        old_logits, logp_old, ref_logits = self._rollout_logprobs(b, feats)
        adv = None if phase in ("rce", "dpo") else self._advantages(b, feats)
        if b.lag is not None:
            is_weight, async_metrics = self._importance_weights(b, logp_old)
            metrics.update(async_metrics)
            if adv is not None:
                adv = adv * is_weight
        metrics.update(self._minibatch_steps(b, feats, phase, adv, logp_old, ref_logits, iteration))
        self.version += 1
        metrics[keys.KL_OLD_NEW] = self._drift(b, feats, old_logits)
        metrics["learner/phase_rce"] = float(phase == "rce")
        metrics["learner/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics[keys.TIME_UPDATE] = time.perf_counter() - t0
        return metrics

    @torch.no_grad()
    def _importance_weights(self, b: _Batch, logp_old: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Truncated per-pixel importance weights min(pi_learner / pi_behaviour, is_cap) [B,K,H,W] for stale
        rows (1 for fresh ones), and the asynchronous metrics: staleness counts, the weights' mean / max /
        clipped share on stale rows, and on fresh rows the log-probability mismatch between the rollout
        actors and the learner for the same weights (float16 logits on the wire: ~1e-3 on CPU)."""
        lc, temp = self.cfg.learner, self.cfg.rollout.temperature
        logp_b = pixel_log_probs(b.behaviour_logits, b.masks, temperature=temp)
        stale = (b.lag > 0)[:, None, None, None].expand_as(logp_old)
        ratio = torch.exp(logp_old - logp_b)
        weight = torch.where(stale, ratio.clamp(max=lc.is_cap), torch.ones_like(ratio))
        fov = b.fov[:, None].expand_as(ratio)
        out = {keys.STALENESS_MEAN: float(b.lag.float().mean()), keys.STALENESS_MAX: float(b.lag.max())}
        for lag in range(self.cfg.rollout.max_staleness + 1):
            out[f"{keys.STALENESS_COUNT}{lag}"] = float((b.lag == lag).sum())
        pix = stale & fov
        if pix.any():
            r = ratio[pix]
            out[keys.IS_RATIO_MEAN] = float(r.mean())
            out[keys.IS_RATIO_MAX] = float(r.max())
            out[keys.IS_CLIPPED] = float((r > lc.is_cap).float().mean())
        fresh = ~stale & fov
        if fresh.any():
            out[keys.LOGPROB_MISMATCH] = float((logp_old - logp_b)[fresh].abs().mean())
        return weight, out

    @torch.no_grad()
    def _rollout_logprobs(self, b: _Batch, feats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rollout policy (= the current weights) and the reference, before any step: old logits [B,H,W],
        old pixel log-probabilities of the sampled masks [B,K,H,W], reference logits [B,H,W]."""
        old_logits = self._chunked_logits(b, feats)
        logp_old = pixel_log_probs(old_logits, b.masks, temperature=self.cfg.rollout.temperature)
        with self.policy.reference():
            ref_logits = self._chunked_logits(b, feats, module=self.policy.mask_logits)
        return old_logits, logp_old, ref_logits

    def _minibatch_steps(
        self,
        b: _Batch,
        feats,
        phase: str,
        adv: torch.Tensor | None,
        logp_old: torch.Tensor,
        ref_logits: torch.Tensor,
        iteration: int,
    ) -> dict[str, float]:
        """E epochs over seeded permutations of the batch; mean metrics over the steps taken."""
        lc, n = self.cfg.learner, len(b.indices)
        gen = torch.Generator().manual_seed(int(self.cfg.run.seed * 7919 + iteration))
        sums: dict[str, float] = {}
        steps = 0
        for _epoch in range(lc.epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, lc.minibatch_size):
                rows = perm[start : start + lc.minibatch_size].to(self.device)
                terms = self._loss(b, feats, rows, phase, adv, logp_old, ref_logits)
                # never step on a NaN/inf loss; count it instead
                if not torch.isfinite(terms[keys.LOSS_TOTAL]):
                    sums[keys.NONFINITE_STEPS] = sums.get(keys.NONFINITE_STEPS, 0.0) + 1.0
                    continue
                terms[keys.GRAD_NORM] = self._step(terms[keys.LOSS_TOTAL])
                steps += 1
                for key, val in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(val.detach())
        nonfinite = sums.pop(keys.NONFINITE_STEPS, 0.0)
        out = {k: v / max(steps, 1) for k, v in sums.items()}
        out[keys.NONFINITE_STEPS] = nonfinite
        return out

    def _loss(
        self,
        b: _Batch,
        feats,
        rows: torch.Tensor,
        phase: str,
        adv: torch.Tensor | None,
        logp_old: torch.Tensor,
        ref_logits: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """One minibatch's loss terms: {"loss/total", "loss/policy", "loss/kl", "policy/entropy", ...}."""
        lc, temp = self.cfg.learner, self.cfg.rollout.temperature
        logits = self._logits(b, feats, rows)
        fov = b.fov[rows]
        kl = kl_penalty(logits, ref_logits[rows], fov=fov, temperature=temp)
        ent = entropy_bonus(logits, fov=fov, temperature=temp)
        stats: dict[str, torch.Tensor] = {}
        if phase == "rce":
            pg = rce_loss(logits, b.masks[rows], rce_weights(b.rewards[rows]), fov=fov, temperature=temp)
        elif phase == "dpo":
            pg, stats = dpo_loss(
                logits, ref_logits[rows], b.masks[rows], b.rewards[rows], fov=fov, beta=lc.dpo_beta,
                temperature=temp,
            )  # fmt: skip
        else:
            logp = pixel_log_probs(logits, b.masks[rows], temperature=temp)
            pg, stats = get_policy_loss(lc.policy_loss)(
                logp, logp_old[rows], adv[rows], fov=fov, clip=lc.clip
            )
        loss = pg + lc.kl_coef * kl - lc.entropy_coef * ent
        value = None
        if self.value_head is not None and phase != "rce":
            _, _, value = self._values(_index(b, rows), feats.index(rows))
            loss = loss + lc.value_coef * value
        terms = {keys.LOSS_POLICY: pg, keys.LOSS_KL: kl, keys.ENTROPY: ent, keys.LOSS_TOTAL: loss}
        terms.update({f"policy/{k}": v for k, v in stats.items()})
        if value is not None:
            terms[keys.LOSS_VALUE] = value
        return terms

    @torch.no_grad()
    def _drift(self, b: _Batch, feats, old_logits: torch.Tensor) -> float:
        """Mean KL(pi_old || pi_new) over the batch's FOV pixels after the update: the drift per iteration."""
        new_logits = self._chunked_logits(b, feats)
        kl = kl_bernoulli(old_logits, new_logits, temperature=self.cfg.rollout.temperature)
        return float(masked_mean(kl, b.fov))

    def _step(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward, clip, step; through the DeepSpeed engine when one is set up."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()  # clips (gradient_clipping) and zeroes the gradients
            norm = self.engine.get_global_grad_norm()
            return torch.tensor(float(norm) if norm is not None else float("nan"))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = nn.utils.clip_grad_norm_(params, self.cfg.learner.max_grad_norm)
        self.optimizer.step()
        return norm

    def use_deepspeed(self) -> None:
        """Hand the policy and optimiser to a DeepSpeed ZeRO engine (``learner.strategy: deepspeed``).

        Needs an initialised process group (Ray Train sets it up). The torch optimiser is kept, so DeepSpeed
        builds no fused kernels; ZeRO partitions its state across the Train workers.
        """
        import deepspeed

        lc = self.cfg.learner
        config = {
            "train_micro_batch_size_per_gpu": lc.minibatch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": lc.max_grad_norm,
            "zero_optimization": {"stage": lc.zero_stage},
            "bf16": {"enabled": bool(lc.amp and self.device.type == "cuda")},
            "zero_allow_untested_optimizer": True,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.policy.model, optimizer=self.optimizer, config=config
        )
        self.module = self.engine

    def use_ddp(self, prepare) -> None:
        """Wrap the policy model (and the PPO value head) with ``prepare`` (e.g. ``ray.train.torch.prepare_model``)
        so the minibatch steps average gradients across the learner ranks."""
        self.module = prepare(self.policy.model)
        if self.value_head is not None:
            self.value_head = prepare(self.value_head)

    def _reward_metrics(self, scored: Sequence[ScoredRollout]) -> dict[str, float]:
        valid = [s for s in scored if s.valid.any()]
        if not valid:
            return {}
        rewards = np.concatenate([s.rewards[s.valid] for s in valid])
        out = {keys.REWARD_MEAN: float(rewards.mean()), keys.REWARD_STD: float(rewards.std())}
        out[keys.EP_REW_MEAN] = out[keys.REWARD_MEAN]
        self.best_reward = max(self.best_reward, out[keys.REWARD_MEAN])
        out["custom/best_reward"] = self.best_reward
        names = set().union(*(s.components for s in valid))
        for name in sorted(names):
            vals = np.concatenate([s.components[name][s.valid] for s in valid if name in s.components])
            vals = vals[np.isfinite(vals)]
            if vals.size:
                key = {"dice_raw": "custom/gt_dice", "learned_score": "custom/reward_net_score"}.get(
                    name, f"reward/{name}"
                )
                out[key] = float(vals.mean())
        greedy = [s.greedy_rewards[s.valid] for s in valid if s.greedy_rewards is not None]
        if greedy:
            out[keys.GREEDY_REWARD_MEAN] = float(np.concatenate(greedy).mean())
            dice = [
                s.greedy_components["dice_raw"][s.valid] for s in valid if "dice_raw" in s.greedy_components
            ]
            if dice:
                out[keys.GREEDY_DICE] = float(np.nanmean(np.concatenate(dice)))
        out[keys.LEARNED_FRACTION] = float(
            np.mean([src == "learned" for s in valid for src, v in zip(s.sources, s.valid, strict=True) if v])
        )
        return out

    # ------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Greedy masks on the validation split: metrics at eval.threshold plus a threshold sweep."""
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
        out = {f"val/{k}": v for k, v in res.mean.items()}
        out[keys.VAL_BEST_THRESHOLD] = res.best_threshold
        out["val/best_threshold_dice"] = float(max(res.sweep["dice"]))
        # clDice at the best threshold too, so a sweep can select on Dice + clDice as deployed (tune.metric
        # "val/best_threshold_dice + val/best_threshold_cldice").
        at_best = (
            res
            if res.best_threshold == res.threshold
            else evaluate_probs(probs, val, threshold=res.best_threshold)
        )
        out["val/best_threshold_cldice"] = at_best.mean["cldice"]
        for t, d in zip(res.sweep["thresholds"], res.sweep["dice"], strict=True):
            out[f"val/dice@{t:g}"] = float(d)
        if self.cfg.reward.reward_net:
            out.update(self._reward_gap(val, [p >= self.cfg.eval.threshold for p in probs], res))
        return out

    def improved(self, val_metrics: dict[str, float]) -> bool:
        """True (and remembered) when the selection metric beats every earlier validation."""
        ec = self.cfg.eval
        if ec.select_metric not in val_metrics:
            raise KeyError(f"eval.select_metric {ec.select_metric!r} is not among {sorted(val_metrics)}")
        value = val_metrics[ec.select_metric]
        better = self.best_val is None or (
            value > self.best_val if ec.select_mode == "max" else value < self.best_val
        )
        if better:
            self.best_val = value
        return better

    def _reward_gap(self, val: Sequence, masks: np.ndarray, res) -> dict[str, float]:
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
            "val/learned_score": float(learned.mean()),
            "val/reward_gap": float((learned - gt).mean()),
            "val/reward_gap_abs": float(np.abs(learned - gt).mean()),
        }

    # ------------------------------------------------------------------------------------------ state
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.policy.trainable_state_dict()

    def behaviour_state_dict(self) -> dict[str, torch.Tensor]:
        """What the rollout actors sample with: the current weights, or for dpo the starting ones."""
        return self._behaviour if self._behaviour is not None else self.trainable_state_dict()

    def save(self, directory: str | Path, *, iteration: int) -> Path:
        """Trainable weights (safetensors + PEFT adapter) and learner state (optimizer, counters)."""
        from policies.checkpoint import save_trainable

        directory = Path(directory)
        save_trainable(self.policy, directory, extra={"iteration": iteration, "version": self.version})
        state = {"iteration": iteration, "version": self.version, "best_reward": self.best_reward}
        if self.best_val is not None:
            state["best_val"] = self.best_val
        if self.engine is None:  # ZeRO partitions optimiser state per rank; its moments restart on resume
            state["optimizer"] = self.optimizer.state_dict()
        if self.value_head is not None:
            state["value_head"] = getattr(self.value_head, "module", self.value_head).state_dict()
        torch.save(state, directory / "learner_state.pt")
        return directory

    def load(self, directory: str | Path) -> int:
        """Restore from :meth:`save`; returns the next iteration to run."""
        from policies.checkpoint import load_trainable

        directory = Path(directory)
        load_trainable(self.policy, directory)
        state = torch.load(directory / "learner_state.pt", weights_only=True, map_location=self.device)
        if "optimizer" in state and self.engine is None:
            self.optimizer.load_state_dict(state["optimizer"])
        elif self.engine is not None:
            log.warning("resuming under DeepSpeed: weights restored, optimiser moments start afresh")
        # After the optimiser state: the configured learning rate wins over the saved one (PBT mutates it).
        self._enter_phase(self.phase(int(state["iteration"])))
        if self.value_head is not None:
            getattr(self.value_head, "module", self.value_head).load_state_dict(state["value_head"])
        self.version = int(state["version"])
        self.best_reward = float(state["best_reward"])
        self.best_val = float(state["best_val"]) if "best_val" in state else None
        return int(state["iteration"]) + 1


def _index(b: _Batch, rows: torch.Tensor) -> _Batch:
    picked = rows.tolist()
    return _Batch(
        indices=[b.indices[i] for i in picked],
        keys=[b.keys[i] for i in picked],
        samples=[b.samples[i] for i in picked],
        masks=b.masks[rows],
        rewards=b.rewards[rows],
        tile_rewards=b.tile_rewards[rows],
        tile_valid=b.tile_valid[rows],
        fov=b.fov[rows],
        weight=b.weight[rows],
        baseline=None if b.baseline is None else b.baseline[rows],
        tile_baseline=None if b.tile_baseline is None else b.tile_baseline[rows],
        lag=None if b.lag is None else b.lag[rows],
        behaviour_logits=None if b.behaviour_logits is None else b.behaviour_logits[rows],
        scales={
            t: (tr[rows], tv[rows], None if g is None else g[rows]) for t, (tr, tv, g) in b.scales.items()
        },
    )
