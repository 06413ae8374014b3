"""Typed data contracts of one iteration: what crosses actor boundaries (rollout -> reward -> learner) and the
learner's batch built from it.

    RolloutBatch   rollout actor -> reward actor: K bit-packed masks per image (+ the greedy mask)
    ScoredRollout  reward actor -> learner: the batch with its rewards, per-tile rewards and components
    TrainBatch     inside the learner: the valid, fresh-enough rows of the scored rollouts as tensors
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from policies.distributions import PackedMasks, pack_masks, unpack_masks
from raysys import keys

if TYPE_CHECKING:
    from raysys.config import Config
    from raysys.data import TrainView

log = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """K sampled masks for each of B training images, all from one policy version.

    Attributes:
        indices: dataset indices [B] of the images (the learner recomputes features from them).
        ids: sample ids [B].
        masks: bit-packed bool [B, K, H, W], already restricted to each image's FOV.
        version: policy version that sampled them (the learner rejects stale batches).
        iteration: training iteration that asked for them.
        temperature: sampling temperature T.
        worker: rollout worker index; seconds: time spent sampling.
        greedy_masks: bit-packed bool [B, H, W], the greedy mask of each image (probability >=
            ``eval.threshold``, the deployed one) with ``learner.advantage=self_critical``: scored as the
            baseline, never trained on. None otherwise.
        logits: float16 [B, H, W] the sampling policy's mask logits (``rollout.max_staleness`` >= 1 only):
            the learner's importance weights for a stale batch; one map per image, as the K samples share it.
    """

    indices: list[int]
    ids: list[str]
    masks: PackedMasks
    version: int
    iteration: int
    temperature: float
    worker: int = 0
    seconds: float = 0.0
    greedy_masks: PackedMasks | None = None
    logits: np.ndarray | None = None

    def unpack(self) -> np.ndarray:
        """[B, K, H, W] sampled masks."""
        return unpack_masks(self.masks)

    def unpack_greedy(self) -> np.ndarray | None:
        """[B, H, W] greedy masks, or None without them."""
        return None if self.greedy_masks is None else unpack_masks(self.greedy_masks)

    def rows(self, start: int, stop: int) -> RolloutBatch:
        """Images ``start:stop`` of this batch (a reward actor's part of a shard), everything else the same."""
        greedy = self.unpack_greedy()
        return replace(
            self,
            indices=self.indices[start:stop],
            ids=self.ids[start:stop],
            masks=pack_masks(self.unpack()[start:stop]),
            greedy_masks=None if greedy is None else pack_masks(greedy[start:stop]),
            logits=None if self.logits is None else self.logits[start:stop],
        )

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class TileScores:
    """Per-tile rewards at one more tile size (``reward.tile_sizes`` after the first: multi-scale tiles).

    Attributes:
        rewards: float32 [B, K, ty, tx] per-tile rewards of the K samples (zeros for learned rewards).
        valid: bool [B, ty, tx]; tiles outside the FOV or without a GT reward are False.
        greedy: float32 [B, ty, tx] the greedy mask's per-tile rewards (``RolloutBatch.greedy_masks``), or None.
    """

    rewards: np.ndarray
    valid: np.ndarray
    greedy: np.ndarray | None = None


@dataclass
class ScoredRollout:
    """A rollout batch with its rewards.

    Attributes:
        rewards: float32 [B, K] whole-image rewards (NaN where ``valid`` is False).
        tile_rewards: float32 [B, K, ty, tx] per-tile rewards at the first tile size (zeros for learned
            rewards).
        tile_valid: bool [B, ty, tx]; tiles outside the FOV or without a GT reward are False.
        components: name -> float32 [B, K] reward components (dice, recall, ..., raw metrics).
        sources: per image "gt" or "learned".
        valid: bool [B]; False for images whose reward was missing or not finite (never trained on).
        errors: per-image reason when invalid.
        greedy_rewards: float32 [B] reward of the greedy mask (``batch.greedy_masks``), NaN where invalid.
        greedy_tile_rewards: float32 [B, ty, tx] its per-tile rewards at the first tile size.
        greedy_components: name -> float32 [B] its reward components.
        scales: tile size -> :class:`TileScores` for every ``reward.tile_sizes`` size after the first.
    """

    batch: RolloutBatch
    rewards: np.ndarray
    tile_rewards: np.ndarray
    tile_valid: np.ndarray
    components: dict[str, np.ndarray]
    sources: list[str]
    valid: np.ndarray
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    greedy_rewards: np.ndarray | None = None
    greedy_tile_rewards: np.ndarray | None = None
    greedy_components: dict[str, np.ndarray] = field(default_factory=dict)
    scales: dict[int, TileScores] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.batch)


