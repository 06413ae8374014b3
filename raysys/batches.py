"""Typed data contracts that cross actor boundaries (rollout -> reward -> learner)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from policies.distributions import PackedMasks, pack_masks, unpack_masks


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
        greedy: the masks hold K + 1 per image, the last being the greedy one (probability > 0.5), scored as
            the self-critical baseline and never trained on.
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
    greedy: bool = False
    logits: np.ndarray | None = None

    def unpack(self) -> np.ndarray:
        """[B, K, H, W] sampled masks (without the greedy one)."""
        masks = unpack_masks(self.masks)
        return masks[:, :-1] if self.greedy else masks

    def unpack_all(self) -> np.ndarray:
        """[B, K (+ 1 greedy), H, W]: every mask to score."""
        return unpack_masks(self.masks)

    def rows(self, start: int, stop: int) -> RolloutBatch:
        """Images ``start:stop`` of this batch (a reward actor's part of a shard), everything else the same."""
        return replace(
            self,
            indices=self.indices[start:stop],
            ids=self.ids[start:stop],
            masks=pack_masks(self.unpack_all()[start:stop]),
            logits=None if self.logits is None else self.logits[start:stop],
        )

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class ScoredRollout:
    """A rollout batch with its rewards.

    Attributes:
        rewards: float32 [B, K] whole-image rewards (NaN where ``valid`` is False).
        tile_rewards: float32 [B, K, ty, tx] per-tile rewards (zeros for learned rewards).
        tile_valid: bool [B, ty, tx]; tiles outside the FOV or without a GT reward are False.
        components: name -> float32 [B, K] reward components (dice, recall, ..., raw metrics).
        sources: per image "gt" or "learned".
        valid: bool [B]; False for images whose reward was missing or not finite (never trained on).
        errors: per-image reason when invalid.
        greedy_rewards: float32 [B] reward of the greedy mask (``batch.greedy``), NaN where invalid.
        greedy_tile_rewards: float32 [B, ty, tx] its per-tile rewards.
        greedy_components: name -> float32 [B] its reward components.
        scales: tile size -> (tile rewards [B, K, ty, tx], tile valid [B, ty, tx], greedy tile rewards
            [B, ty, tx] or None) for every ``reward.tile_sizes`` size after the first (multi-scale tiles).
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
    scales: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.batch)
