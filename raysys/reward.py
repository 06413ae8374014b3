"""Scoring of rollout batches, by either of two scorers that share one assembly (:class:`RewardScorer`):

    RewardWorker   a CPU reward actor: the numpy GT reward (``envs.rewards``) and/or the learned reward net, on
                   masks that come bit-packed from a rollout actor (``reward.device: cpu``)
    TorchGTScorer  inside a rollout actor (``reward.device: cuda``): the GT reward with ``envs.rewards_torch`` on
                   that actor's GPU, from the sampled mask tensors still on it

Every value is tagged with its source ("gt" | "learned"). Non-finite rewards mark the image invalid (it is
reported and never trained on). Both give the learner the same ScoredRollout bit for bit: the same checks and
errors per image, and per image the same float32 values (the torch reward's counts and float64 terms equal the
numpy path's exactly). RewardWorker is a plain class; ``ray.remote(num_cpus=...)`` is applied at launch.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from envs.datasets import load_dataset
from envs.postprocess import postprocess
from envs.rewards import MultiObjectiveReward
from envs.types import VesselSample
from raysys.batches import RolloutBatch, ScoredRollout, TileScores
from raysys.config import Config
from raysys.data import TrainView, dataset_for_split, train_view

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def part_rows(n: int, part: int, parts: int) -> tuple[int, int]:
    """Rows [start, stop) of part ``part`` when ``n`` images are split into ``parts`` contiguous parts as
    evenly as possible (the first ones one longer)."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}")
    size, extra = divmod(n, parts)
    start = part * size + min(part, extra)
    return start, start + size + (part < extra)


class TargetCache:
    """GT targets by image key (an image, or one crop of it), prepared once and reused across the K samples and
    iterations. Least recently used entries go first once there are more than ``max_items`` (crops change every
    iteration) or they take more than ``max_bytes`` (``nbytes`` of each); the keys of the current call stay."""

    def __init__(
        self,
        prepare: Callable[[list[VesselSample]], list[Any]],
        *,
        max_items: int | None = None,
        max_bytes: int | None = None,
        nbytes: Callable[[Any], int] = lambda target: 0,
    ) -> None:
        self.prepare, self.max_items, self.max_bytes, self.nbytes_of = prepare, max_items, max_bytes, nbytes
        self._cache: OrderedDict[Hashable, Any] = OrderedDict()
        self.nbytes = 0

    def get(self, items: Sequence[tuple[Hashable, VesselSample]]) -> list[Any]:
        """The targets of (key, sample) pairs, in order; the misses are prepared in one ``prepare`` call."""
        missing = {key: s for key, s in items if key not in self._cache}
        if missing:
            for key, target in zip(missing, self.prepare(list(missing.values())), strict=True):
                self._cache[key] = target
                self.nbytes += self.nbytes_of(target)
        out = [self._cache[key] for key, _ in items]
        for key, _ in items:
            self._cache.move_to_end(key)
        keep = len({key for key, _ in items})
        while len(self._cache) > keep and (
            (self.max_items is not None and len(self._cache) > self.max_items)
            or (self.max_bytes is not None and self.nbytes > self.max_bytes)
        ):
            self.nbytes -= self.nbytes_of(self._cache.popitem(last=False)[1])
        return out

    def __len__(self) -> int:
        return len(self._cache)


class ImageScores(NamedTuple):
    """One image's scores: ``rewards`` float32 [K]; ``tiles`` per tile size (total float32 [K, ty, tx], valid
    bool [ty, tx]), None for learned rewards; ``components`` name -> float32 [K]."""

    rewards: np.ndarray
    tiles: dict[int, tuple[np.ndarray, np.ndarray]] | None
    components: dict[str, np.ndarray]


class Job(NamedTuple):
    """An image of the batch that passed the checks: its row, target key, sample and reward source."""

    row: int
    key: Hashable
    sample: VesselSample
    source: str


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

    def put(self, i: int, scores: ImageScores) -> None:
        """Image ``i``'s scores."""
        self.rewards[i], self.valid[i] = scores.rewards, True
        if scores.tiles is not None:
            for t in self.tiles:
                self.tiles[t][i], self.tile_valid[t][i] = scores.tiles[t]
        for name, v in scores.components.items():
            self.components.setdefault(name, np.full(self._shape, np.nan, np.float32))[i] = v


