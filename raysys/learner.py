"""The learner: advantages and PPO/GRPO/RCE updates of the trainable (LoRA + head) weights.

``Learner`` is plain torch so the same update runs in a Ray Train worker (``raysys.train``) and in one
process (``benchmarks/ray_overhead.py``). :meth:`Learner.update` is the whole optimisation step, as named
steps (docs/design.md, "The RL problem"):

    batch            TrainBatch.from_scored: valid, fresh-enough images (stale versions and NaN rewards are
                     dropped and counted)
    rollout_logprobs the rollout policy's pixel log-probabilities and the reference logits, no grad
    advantages       whole-image and per-tile baselines, mixed per pixel
    minibatch_steps  E epochs of: policy loss + beta * KL(pi || pi_ref) - c * entropy (+ value loss), each
                     minibatch's gradient accumulated over its micro-batches before one step
    drift            KL(pi_old || pi_new) over the batch after the update

The maths lives in policies/losses.py and policies/distributions.py; this file orders it and logs it.
Validation and the reward-gap monitor live in raysys/validation.py (``Learner.validator``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from envs.datasets import load_dataset
from policies.distributions import kl_bernoulli, pixel_log_probs
from policies.factory import build_policy
from policies.losses import (
    STAT_NORMALISERS,
    baseline_advantages,
    dpo_loss,
    entropy_bonus,
    get_advantage_fn,
    get_policy_loss,
    kl_penalty,
    loss_normalisers,
    masked_mean,
    mixed_advantages,
    rce_loss,
    rce_weights,
    tile_advantages,
    value_loss,
)
from policies.policy import bf16_autocast
from raysys import keys
from raysys.batches import ScoredRollout, TrainBatch
from raysys.config import Config
from raysys.data import dataset_for_split, train_view
from raysys.features import feature_cache
from raysys.validation import Validator

log = logging.getLogger(__name__)

HEADS = ("text_hidden_fcs", "mask_decoder")


def learned_gt_alignment(scored: Sequence[ScoredRollout]) -> float | None:
    """``keys.LEARNED_GT_ALIGNMENT`` of a rollout: over valid images with a learned score and a GT reward, the
    mean Pearson correlation of the two across the image's K masks (the cosine of their group-centred
    vectors); images where either is constant or not finite are left out. None when no image qualifies."""
    corrs = []
    for s in scored:
        if "learned_score" not in s.components or "gt_total" not in s.components:
            continue
        for b in np.flatnonzero(s.valid):
            a = s.components["learned_score"][b].astype(np.float64)
            g = s.components["gt_total"][b].astype(np.float64)
            a, g = a - a.mean(), g - g.mean()
            norm = float(np.linalg.norm(a) * np.linalg.norm(g))
            if norm > 0 and math.isfinite(norm):
                corrs.append(float(a @ g) / norm)
    return float(np.mean(corrs)) if corrs else None


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


class Learner:
    def __init__(
        self, cfg: Config, *, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1
    ):
        if cfg.learner.torch_threads > 0:
            torch.set_num_threads(cfg.learner.torch_threads)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.policy = build_policy(cfg.policy, seed=cfg.run.seed, device=self.device)
        if cfg.learner.activation_checkpointing:  # the learner's copy only: rollout actors do no backward
            self.policy.enable_activation_checkpointing()
        self.module = self.policy.model  # what the minibatch steps call: DDP- or DeepSpeed-wrapped if set up
        self.train = train_view(cfg, dataset_for_split(cfg.data, "train", load=load_dataset))
        self.features = feature_cache(self.policy, self.train, cfg.rollout.images_per_iteration)
        self.validator = Validator(cfg, self.policy, device=self.device)  # its best value is learner state
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
    def _assemble(self, scored: Sequence[ScoredRollout]) -> tuple[TrainBatch | None, dict[str, float]]:
        """Valid rows at most ``rollout.max_staleness`` versions old; counts of what was dropped and why."""
        return TrainBatch.from_scored(
            scored, train=self.train, cfg=self.cfg, version=self.version, device=self.device
        )

    def _values(
        self, b: TrainBatch, feats, share: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PPO value head: (image values [B], tile values [B,ty,tx], value loss against the rewards). With
        ``share`` (a micro-batch's, see ``_micro_batches``) each part of the loss is weighted by it."""
        v_img, v_tile = self.value_head(feats.low, tuple(b.tile_rewards.shape[-2:]))
        vt = v_tile[:, None].expand_as(b.tile_rewards)
        valid = b.tile_valid[:, None].expand_as(vt)
        images = value_loss(v_img[:, None].expand_as(b.rewards), b.rewards)
        # No valid tile (a learned reward scores whole images only): no tile term, not the NaN mean of nothing.
        tiles = torch.where(valid.any(), value_loss(vt[valid], b.tile_rewards[valid]), 0.0)
        if share is not None:
            images, tiles = images * share["masks"], tiles * share["tiles"]
        return v_img, v_tile, images + tiles

    def _advantages(self, b: TrainBatch, feats) -> torch.Tensor:
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
        for t, more in b.scales.items():  # multi-scale tiles (never with a value head)
            sizes.append(t)
            if lc.advantage == "self_critical":
                advs.append(baseline_advantages(more.rewards, more.baseline[:, None], valid=more.valid))
            else:
                advs.append(tile_advantages(more.rewards, valid=more.valid, method=lc.advantage))
        # Images without tile rewards (learned reward net) use the whole-image advantage only.
        w_tile = lc.tile_advantage_weight * b.tile_valid.flatten(1).any(1).float()
        adv = mixed_advantages(img, advs, tile=sizes, height=h, width=w, tile_weight=w_tile)
        return adv * b.weight[:, None, None, None]

    def _logits(self, b: TrainBatch, feats, rows: torch.Tensor | slice, *, module=None) -> torch.Tensor:
        """Logits of the batch ``rows`` through ``module`` (default: the possibly wrapped policy model)."""
        samples = b.samples[rows] if isinstance(rows, slice) else [b.samples[i] for i in rows.tolist()]
        sub = feats.index(rows)
        fn = module or self.module
        with self._autocast():
            out = fn(np.stack([s.image for s in samples]), [s.prompt for s in samples], features=sub)
        return out.float()

    def _chunked_logits(self, b: TrainBatch, feats, *, module=None) -> torch.Tensor:
        """Logits of the whole batch, one micro-batch (or minibatch) at a time."""
        step = self.cfg.learner.micro_batch_size or self.cfg.learner.minibatch_size
        return torch.cat(
            [
                self._logits(b, feats, slice(i, i + step), module=module)
                for i in range(0, len(b.indices), step)
            ]
        )

    def _autocast(self):
        """bf16 autocast on GPU when ``learner.amp``; log-probs and losses stay in float32."""
        return bf16_autocast(self.device, enabled=self.cfg.learner.amp)

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
        metrics[keys.PHASE_RCE] = float(phase == "rce")
        metrics[keys.LR] = self.optimizer.param_groups[0]["lr"]
        metrics[keys.TIME_UPDATE] = time.perf_counter() - t0
        return metrics

    @torch.no_grad()
    def _importance_weights(
        self, b: TrainBatch, logp_old: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
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
    def _rollout_logprobs(self, b: TrainBatch, feats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rollout policy (= the current weights) and the reference, before any step: old logits [B,H,W],
        old pixel log-probabilities of the sampled masks [B,K,H,W], reference logits [B,H,W]."""
        old_logits = self._chunked_logits(b, feats)
        logp_old = pixel_log_probs(old_logits, b.masks, temperature=self.cfg.rollout.temperature)
        with self.policy.reference():
            ref_logits = self._chunked_logits(b, feats, module=self.policy.mask_logits)
        return old_logits, logp_old, ref_logits

    def _minibatch_steps(
        self,
        b: TrainBatch,
        feats,
        phase: str,
        adv: torch.Tensor | None,
        logp_old: torch.Tensor,
        ref_logits: torch.Tensor,
        iteration: int,
    ) -> dict[str, float]:
        """E epochs over seeded permutations of the batch; mean metrics over the steps taken."""
        lc, n = self.cfg.learner, len(b)
        gen = torch.Generator().manual_seed(int(self.cfg.run.seed * 7919 + iteration))
        # Summed on the device, in float64 (what Python floats summed before), and read once at the end: a
        # float() per term and step would wait for the GPU every minibatch.
        sums: dict[str, torch.Tensor] = {}
        steps = nonfinite = 0
        for _epoch in range(lc.epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, lc.minibatch_size):
                rows = perm[start : start + lc.minibatch_size].to(self.device)
                terms = self._backward(b, feats, rows, phase, adv, logp_old, ref_logits)
                if terms is None:  # a NaN/inf loss: never stepped on, counted instead
                    nonfinite += 1
                    continue
                terms[keys.GRAD_NORM] = self._step()
                steps += 1
                for key, val in terms.items():
                    val = val.detach().double()
                    sums[key] = sums[key] + val if key in sums else val
        out = {k: float(v) / max(steps, 1) for k, v in sums.items()}  # the one sync of the metrics
        out[keys.NONFINITE_STEPS] = float(nonfinite)
        return out

    def _micro_batches(
        self, b: TrainBatch, rows: torch.Tensor
    ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor] | None]]:
        """A minibatch's rows in pieces of ``learner.micro_batch_size``, each with its share of every loss term's
        normaliser (``loss_normalisers``: FOV pixels, masks, valid tiles, DPO pairs). Each term is a mean over
        the minibatch, so the pieces' terms weighted by their shares sum to the minibatch's terms, and their
        gradients to its gradient. Unsplit: the whole minibatch, unweighted (no share)."""
        size = self.cfg.learner.micro_batch_size
        if size is None or size >= len(rows):
            return [(rows, None)]
        counts = loss_normalisers(b.fov[rows], b.rewards[rows], b.tile_valid[rows])
        # The denominators as each loss takes them: clamped at 1 (an empty FOV, no pair, no valid tile: a 0 term).
        totals = {k: v.sum().clamp_min(1).double() for k, v in counts.items()}
        return [
            (rows[i : i + size], {k: (v[i : i + size].sum() / totals[k]).float() for k, v in counts.items()})
            for i in range(0, len(rows), size)
        ]

    def _backward(
        self,
        b: TrainBatch,
        feats,
        rows: torch.Tensor,
        phase: str,
        adv: torch.Tensor | None,
        logp_old: torch.Tensor,
        ref_logits: torch.Tensor,
    ) -> dict[str, torch.Tensor] | None:
        """The minibatch ``rows``'s loss terms (detached), its gradient accumulated one micro-batch at a time;
        None, with no gradient left, when its loss is not finite."""
        pieces = self._micro_batches(b, rows)
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        out: dict[str, torch.Tensor] = {}
        for i, (sub, share) in enumerate(pieces):
            # DDP all-reduces in the last piece's backward only: a skipped step then never reaches it, as unsplit
            with self._no_sync() if i < len(pieces) - 1 else contextlib.nullcontext():
                terms = self._loss(b, feats, sub, phase, adv, logp_old, ref_logits, share=share)
                # CPU-GPU sync point, one per micro-batch: whether to go on is decided on the host.
                if not torch.isfinite(terms[keys.LOSS_TOTAL]):
                    if self.engine is None:
                        self.optimizer.zero_grad(set_to_none=True)
                    return None
                if self.engine is not None:
                    self.engine.backward(terms[keys.LOSS_TOTAL])
                else:
                    terms[keys.LOSS_TOTAL].backward()
            for key, val in terms.items():
                out[key] = out[key] + val.detach() if key in out else val.detach()
        return out

    def _no_sync(self) -> contextlib.ExitStack:
        """No gradient all-reduce in the DDP-wrapped modules (the policy, the PPO value head) until the last
        micro-batch's backward (DDP decides it in the forward, so the context holds both)."""
        stack = contextlib.ExitStack()
        for module in (self.module, self.value_head):
            if isinstance(module, nn.parallel.DistributedDataParallel):
                stack.enter_context(module.no_sync())
        return stack

    def _loss(
        self,
        b: TrainBatch,
        feats,
        rows: torch.Tensor,
        phase: str,
        adv: torch.Tensor | None,
        logp_old: torch.Tensor,
        ref_logits: torch.Tensor,
        share: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss terms of ``rows`` by metric name: total, policy, KL, entropy (, value, policy stats); for a
        micro-batch, each weighted by its ``share`` of the minibatch (``_micro_batches``)."""
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
        if share is not None:
            pg = pg * share[{"rce": "masks", "dpo": "pairs"}.get(phase, "pixels")]
            kl, ent = kl * share["pixels"], ent * share["pixels"]
            stats = {
                k: v * share[STAT_NORMALISERS[k]] if STAT_NORMALISERS[k] else v for k, v in stats.items()
            }
        loss = pg + lc.kl_coef * kl - lc.entropy_coef * ent
        value = None
        if self.value_head is not None and phase != "rce":
            _, _, value = self._values(b.select(rows), feats.index(rows), share)
            loss = loss + lc.value_coef * value
        terms = {keys.LOSS_POLICY: pg, keys.LOSS_KL: kl, keys.ENTROPY: ent, keys.LOSS_TOTAL: loss}
        terms.update({keys.policy_stat(k): v for k, v in stats.items()})
        if value is not None:
            terms[keys.LOSS_VALUE] = value
        return terms

    @torch.no_grad()
    def _drift(self, b: TrainBatch, feats, old_logits: torch.Tensor) -> float:
        """Mean KL(pi_old || pi_new) over the batch's FOV pixels after the update: the drift per iteration."""
        new_logits = self._chunked_logits(b, feats)
        kl = kl_bernoulli(old_logits, new_logits, temperature=self.cfg.rollout.temperature)
        return float(masked_mean(kl, b.fov))

    def _step(self) -> torch.Tensor:
        """Clip and step on the accumulated gradients (through the DeepSpeed engine when one is set up)."""
        if self.engine is not None:
            self.engine.step()  # clips (gradient_clipping) and zeroes the gradients
            norm = self.engine.get_global_grad_norm()
            return torch.tensor(float(norm) if norm is not None else float("nan"))
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

        if self.device.type == "cpu":
            # The gloo group does the reductions: DeepSpeed's shared-memory allreduce would otherwise be
            # compiled from C++ on each fresh machine (~90 s, and a compiler needed) before the first step.
            compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
            if isinstance(compatible, dict):
                compatible["deepspeed_shm_comm"] = False
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
        out[keys.BEST_REWARD] = self.best_reward
        names = set().union(*(s.components for s in valid))
        for name in sorted(names):
            vals = np.concatenate([s.components[name][s.valid] for s in valid if name in s.components])
            vals = vals[np.isfinite(vals)]
            if vals.size:
                out[keys.reward_component(name)] = float(vals.mean())
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
        alignment = learned_gt_alignment(valid)
        if alignment is not None:
            out[keys.LEARNED_GT_ALIGNMENT] = alignment
        return out

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
        if self.validator.best is not None:
            state["best_val"] = self.validator.best
        if self.engine is None:  # ZeRO partitions optimiser state per rank; its moments restart on resume
            state["optimizer"] = self.optimizer.state_dict()
        if self.value_head is not None:
            state["value_head"] = getattr(self.value_head, "module", self.value_head).state_dict()
        torch.save(state, directory / "learner_state.pt")
        return directory

    def load(self, directory: str | Path) -> int:
        """Restore from :meth:`save`; returns the next iteration to run."""
        from policies.checkpoint import load_torch_file, load_trainable

        directory = Path(directory)
        load_trainable(self.policy, directory)
        state = load_torch_file(
            directory / "learner_state.pt", what="learner state", map_location=self.device
        )
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
        self.validator.best = float(state["best_val"]) if "best_val" in state else None
        return int(state["iteration"]) + 1
