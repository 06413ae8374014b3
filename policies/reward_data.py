"""The reward net's dataset: (image, mask, target) triples from perturbed ground truth (envs/perturb.py) and,
optionally, a segmentation policy's own masks; targets are the true Dice in the FOV or the GT reward."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from envs.metrics import dice
from envs.perturb import perturb_with_kind
from envs.rewards import MultiObjectiveReward
from envs.types import VesselSample
from policies.reward_net import MIN_SIZE

__all__ = ["PolicyMasks", "RewardDataset", "build_reward_dataset", "dice_histogram"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- dataset

PolicyMasks = Callable[[VesselSample, np.random.Generator], np.ndarray] | Sequence[Any]
"""Extra masks per image: a callable ``(sample, rng) -> bool [K, H, W]`` (or [H, W]), or a sequence with
one entry per sample, each a bool array [K, H, W] / [H, W] or a list of [H, W] masks (K may be 0)."""


class RewardDataset(Dataset):
    """(image, mask, target) triples for the reward net; images are stored once and shared by their masks.

    Attributes:
        images: uint8 [N, H, W, 3].
        masks: bool [M, H, W], inside each image's FOV.
        image_index: int64 [M], the image of each mask.
        targets: float32 [M] in [0, 1] (what the net regresses).
        dice: float32 [M], true Dice in the FOV (kept for diagnostics whatever the target).
        kinds: [M] how each mask was made ("policy", "empty", "branches+blobs", ...).
        sample_ids: [N] ids of the images.
        target: "dice" or "reward".
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        image_index: np.ndarray,
        targets: np.ndarray,
        dice: np.ndarray,
        kinds: Sequence[str],
        sample_ids: Sequence[str],
        target: str,
    ) -> None:
        m = masks.shape[0]
        if not (image_index.shape == targets.shape == dice.shape == (m,) and len(kinds) == m):
            raise ValueError("image_index, targets, dice and kinds must all have one entry per mask")
        self.images, self.masks, self.image_index = images, masks, image_index
        self.targets, self.dice = targets.astype(np.float32), dice.astype(np.float32)
        self.kinds, self.sample_ids, self.target = tuple(kinds), tuple(sample_ids), target

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image float32 [3, H, W] in [0, 1], mask float32 [1, H, W], target float32 [])."""
        img = torch.from_numpy(self.images[self.image_index[i]]).permute(2, 0, 1).float().div_(255.0)
        msk = torch.from_numpy(self.masks[i]).unsqueeze(0).float()
        return img, msk, torch.tensor(self.targets[i])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


def build_reward_dataset(
    samples: Sequence[VesselSample],
    *,
    masks_per_image: int,
    seed: int,
    target: Literal["dice", "reward"] = "dice",
    reward_fn: MultiObjectiveReward | None = None,
    policy_masks: PolicyMasks | None = None,
) -> RewardDataset:
    """Perturbed masks of every sample's GT (plus optional policy masks) with their true quality.

    Targets:
        "dice": Dice of the mask against the GT inside the FOV (:func:`envs.metrics.dice`).
        "reward": the multi-objective GT reward (``reward_fn``, default ``MultiObjectiveReward()``) mapped
            to [0, 1] with its bounds: (total - low) / (high - low), ``(low, high) = reward_fn.bounds()``
            (default weights: [-4.9, 6.0]). The bounds are worst/best cases of every term at once, so real
            masks use the middle of [0, 1]; the mapping is linear, so rankings (what GRPO uses) are kept.

    Args:
        samples: labelled images, all of one size (batches stack them).
        masks_per_image: perturbed masks per image (:func:`perturb_mask`).
        seed: mask ``j`` of sample ``i`` depends only on (seed, i), not on other samples.
        target: "dice" or "reward".
        reward_fn: the reward for target="reward" (not allowed with "dice").
        policy_masks: extra masks per image (see :data:`PolicyMasks`), ANDed with the FOV, kind "policy".
    Returns:
        a :class:`RewardDataset` of M = n_samples x masks_per_image (+ policy masks) items.
    """
    if target not in ("dice", "reward"):
        raise ValueError(f"target is {target!r}; choose 'dice' or 'reward'")
    if reward_fn is not None and target != "reward":
        raise ValueError("reward_fn is only used with target='reward'; drop it or set target='reward'")
    if masks_per_image < 0 or (masks_per_image == 0 and policy_masks is None):
        raise ValueError(f"masks_per_image is {masks_per_image}; give >= 1 (or policy_masks with 0)")
    if len(samples) == 0:
        raise ValueError("no samples: the reward dataset needs at least one labelled image")
    if policy_masks is not None and not callable(policy_masks) and len(policy_masks) != len(samples):
        raise ValueError(f"policy_masks has {len(policy_masks)} entries but there are {len(samples)} samples")
    shape = samples[0].shape
    for s in samples:
        if not s.has_mask:
            raise ValueError(f"sample {s.id!r} has no GT mask; the reward net trains on labelled images only")
        if s.shape != shape:
            raise ValueError(
                f"sample {s.id!r} is {s.shape[1]}x{s.shape[0]} (WxH) but {samples[0].id!r} is "
                f"{shape[1]}x{shape[0]}; resize them to one size first"
            )
    if min(shape) < MIN_SIZE:
        raise ValueError(f"images are {shape[1]}x{shape[0]}; the reward net needs at least {MIN_SIZE} px")
    reward = (reward_fn or MultiObjectiveReward()) if target == "reward" else None
    lo, hi = reward.bounds() if reward is not None else (0.0, 1.0)

    masks: list[np.ndarray] = []
    index: list[int] = []
    targets: list[float] = []
    dices: list[float] = []
    kinds: list[str] = []
    for i, (s, ss) in enumerate(zip(samples, np.random.SeedSequence(seed).spawn(len(samples)), strict=True)):
        rng = np.random.default_rng(ss)
        gt, fov = s.mask & s.fov, s.fov
        made = [perturb_with_kind(gt, rng, fov=fov, severity=None, mode=None) for _ in range(masks_per_image)]
        if policy_masks is not None:
            extra = _policy_masks_for(policy_masks, s, i, rng)
            made += [(m & fov, "policy") for m in extra]
        prepared = reward.prepare_target(gt, fov) if reward is not None else None
        for m, kind in made:
            d = dice(m, gt, fov)
            if reward is not None:
                total = reward.score(m, prepared).total
                y = min(max((total - lo) / (hi - lo), 0.0), 1.0)
            else:
                y = d
            masks.append(m)
            index.append(i)
            targets.append(y)
            dices.append(d)
            kinds.append(kind)
    ds = RewardDataset(
        images=np.stack([s.image for s in samples]),
        masks=np.stack(masks),
        image_index=np.asarray(index, dtype=np.int64),
        targets=np.asarray(targets, dtype=np.float32),
        dice=np.asarray(dices, dtype=np.float32),
        kinds=kinds,
        sample_ids=[s.id for s in samples],
        target=target,
    )
    logger.info(
        "reward dataset: %d masks of %d images (%s target), Dice deciles %s",
        len(ds),
        len(samples),
        target,
        dice_histogram(ds.dice),
    )
    return ds


def _policy_masks_for(
    policy_masks: PolicyMasks, sample: VesselSample, i: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """The policy masks of one sample as a list of bool [H, W], validated against the sample's shape."""
    raw = policy_masks(sample, rng) if callable(policy_masks) else policy_masks[i]
    arr = np.asarray(raw)
    if arr.size == 0:
        return []
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != sample.shape:
        raise ValueError(
            f"policy masks for sample {sample.id!r} are {arr.shape}; expected [K, H, W] with "
            f"H, W = {sample.shape}"
        )
    return [np.asarray(m).astype(bool) for m in arr]


def dice_histogram(values: np.ndarray, bins: int = 10) -> list[int]:
    """Counts of ``values`` (float [M] in [0, 1]) per equal-width bin; 1.0 falls in the last bin."""
    counts, _ = np.histogram(np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0), bins=bins, range=(0, 1))
    return [int(c) for c in counts]