@dataclass
class TileBatch:
    """One more tile size of a :class:`TrainBatch` (multi-scale tiles), as tensors on the learner's device.

    Attributes:
        rewards: float32 [B, K, ty, tx]. valid: bool [B, ty, tx].
        baseline: float32 [B, ty, tx] the greedy mask's per-tile rewards (self-critical), or None.
    """

    rewards: torch.Tensor
    valid: torch.Tensor
    baseline: torch.Tensor | None = None


@dataclass
class TrainBatch:
    """The rows the learner trains on: valid images of fresh-enough scored rollouts, on its device.

    Attributes:
        indices: dataset indices [B]. keys: feature-cache keys [B] (image, or image + crop box).
        samples: VesselSample per row: the image or crop the masks were sampled on.
        masks: bool [B, K, H, W]. fov: bool [B, H, W].
        rewards: float32 [B, K]. tile_rewards: float32 [B, K, ty, tx] (first tile size). tile_valid: bool
            [B, ty, tx].
        weight: float32 [B] loss weight per image (``reward.learned_weight`` for learned rewards).
        baseline: float32 [B] the greedy masks' rewards (self-critical), or None.
        tile_baseline: float32 [B, ty, tx] their per-tile rewards at the first tile size, or None.
        scales: tile size -> :class:`TileBatch` for every ``reward.tile_sizes`` size after the first.
        lag: int64 [B] learner version - sampling version (``rollout.max_staleness`` >= 1), or None.
        behaviour_logits: float32 [B, H, W] the sampling policy's logits (idem), or None.
    """

    indices: list[int]
    keys: list
    samples: list
    masks: torch.Tensor
    fov: torch.Tensor
    rewards: torch.Tensor
    tile_rewards: torch.Tensor
    tile_valid: torch.Tensor
    weight: torch.Tensor
    baseline: torch.Tensor | None = None
    tile_baseline: torch.Tensor | None = None
    scales: dict[int, TileBatch] = field(default_factory=dict)
    lag: torch.Tensor | None = None
    behaviour_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def select(self, rows: torch.Tensor) -> TrainBatch:
        """The batch's rows ``rows`` (int64 [b]) in that order: every field, tensors and lists alike."""
        return _take(self, rows.tolist(), rows)

    @classmethod
    def from_scored(
        cls,
        scored: Sequence[ScoredRollout],
        *,
        train: TrainView,
        cfg: Config,
        version: int,
        device: torch.device,
    ) -> tuple[TrainBatch | None, dict[str, float]]:
        """The trainable rows of ``scored`` for a learner at policy ``version``, and counts of the rest.

        A row is kept when its rollout is at most ``rollout.max_staleness`` versions old, its reward is valid,
        it is not a learned reward under ``reward.skip_learned``, and ``train`` derives the same sample id (crop
        ids name their box). Returns (None, counts) when no row is left.
        """
        rc, max_lag = cfg.reward, cfg.rollout.max_staleness
        kept: list[tuple[ScoredRollout, list[int]]] = []  # each rollout with the rows kept of it
        row_keys, samples, weights, lags = [], [], [], []
        stale = invalid = skipped_learned = 0
        for s in scored:
            lag = version - s.batch.version
            if not 0 <= lag <= max_lag:
                stale += len(s)
                continue
            take = []
            for i in range(len(s)):
                if not s.valid[i]:
                    invalid += 1
                    continue
                learned = s.sources[i] == "learned"
                if learned and rc.skip_learned:
                    skipped_learned += 1
                    continue
                key, sample = train.get(s.batch.indices[i], s.batch.iteration)
                if sample.id != s.batch.ids[i]:  # the crop ids name the box: actors must agree on it
                    log.warning(
                        "rollout sampled %s but the learner derives %s; skipped", s.batch.ids[i], sample.id
                    )
                    invalid += 1
                    continue
                take.append(i)
                row_keys.append(key)
                samples.append(sample)
                weights.append(rc.learned_weight if learned else 1.0)
                lags.append(lag)
            if take:
                kept.append((s, take))
        counts = {
            keys.BATCH_IMAGES: float(len(samples)),
            keys.STALE: float(stale),
            keys.BATCH_INVALID: float(invalid),
            keys.SKIPPED_LEARNED: float(skipped_learned),
        }
        if not kept:
            return None, counts

        def rows_of(get) -> torch.Tensor:
            """The kept rows of the array ``get(scored)`` of every kept rollout, on the device."""
            return torch.from_numpy(np.concatenate([get(s)[take] for s, take in kept])).to(device)

        batch = cls(
            indices=[s.batch.indices[i] for s, take in kept for i in take],
            keys=row_keys,
            samples=samples,
            masks=rows_of(lambda s: s.batch.unpack()),
            fov=torch.from_numpy(np.stack([x.fov for x in samples])).to(device),
            rewards=rows_of(lambda s: s.rewards).float(),
            tile_rewards=rows_of(lambda s: s.tile_rewards).float(),
            tile_valid=rows_of(lambda s: s.tile_valid),
            weight=torch.tensor(weights, dtype=torch.float32, device=device),
        )
        if max_lag > 0:
            if any(s.batch.logits is None for s, _ in kept):
                raise ValueError("rollout.max_staleness >= 1 but the rollouts carry no behaviour logits")
            batch.lag = torch.tensor(lags, device=device)
            batch.behaviour_logits = rows_of(lambda s: s.batch.logits).float()
        for t in rc.tile_sizes[1:]:
            if not all(t in s.scales for s, _ in kept):
                raise ValueError(f"reward.tile_sizes has {t} but the scored rollouts carry no {t}-px tiles")
            batch.scales[t] = TileBatch(
                rewards=rows_of(lambda s, t=t: s.scales[t].rewards).float(),
                valid=rows_of(lambda s, t=t: s.scales[t].valid),
                baseline=rows_of(lambda s, t=t: s.scales[t].greedy).float()
                if all(s.scales[t].greedy is not None for s, _ in kept)
                else None,
            )
        if all(s.greedy_rewards is not None for s, _ in kept):
            batch.baseline = rows_of(lambda s: s.greedy_rewards).float()
            batch.tile_baseline = rows_of(lambda s: s.greedy_tile_rewards).float()
        elif cfg.learner.advantage == "self_critical":
            raise ValueError("learner.advantage=self_critical but the rollouts carry no greedy-mask rewards")
        return batch, counts


def _take(value: Any, picked: list[int], rows: torch.Tensor) -> Any:
    """Rows ``picked`` (``rows`` as a tensor) of a batch field: tensors, lists, dicts and dataclasses of them."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[rows]
    if isinstance(value, list):
        return [value[i] for i in picked]
    if isinstance(value, dict):
        return {k: _take(v, picked, rows) for k, v in value.items()}
    if is_dataclass(value):
        return replace(value, **{f.name: _take(getattr(value, f.name), picked, rows) for f in fields(value)})
    raise TypeError(f"cannot select rows of a {type(value).__name__}; add it to batches._take")