class RewardScorer:
    """What both scorers share: each image's sample (the crop the rollout sampled), reward source and checks,
    the errors, and the ScoredRollout (the K samples, the greedy masks, every tile size). Subclasses score the
    images that pass the checks (:meth:`_score_images`)."""

    def __init__(self, cfg: Config, train: TrainView) -> None:
        self.cfg, self.train = cfg, train

    def _source(self, sample: VesselSample) -> str:
        src = self.cfg.reward.source
        if src == "auto":
            return "gt" if sample.has_mask else "learned"
        return src

    @staticmethod
    def _problem(sampled_id: str, sample: VesselSample, source: str, hw: tuple[int, int]) -> str | None:
        """Why an image cannot be scored, or None."""
        if sample.id != sampled_id:  # the crop ids name the box: actors must agree on it
            return f"rollout sampled {sampled_id} but the reward actor derives {sample.id}"
        if hw != sample.mask.shape:
            return f"masks are {hw} but the image is {sample.mask.shape}"
        if source == "gt" and not sample.has_mask:
            return "no ground-truth mask for a GT reward (use reward.source=auto or learned)"
        return None

    def _score_images(self, jobs: list[Job], masks, greedy) -> dict[int, list[ImageScores] | Exception]:
        """Per job row: [the K samples' scores, the greedy mask's (when there are greedy masks)], or the error
        (ValueError or FloatingPointError) that invalidates the image."""
        raise NotImplementedError

    def _assemble(self, batch: RolloutBatch, masks, greedy, t0: float) -> ScoredRollout:
        """The ScoredRollout of ``batch`` from its masks [B, K, H, W] and greedy masks [B, H, W] or None (numpy
        arrays or device tensors: only ``_score_images`` reads them)."""
        b, k, h, w = masks.shape
        tile_sizes = self.cfg.reward.tile_sizes
        out = _Scores(b, k, h, w, tile_sizes)
        greedy_out = None if greedy is None else _Scores(b, 1, h, w, tile_sizes)
        sources, problems, jobs = [], {}, []
        for i, index in enumerate(batch.indices):
            key, sample = self.train.get(index, batch.iteration)
            source = self._source(sample)
            sources.append(source)
            problem = self._problem(batch.ids[i], sample, source, (int(h), int(w)))
            if problem is None:
                jobs.append(Job(i, key, sample, source))
            else:
                problems[i] = problem
        for i, rows in self._score_images(jobs, masks, greedy).items():
            if isinstance(rows, Exception):  # NaN guards and malformed masks
                problems[i] = str(rows)
            elif not all(np.all(np.isfinite(r.rewards)) for r in rows):
                problems[i] = f"non-finite reward {[r.rewards.tolist() for r in rows]}"
            else:
                out.put(i, rows[0])
                if greedy_out is not None:
                    greedy_out.put(i, rows[1])
        errors = [f"{batch.ids[i]}: {problems[i]}" for i in sorted(problems)]
        for e in errors:
            log.warning("reward skipped: %s", e)
        first, *more = tile_sizes
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


class RewardWorker(RewardScorer):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, train_view(cfg, dataset_for_split(cfg.data, "train", load=load_dataset)))
        self.reward = MultiObjectiveReward(cfg.reward)
        crops = (
            4 * cfg.rollout.images_per_iteration if self.train.varies else None
        )  # crops and jittered images change each iteration
        self._targets = TargetCache(
            lambda samples: [self.reward.prepare_target(s.mask, s.fov) for s in samples], max_items=crops
        )
        self.scorer = None
        if cfg.reward.source != "gt":
            from policies.reward_net import RewardNetScorer

            self.scorer = RewardNetScorer.from_checkpoint(cfg.reward.reward_net)

    def ready(self) -> dict[str, object]:
        from raysys.placement import placement

        return placement()

    def _target(self, key, sample):
        """The prepared GT target (skeleton etc.) of an image or crop."""
        return self._targets.get([(key, sample)])[0]

    def score(self, batch: RolloutBatch, part: tuple[int, int] | None = None) -> ScoredRollout:
        """Whole-image rewards [B, K], tiled rewards [B, K, ty, tx] and components for a rollout batch (and
        those of its greedy masks), or with ``part`` (p, n) for the p-th of its images split n ways
        (``part_rows``) and that sub-batch."""
        t0 = time.perf_counter()
        if part is not None:
            batch = batch.rows(*part_rows(len(batch), *part))
        return self._assemble(batch, batch.unpack(), batch.unpack_greedy(), t0)

    def _score_images(self, jobs, masks, greedy):
        out: dict[int, list[ImageScores] | Exception] = {}
        for job in jobs:
            try:
                rows = [self._score_image(job.key, job.sample, masks[job.row], job.source)]
                if greedy is not None:
                    rows.append(self._score_image(job.key, job.sample, greedy[job.row][None], job.source))
            except (ValueError, FloatingPointError) as exc:
                out[job.row] = exc
                continue
            out[job.row] = rows
        return out

    def _score_image(self, key, s, masks: np.ndarray, source: str) -> ImageScores:
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
            return ImageScores(learned, None, comps)
        tiled = self.reward.score_tiles_multi(masks, target)
        return ImageScores(gt_total, {t: (tr.total, tr.valid) for t, tr in tiled.items()}, comps)

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


DEVICE_TARGET_BYTES = 1 << 30
"""GT targets of whole images kept on a rollout actor's GPU (~3 bytes a pixel: all of DRIVE's, ~80 of FIVES'
2048 x 2048 images; the rest are prepared again when sampled again)."""


