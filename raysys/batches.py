"""Typed data contracts that cross actor boundaries (rollout -> reward -> learner)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policies.distributions import PackedMasks, unpack_masks


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
    """

    indices: list[int]
    ids: list[str]
    masks: PackedMasks
    version: int
    iteration: int
    temperature: float
    worker: int = 0
    seconds: float = 0.0

    def unpack(self) -> np.ndarray:
        return unpack_masks(self.masks)

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

    def __len__(self) -> int:
        return len(self.batch)
