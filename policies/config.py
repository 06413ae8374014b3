"""Config nodes owned by policies (torch-free, so the config tree loads without importing torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from envs.config_checks import check

TRAINABLE_PARTS = ("llm_lora", "text_hidden_fcs", "mask_decoder")


@dataclass(frozen=True)
class PolicyConfig:
    kind: Literal["tiny", "sa2va"] = "tiny"
    """``tiny``: the embedded CPU-sized Sa2VA-shaped model; ``sa2va``: a real Sa2VA checkpoint."""
    checkpoint: str | None = None
    """Sa2VA checkpoint folder or hub id (kind ``sa2va``), or a tiny-policy SFT checkpoint to start from."""
    trainable: tuple[str, ...] = TRAINABLE_PARTS
    """Parts updated by SFT/RL: any of llm_lora, text_hidden_fcs, mask_decoder (LLM LoRA alone only moves the
    global [SEG] embedding and cannot fix local thin-vessel errors)."""
    decoder_mode: Literal["full", "lora"] = "full"
    """Train the mask decoder fully or through its own LoRA."""
    lora_r: int = 8
    """LoRA rank on the language model."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """LoRA dropout; 0 keeps log-probs of old and new policy comparable."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the frozen backbone (bfloat16 for real Sa2VA on GPU)."""
    trust_remote_code: bool = False
    """Let a Sa2VA checkpoint's own Python files (its modeling code, which every Sa2VA release ships and needs)
    run when it loads. They run with your permissions: enable it only for checkpoints from a source you trust."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.trainable) - set(TRAINABLE_PARTS))
        check(not bad, "policy.trainable", f"unknown part(s) {bad}; allowed: {list(TRAINABLE_PARTS)}")
        check(len(self.trainable) > 0, "policy.trainable", f"choose at least one of {list(TRAINABLE_PARTS)}")
        check(self.lora_r > 0, "policy.lora_r", "must be > 0")
        check(self.lora_alpha > 0, "policy.lora_alpha", "must be > 0 (scale = alpha / r)")
        check(0.0 <= self.lora_dropout < 1.0, "policy.lora_dropout", "must be in [0, 1)")
        check(
            self.kind != "sa2va" or bool(self.checkpoint),
            "policy.checkpoint",
            "kind 'sa2va' needs a checkpoint folder or hub id",
        )
        check(
            self.kind != "sa2va" or self.trust_remote_code,
            "policy.trust_remote_code",
            f"a Sa2VA checkpoint loads with the Python modeling code shipped inside it ({self.checkpoint}), "
            "and that code runs with your permissions; if you trust its source, set policy.trust_remote_code=true",
        )


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 250
    """Optimiser steps of supervised training (Sa2VA loss: 2.0 x BCE + 0.5 x Dice)."""
    batch_size: int = 4
    """Images per step."""
    lr: float = 2e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    bce_weight: float = 2.0
    """BCE weight in the supervised loss (Sa2VA: 2.0)."""
    dice_weight: float = 0.5
    """Dice weight in the supervised loss (Sa2VA: 0.5)."""
    eval_every: int = 50
    """Validate every N steps."""
    jitter: float = 0.0
    """Photometric jitter of the training crops, as ``rollout.jitter`` (a gamma and a contrast factor
    exp(U(-jitter, jitter)) inside the FOV, seeded); 0: off."""

    def __post_init__(self) -> None:
        check(self.steps >= 1, "sft.steps", "must be >= 1")
        check(0.0 <= self.jitter <= 1.0 and math.isfinite(self.jitter), "sft.jitter", "must be in [0, 1]")
        check(self.batch_size >= 1, "sft.batch_size", "must be >= 1")
        check(self.lr > 0, "sft.lr", "must be > 0")
        check(self.weight_decay >= 0, "sft.weight_decay", "must be >= 0")
        check(
            self.bce_weight >= 0 and self.dice_weight >= 0 and self.bce_weight + self.dice_weight > 0,
            "sft.bce_weight/dice_weight",
            "must be >= 0 and not both 0 (a negative loss weight rewards wrong masks)",
        )
        check(self.eval_every >= 1, "sft.eval_every", "must be >= 1")


@dataclass(frozen=True)
class RewardNetConfig:
    epochs: int = 10
    """Training epochs (the original experiments: 10)."""
    batch_size: int = 4
    """Batch size (the original experiments: 4)."""
    lr: float = 1e-3
    """Adam learning rate (the original experiments: 1e-3)."""
    masks_per_image: int = 8
    """Perturbed masks generated per training image (erode/dilate, dropped branches, blobs, noise)."""
    target: Literal["dice", "reward"] = "dice"
    """Regression target: true Dice, or the multi-objective reward rescaled to [0, 1]."""
    n_train: int = 48
    """Training images for the reward net: synthetic images, or for folder data pieces (crops) of the train
    split."""
    n_val: int = 16
    """Held-out images for the reported numbers: synthetic (disjoint seeds), or pieces of the val split."""

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "reward_net.epochs", "must be >= 1")
        check(self.batch_size >= 1, "reward_net.batch_size", "must be >= 1")
        check(self.lr > 0, "reward_net.lr", "must be > 0")
        check(self.masks_per_image >= 1, "reward_net.masks_per_image", "must be >= 1")
        check(self.n_train >= 1 and self.n_val >= 1, "reward_net.n_train/n_val", "must be >= 1")
