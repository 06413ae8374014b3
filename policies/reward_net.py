"""Learned reward network: a GT-free estimate of mask quality from (image, mask).

The original experiments' ``LightweightRewardNetwork`` (140,193 parameters) regresses the quality of a
vessel mask, true Dice inside the FOV or the multi-objective reward rescaled to [0, 1], from the RGB image
and the mask alone, so that images without ground truth can still be rewarded. Its scores are tagged
``source="learned"`` so training can down-weight them and monitor learned-vs-GT divergence.

Pieces, in the order they are used (this file holds the network, loading and scoring)::

    ds = build_reward_dataset(samples, masks_per_image=8, seed=0)   # policies/reward_data.py
    report = train_reward_net(train, val, RewardNetConfig(), out_dir="runs/rn")   # policies/reward_train.py
    scorer = RewardNetScorer.from_checkpoint("runs/rn/best_reward_net.pth")
    scorer.score(image, masks).values                               # float32 [K], source "learned"

Training masks come from ``envs.perturb.perturb_mask``: controlled corruptions of the GT (boundary
erosion/dilation, shifts, dropped branches, cuts whose distal part vanishes, gaps, spurious blobs and
lines, salt-and-pepper noise, thresholded noise, empty and full masks) sized so that the true Dice of the
set spans 0..1 about uniformly. Masks from a segmentation policy can be mixed in (``policy_masks``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from envs.rewards import RewardSource

__all__ = [
    "CHECKPOINT_FORMAT",
    "MIN_SIZE",
    "PARAM_COUNT",
    "LearnedScores",
    "LightweightRewardNetwork",
    "RewardNetScorer",
    "load_reward_net",
    "to_inputs",
]

logger = logging.getLogger(__name__)

PARAM_COUNT = 140_193
"""Parameters of :class:`LightweightRewardNetwork` (the original experiments' network)."""

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint dict written by :func:`train_reward_net` (stored under config)."""

MIN_SIZE = 64
"""Smallest input side: three stride-2 convolutions and three 2x2 max-pools need 64 px to keep 1x1."""


# ---------------------------------------------------------------------------------------------- network


class LightweightRewardNetwork(nn.Module):
    """Mask-quality regressor: (image, mask) -> score in (0, 1).

    Layers (the original experiments): image (3 ch) and mask (1 ch) concatenated ->
    Conv 4->32 k7 s2 p3, BN, ReLU, MaxPool 2 -> Conv 32->64 k5 s2 p2, BN, ReLU, MaxPool 2 ->
    Conv 64->128 k3 s2 p1, BN, ReLU, MaxPool 2 -> global average pool -> FC 128->64, ReLU -> FC 64->1 ->
    sigmoid. 140,193 parameters; any input of at least 64x64 pixels (the global pool removes the size).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(4, 32, kernel_size=7, stride=2, padding=3),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, stride=2, padding=2),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, 1),
        )

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Score a batch of masks.

        Args:
            image: float [B, 3, H, W] in [0, 1] (uint8 [B, 3, H, W] is divided by 255).
            mask: [B, 1, H, W] or [B, H, W], float 0/1 or bool.
        Returns:
            float [B] in (0, 1).
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0]:
            raise ValueError(
                f"mask must be [B, 1, H, W] or [B, H, W] with B = {image.shape[0]}, got {tuple(mask.shape)}"
            )
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"mask is {tuple(mask.shape[-2:])} but image is {tuple(image.shape[-2:])} (H, W)"
            )
        h, w = image.shape[-2:]
        if min(h, w) < MIN_SIZE:
            raise ValueError(f"image is {h}x{w}; the reward net needs at least {MIN_SIZE}x{MIN_SIZE} pixels")
        x = torch.cat([image, mask.to(image.dtype)], dim=1)
        return torch.sigmoid(self.head(self.features(x))).squeeze(1)


