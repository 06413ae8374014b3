"""Build the configured policy (tiny or real Sa2VA) behind the one SegmentationPolicy interface."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from policies.config import PolicyConfig
from policies.lora import LoRASpec
from policies.policy import AdapterPolicy

log = logging.getLogger(__name__)


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

    return load_sa2va(cfg.checkpoint, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)


def base_identity(cfg: PolicyConfig, model: torch.nn.Module, *, seed: int) -> dict[str, Any]:
    """What trainable weights sit on: the base checkpoint (absolute path or hub id) and a digest of the base
    weights (tiny: every tensor; Sa2VA: config.json and the weight files' names and sizes, not GBs of
    bytes). Saved in every trainable checkpoint and checked when one is loaded."""
    h = hashlib.sha256()
    checkpoint = cfg.checkpoint
    if cfg.kind == "tiny":
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    else:
        folder = Path(cfg.checkpoint) if cfg.checkpoint else None
        if folder is not None and folder.is_dir():
            config = folder / "config.json"
            h.update(config.read_bytes() if config.is_file() else b"")
            for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
        else:
            h.update(str(cfg.checkpoint).encode())
    if checkpoint and Path(checkpoint).exists():
        checkpoint = str(Path(checkpoint).resolve())
    return {"kind": cfg.kind, "checkpoint": checkpoint, "seed": seed, "digest": h.hexdigest()[:16]}


def build_policy(cfg: PolicyConfig, *, seed: int = 0, device: str | torch.device = "cpu") -> AdapterPolicy:
    """Base model + LoRA on the language model + trainable heads, on ``device``."""
    model = build_base_model(cfg, seed=seed)
    identity = base_identity(cfg, model, seed=seed)
    backbone = getattr(model, "backbone", "qwen2")
    torch.manual_seed(seed)  # LoRA's random A matrices: same seed, same run, also from a base checkpoint
    policy = AdapterPolicy(model, lora_spec(cfg, backbone))
    policy.base_identity = identity
    return policy.to(device)


_LORA_KEYS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "decoder_mode": "decoder_mode"}


def _as_trained(cfg: PolicyConfig, meta: dict[str, Any], where: Path) -> PolicyConfig:
    """The policy config the checkpoint was trained with: its base model when none is configured, and its
    LoRA settings (they are part of the weights: another alpha would silently change the outputs)."""
    changes: dict[str, Any] = {}
    base = meta.get("base") or {}
    if cfg.checkpoint is None and base.get("checkpoint"):
        recorded = base["checkpoint"]
        if Path(recorded).is_absolute() and not Path(recorded).exists():
            from policies.checkpoint import CheckpointError

            raise CheckpointError(
                f"{where} was trained on the base model {recorded} (recorded in its meta.json), which no longer "
                "exists; restore that folder, or set policy.checkpoint to a copy of it"
            )
        log.warning(
            "policy.checkpoint is not set: using %s, the base model that %s was trained on", recorded, where
        )
        changes["checkpoint"] = recorded
    lora = meta.get("lora") or {}
    for key, field in _LORA_KEYS.items():
        if key in lora and lora[key] != getattr(cfg, field):
            changes[field] = lora[key]
    if "trainable" in lora and tuple(lora["trainable"]) != tuple(cfg.trainable):
        changes["trainable"] = tuple(lora["trainable"])
    lora_changes = {k: v for k, v in changes.items() if k != "checkpoint"}
    if lora_changes:
        log.warning(
            "%s was trained with %s; those settings are used, not the configured ones", where, lora_changes
        )
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_policy(
    cfg: PolicyConfig,
    trainable_dir: str | Path | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> AdapterPolicy:
    """The configured policy with trainable weights from a checkpoint folder (``trainable.safetensors``).

    The checkpoint's own LoRA settings and, when ``cfg.checkpoint`` is not set, its base model are used; a
    base model other than the one it was trained on is refused (its LoRA and heads would be meaningless)."""
    if trainable_dir is None:
        return build_policy(cfg, seed=seed, device=device)
    from policies.checkpoint import CheckpointError, load_trainable, read_trainable_meta

    trainable_dir = Path(trainable_dir)
    meta = read_trainable_meta(trainable_dir)
    cfg = _as_trained(cfg, meta, trainable_dir)
    policy = build_policy(cfg, seed=seed, device=device)
    saved = meta.get("base")
    if saved and saved.get("digest") != policy.base_identity["digest"]:
        raise CheckpointError(
            f"{trainable_dir} was trained on base model {saved.get('checkpoint') or 'a fresh tiny model'} "
            f"(seed {saved.get('seed')}, digest {saved.get('digest')}), but policy.checkpoint="
            f"{cfg.checkpoint} (seed {seed}) gives digest {policy.base_identity['digest']}; set "
            f"policy.checkpoint to the base it was trained on"
        )
    load_trainable(policy, trainable_dir)
    return policy
