"""RewardWorker: scores rollout masks with the multi-objective GT reward and/or the learned reward net.

Every value is tagged with its source ("gt" | "learned"). Non-finite rewards mark the image invalid (it is
reported and never trained on). A plain class; ``ray.remote(num_cpus=...)`` is applied at launch.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from envs.datasets import load_dataset
from envs.postprocess import postprocess
from envs.rewards import MultiObjectiveReward
from raysys.batches import RolloutBatch, ScoredRollout
from raysys.config import Config
from raysys.data import dataset_for_split, train_view

log = logging.getLogger(__name__)


def part_rows(n: int, part: int, parts: int) -> tuple[int, int]:
    """Rows [start, stop) of part ``part`` when ``n`` images are split into ``parts`` contiguous parts as
    evenly as possible (the first ones one longer)."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}")
    size, extra = divmod(n, parts)
    start = part * size + min(part, extra)
    return start, start + size + (part < extra)


class RewardWorker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.reward = MultiObjectiveReward(cfg.reward)
        self.tile, *self.more_tiles = cfg.reward.tile_sizes
        self.train = train_view(cfg, dataset_for_split(cfg.data, "train", load=load_dataset))
        self._targets: OrderedDict[object, object] = OrderedDict()  # GT skeletons etc. per image or crop
        self.scorer = None
        if cfg.reward.source != "gt":
            from policies.reward_net import RewardNetScorer

            self.scorer = RewardNetScorer.from_checkpoint(cfg.reward.reward_net)

    def ready(self) -> dict[str, object]:
        from raysys.placement import placement

        return placement()

    def _target(self, key, sample):
        if key not in self._targets:
            self._targets[key] = self.reward.prepare_target(sample.mask, sample.fov)
            if self.train.cropped and len(self._targets) > 4 * self.cfg.rollout.images_per_iteration:
                self._targets.popitem(last=False)  # crops change every iteration
        return self._targets[key]

    def _source(self, sample) -> str:
        src = self.cfg.reward.source
        if src == "auto":
            return "gt" if sample.has_mask else "learned"
        return src

    def score(self, batch: RolloutBatch, part: tuple[int, int] | None = None) -> ScoredRollout:
        """Whole-image rewards [B, K], tiled rewards [B, K, ty, tx] and components for a rollout batch, or
        with ``part`` (p, n) for the p-th of its images split n ways (``part_rows``) and that sub-batch."""
        t0 = time.perf_counter()
        if part is not None:
            batch = batch.rows(*part_rows(len(batch), *part))
        masks = batch.unpack_all()  # the greedy mask, if any, is scored like a sample and split off below
        b, k, h, w = masks.shape
        ty, tx = -(-h // self.tile), -(-w // self.tile)
        rewards = np.full((b, k), np.nan, np.float32)
        tiles = np.zeros((b, k, ty, tx), np.float32)
        tile_valid = np.zeros((b, ty, tx), bool)
        scales = {
            t: (
                np.zeros((b, k, -(-h // t), -(-w // t)), np.float32),
                np.zeros((b, -(-h // t), -(-w // t)), bool),
            )
            for t in self.more_tiles
        }
        comps: dict[str, np.ndarray] = {}
        sources, valid, errors = [], np.zeros(b, bool), []
        for i, index in enumerate(batch.indices):
            key, sample = self.train.get(index, batch.iteration)
            source = self._source(sample)
            sources.append(source)
            try:
                if sample.id != batch.ids[i]:  # the crop ids name the box: actors must agree on it
                    raise ValueError(
                        f"rollout sampled {batch.ids[i]} but the reward actor derives {sample.id}"
                    )
                if masks.shape[-2:] != sample.mask.shape:
                    raise ValueError(f"masks are {masks.shape[-2:]} but the image is {sample.mask.shape}")
                row = self._score_image(key, sample, masks[i], source)
            except (ValueError, FloatingPointError) as exc:  # NaN guards and malformed masks
                errors.append(f"{batch.ids[i]}: {exc}")
                continue
            r, tiled, c = row
            if not np.all(np.isfinite(r)):
                errors.append(f"{batch.ids[i]}: non-finite reward {r.tolist()}")
                continue
            rewards[i], valid[i] = r, True
            if tiled is not None:
                tiles[i], tile_valid[i] = tiled[self.tile].total, tiled[self.tile].valid
                for t, (tr, tv) in scales.items():
                    tr[i], tv[i] = tiled[t].total, tiled[t].valid
            for name, v in c.items():
                comps.setdefault(name, np.full((b, k), np.nan, np.float32))[i] = v
        for e in errors:
            log.warning("reward skipped: %s", e)
        greedy: dict = {}
        if batch.greedy:
            greedy = {
                "greedy_rewards": rewards[:, -1],
                "greedy_tile_rewards": tiles[:, -1],
                "greedy_components": {name: v[:, -1] for name, v in comps.items()},
            }
            rewards, tiles, comps = rewards[:, :-1], tiles[:, :-1], {n: v[:, :-1] for n, v in comps.items()}
        scales_out = {
            t: (tr[:, :-1], tv, tr[:, -1]) if batch.greedy else (tr, tv, None)
            for t, (tr, tv) in scales.items()
        }
        return ScoredRollout(
            batch=batch,
            rewards=rewards,
            tile_rewards=tiles,
            tile_valid=tile_valid,
            components=comps,
            sources=sources,
            valid=valid,
            errors=errors,
            seconds=time.perf_counter() - t0,
            scales=scales_out,
            **greedy,
        )

    def _score_image(self, key, s, masks: np.ndarray, source: str):
        if source == "gt" and not s.has_mask:
            raise ValueError("no ground-truth mask for a GT reward (use reward.source=auto or learned)")
        if self.cfg.reward.postprocess:
            ec = self.cfg.eval
            masks = np.stack(
                [
                    postprocess(m, closing_radius=ec.closing_radius, min_size=ec.min_size, fov=s.fov)
                    for m in masks
                ]
            )
        comps: dict[str, np.ndarray] = {}
        if s.has_mask:  # GT metrics are logged whenever GT exists (learned-vs-GT gap)
            target = self._target(key, s)
            results = [self.reward.score(m, target) for m in masks]
            gt_total = np.array([r.total for r in results], np.float32)
            for name in results[0].components:
                comps[name] = np.array([r.components[name] for r in results], np.float32)
            comps["gt_total"] = gt_total
        if source == "learned":
            learned = self.scorer.score(s.image, masks, fov=s.fov).values.astype(np.float32)
            comps["learned_score"] = learned
            return learned, None, comps
        return gt_total, self.reward.score_tiles_multi(masks, target), comps

    def score_masks(self, indices: Sequence[int], masks: np.ndarray, *, iteration: int = 0) -> ScoredRollout:
        """Score masks [B, K, H, W] that did not come from a rollout worker (benchmarks, tests); with crops,
        they are masks of the crops of ``iteration``."""
        from policies.distributions import pack_masks

        batch = RolloutBatch(
            indices=list(indices),
            ids=[self.train.get(i, iteration)[1].id for i in indices],
            masks=pack_masks(masks),
            version=-1,
            iteration=iteration,
            temperature=1.0,
        )
        return self.score(batch)