def to_inputs(images: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Numpy batch -> network inputs.

    Args:
        images: uint8 [B, H, W, 3] (or one image [H, W, 3]).
        masks: bool/0-1 [B, H, W] (or one mask [H, W]).
    Returns:
        (image float32 [B, 3, H, W] in [0, 1], mask float32 [B, 1, H, W]).
    """
    images, masks = np.asarray(images), np.asarray(masks)
    if images.ndim == 3:
        images = images[None]
    if masks.ndim == 2:
        masks = masks[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    if masks.ndim != 3 or masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be [B, H, W] = {images.shape[:3]}, got {masks.shape}")
    # torch.tensor copies: callers' arrays may be read-only (SyntheticFundus shares cached ones).
    img = torch.tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    msk = torch.from_numpy(masks != 0).unsqueeze(1).float()
    return img, msk


# ----------------------------------------------------------------------------------------------- loading


def load_reward_net(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> LightweightRewardNetwork:
    """A trained reward net in eval mode from a checkpoint written by :func:`train_reward_net`.

    Loads with ``weights_only=True`` (no code runs from the file). Raises FileNotFoundError for a missing
    file and ValueError naming the file for an unreadable file, a file without ``model_state_dict``, or
    weights that do not fit the architecture (counts of missing, unexpected and mis-shaped keys).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reward net checkpoint {p} does not exist")
    from policies.checkpoint import load_torch_file

    ckpt = load_torch_file(p, what="reward net checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        found = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"reward net checkpoint {p} has no 'model_state_dict' (found {found}); expected the dict written "
            f"by train_reward_net"
        )
    state = ckpt["model_state_dict"]
    net = LightweightRewardNetwork()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(
        k
        for k in set(expected) & set(state)
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"reward net checkpoint {p} does not fit LightweightRewardNetwork: {len(missing)} missing keys "
            f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}, {len(bad_shape)} with the "
            f"wrong shape {bad_shape[:4]}"
        )
    net.load_state_dict(state)
    return net.to(map_location).eval()


# ----------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True, eq=False)
class LearnedScores:
    """Reward-net scores of K masks of one image.

    Attributes:
        values: float32 [K] in (0, 1), estimates of the training target (Dice or rescaled reward).
        source: always "learned" (GT-free), so training can tell them from GT rewards.
    """

    values: np.ndarray
    source: RewardSource = "learned"


class RewardNetScorer:
    """Scores K candidate masks of one image with a trained reward net (eval mode, no gradients).

    Args:
        net: a trained :class:`LightweightRewardNetwork` (put in eval mode here).
        device: where to run it.
        batch_size: masks per forward pass (bounds memory for large K).
    """

    def __init__(
        self, net: LightweightRewardNetwork, *, device: str | torch.device = "cpu", batch_size: int = 32
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}; give >= 1")
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 32
    ) -> RewardNetScorer:
        return cls(load_reward_net(path, map_location="cpu"), device=device, batch_size=batch_size)

    @torch.no_grad()
    def score(self, image: np.ndarray, masks: np.ndarray, *, fov: np.ndarray | None = None) -> LearnedScores:
        """Scores of K masks of one image.

        Args:
            image: uint8 [H, W, 3].
            masks: bool/0-1 [K, H, W] (or one mask [H, W]).
            fov: optional bool [H, W]; masks are ANDed with it, as the training masks were.
        Returns:
            :class:`LearnedScores` with values float32 [K].
        """
        img_np = np.asarray(image)
        if img_np.dtype != np.uint8 or img_np.ndim != 3 or img_np.shape[2] != 3:
            raise ValueError(f"image must be uint8 [H, W, 3], got {img_np.dtype} {img_np.shape}")
        m = np.asarray(masks) != 0
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[1:] != img_np.shape[:2]:
            raise ValueError(f"masks must be [K, H, W] with H, W = {img_np.shape[:2]}, got {m.shape}")
        if fov is not None:
            m = m & np.asarray(fov, dtype=bool)
        if m.shape[0] == 0:
            return LearnedScores(values=np.zeros(0, dtype=np.float32))
        img, _ = to_inputs(img_np, m[0])
        img = img.to(self.device)
        self.net.eval()  # a caller may have switched it back to train mode
        out = []
        for start in range(0, m.shape[0], self.batch_size):
            chunk = torch.from_numpy(m[start : start + self.batch_size]).to(self.device).unsqueeze(1).float()
            # expand: the image is shared by the chunk, not copied per mask (cat copies once)
            out.append(self.net(img.expand(chunk.shape[0], -1, -1, -1), chunk).float().cpu().numpy())
        return LearnedScores(values=np.concatenate(out))
