"""Build the configured policy (tiny or real Sa2VA) behind the one SegmentationPolicy interface."""

from __future__ import annotations

from pathlib import Path

import torch

from policies.config import PolicyConfig
from policies.lora import LoRASpec
from policies.policy import AdapterPolicy


def lora_spec(cfg: PolicyConfig, backbone: str) -> LoRASpec:
    return LoRASpec(
        backbone=backbone,
        trainable=tuple(cfg.trainable),
        decoder_mode=cfg.decoder_mode,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
    )


def build_base_model(cfg: PolicyConfig, *, seed: int = 0) -> torch.nn.Module:
    """The base model before LoRA: a tiny model from an SFT checkpoint (or a fresh seeded one)."""
    if cfg.kind == "tiny":
        from policies.checkpoint import load_base_model
        from policies.tiny import TinySa2VA

        if cfg.checkpoint:
            return load_base_model(Path(cfg.checkpoint))
        torch.manual_seed(seed)
        return TinySa2VA()
    from policies.sa2va import load_sa2va

    return load_sa2va(cfg.checkpoint, dtype=cfg.dtype)


def build_policy(cfg: PolicyConfig, *, seed: int = 0, device: str | torch.device = "cpu") -> AdapterPolicy:
    """Base model + LoRA on the language model + trainable heads, on ``device``."""
    model = build_base_model(cfg, seed=seed)
    backbone = getattr(model, "backbone", "qwen2")
    policy = AdapterPolicy(model, lora_spec(cfg, backbone))
    return policy.to(device)


def load_policy(
    cfg: PolicyConfig,
    trainable_dir: str | Path | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> AdapterPolicy:
    """The configured policy with trainable weights from a checkpoint folder (``trainable.safetensors``)."""
    policy = build_policy(cfg, seed=seed, device=device)
    if trainable_dir is not None:
        from policies.checkpoint import load_trainable

        load_trainable(policy, trainable_dir)
    return policy
