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
from raysys.batches import RolloutBatch, ScoredRollout, TileScores
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


class _Scores:
    """The arrays a batch's scores fill, image by image: rewards float32 [B, K] (NaN until scored), per tile
    size tiles float32 [B, K, ty, tx] and tile_valid bool [B, ty, tx], components name -> float32 [B, K]."""

    def __init__(self, b: int, k: int, h: int, w: int, tile_sizes: Sequence[int]) -> None:
        self.rewards = np.full((b, k), np.nan, np.float32)
        self.valid = np.zeros(b, bool)
        self.tiles = {t: np.zeros((b, k, -(-h // t), -(-w // t)), np.float32) for t in tile_sizes}
        self.tile_valid = {t: np.zeros((b, -(-h // t), -(-w // t)), bool) for t in tile_sizes}
        self.components: dict[str, np.ndarray] = {}
        self._shape = (b, k)

    def put(self, i: int, rewards: np.ndarray, tiled: dict | None, components: dict[str, np.ndarray]) -> None:
        """Image ``i``'s scores (``RewardWorker._score_image``); ``tiled`` is None for learned rewards."""
        self.rewards[i], self.valid[i] = rewards, True
        if tiled is not None:
            for t in self.tiles:
                self.tiles[t][i], self.tile_valid[t][i] = tiled[t].total, tiled[t].valid
        for name, v in components.items():
            self.components.setdefault(name, np.full(self._shape, np.nan, np.float32))[i] = v


class RewardWorker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.reward = MultiObjectiveReward(cfg.reward)
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
        """Whole-image rewards [B, K], tiled rewards [B, K, ty, tx] and components for a rollout batch (and
        those of its greedy masks), or with ``part`` (p, n) for the p-th of its images split n ways
        (``part_rows``) and that sub-batch."""
        t0 = time.perf_counter()
        if part is not None:
            batch = batch.rows(*part_rows(len(batch), *part))
        masks, greedy = batch.unpack(), batch.unpack_greedy()
        b, k, h, w = masks.shape
        out = _Scores(b, k, h, w, self.cfg.reward.tile_sizes)
        greedy_out = None if greedy is None else _Scores(b, 1, h, w, self.cfg.reward.tile_sizes)
        sources, errors = [], []
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
                rows = [self._score_image(key, sample, masks[i], source)]
                if greedy is not None:
                    rows.append(self._score_image(key, sample, greedy[i][None], source))
            except (ValueError, FloatingPointError) as exc:  # NaN guards and malformed masks
                errors.append(f"{batch.ids[i]}: {exc}")
                continue
            if not all(np.all(np.isfinite(r)) for r, _, _ in rows):
                errors.append(f"{batch.ids[i]}: non-finite reward {[r.tolist() for r, _, _ in rows]}")
                continue
            out.put(i, *rows[0])
            if greedy_out is not None:
                greedy_out.put(i, *rows[1])
        for e in errors:
            log.warning("reward skipped: %s", e)
        first, *more = self.cfg.reward.tile_sizes
        return ScoredRollout(
            batch=batch,
            rewards=out.rewards,
            tile_rewards=out.tiles[first],
            tile_valid=out.tile_valid[first],
            components=out.components,
            sources=sources,
            valid=out.valid,
            errors=errors,
            seconds=time.perf_counter() - t0,
            greedy_rewards=None if greedy_out is None else greedy_out.rewards[:, 0],
            greedy_tile_rewards=None if greedy_out is None else greedy_out.tiles[first][:, 0],
            greedy_components={}
            if greedy_out is None
            else {name: v[:, 0] for name, v in greedy_out.components.items()},
            scales={
                t: TileScores(
                    rewards=out.tiles[t],
                    valid=out.tile_valid[t],
                    greedy=None if greedy_out is None else greedy_out.tiles[t][:, 0],
                )
                for t in more
            },
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