class TorchGTScorer(RewardScorer):
    """The GT reward of a rollout actor's own samples, on its device (``reward.device: cuda``), with
    :class:`envs.rewards_torch.TorchReward`: the ScoredRollout ``RewardWorker.score`` gives, bit for bit, without
    sending the masks anywhere to be scored. GT targets are prepared once per image or crop, in one call for a
    batch's misses, and kept on the device (crops: as many as the reward actors keep; whole images: up to
    :data:`DEVICE_TARGET_BYTES`).

    Only the GT reward without post-processing: ``raysys.runtime.reward_device`` leaves the learned reward net
    (``reward.source`` learned/auto) and ``reward.postprocess`` (scipy morphology) to the reward actors.
    ``device="cpu"`` runs the same code on the CPU (tests compare it with RewardWorker there).
    """

    def __init__(self, cfg: Config, train: TrainView, device: str | torch.device) -> None:
        from envs.rewards_torch import TorchReward

        super().__init__(cfg, train)
        rc = cfg.reward
        if rc.source != "gt" or rc.postprocess:
            raise ValueError(
                f"the rollout actors score the GT reward only (reward.source={rc.source}, "
                f"reward.postprocess={rc.postprocess}); score these with the reward actors (reward.device=cpu)"
            )
        self.reward = TorchReward(rc, device)
        crops = 4 * cfg.rollout.images_per_iteration if train.varies else None
        self._targets = TargetCache(
            self._prepare, max_items=crops, max_bytes=DEVICE_TARGET_BYTES, nbytes=lambda t: t.nbytes
        )

    def score(self, batch: RolloutBatch, masks: torch.Tensor, greedy: torch.Tensor | None) -> ScoredRollout:
        """The ScoredRollout of ``batch`` from its masks bool [B, K, H, W] and greedy masks bool [B, H, W] (or
        None) on this scorer's device; ``seconds`` is the scoring alone."""
        return self._assemble(batch, masks, greedy, time.perf_counter())

    def _prepare(self, samples: list[VesselSample]) -> list:
        """Targets of samples of one size in one call, kept per image (so crops come and go one by one)."""
        gts, fovs = (np.stack([getattr(s, name) for s in samples]) for name in ("mask", "fov"))
        targets = self.reward.prepare_targets(gts, fovs)
        return [targets.select([i]) for i in range(len(samples))]

    def _score_images(self, jobs, masks, greedy):
        if not jobs:
            return {}
        try:
            return self._score_together(jobs, masks, greedy)
        except FloatingPointError as exc:
            if len(jobs) == 1:
                return {jobs[0].row: exc}
        # One image's non-finite reward fails the whole call: score image by image to find it (as the reward
        # actors report it), keeping the others.
        out = {}
        for job in jobs:
            out.update(self._score_images([job], masks, greedy))
        return out

    def _score_together(self, jobs: list[Job], masks, greedy) -> dict[int, list[ImageScores]]:
        """Every job's K masks (and greedy mask) in one TorchReward call; one copy of the results to the host."""
        import torch

        from envs.rewards_torch import TorchTargets

        n, k = len(jobs), masks.shape[1]
        dev = masks.device
        rows = torch.tensor([job.row for job in jobs], device=dev)
        stack, image = (
            masks.index_select(0, rows).flatten(0, 1),
            torch.arange(n, device=dev).repeat_interleave(k),
        )
        if greedy is not None:  # the greedy masks after the samples: rows n*K .. n*K + n - 1
            stack = torch.cat([stack, greedy.index_select(0, rows)])
            image = torch.cat([image, torch.arange(n, device=dev)])
        targets = TorchTargets.cat(self._targets.get([(job.key, job.sample) for job in jobs]))
        s = self.reward.score(stack, targets, image=image, tiles=self.cfg.reward.tile_sizes)
        total = s.whole.total.cpu().numpy()  # float64, as the numpy path's RewardResult.total
        comps = {name: v.cpu().numpy() for name, v in s.whole.components.items()}
        tiles = {t: (bt.total.cpu().numpy(), bt.valid.cpu().numpy()) for t, bt in s.tiles.items()}

        def image_scores(lo: int, hi: int) -> ImageScores:
            """Rows lo:hi (one image's masks), cast as RewardWorker._score_image casts its lists of floats."""
            gt_total = total[lo:hi].astype(np.float32)
            c = {name: v[lo:hi].astype(np.float32) for name, v in comps.items()}
            c["gt_total"] = gt_total
            return ImageScores(gt_total, {t: (tt[lo:hi], tv[lo]) for t, (tt, tv) in tiles.items()}, c)

        out = {}
        for j, job in enumerate(jobs):
            out[job.row] = [image_scores(j * k, (j + 1) * k)]
            if greedy is not None:
                out[job.row].append(image_scores(n * k + j, n * k + j + 1))
        return out
