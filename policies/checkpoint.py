"""Checkpoint I/O: safetensors only (no pickles), with clear errors for checkpoints that do not fit.

- Base weights of the tiny model: ``<dir>/model.safetensors`` + ``<dir>/config.json`` (TinySa2VAConfig).
- Trainable weights of a policy: ``<dir>/trainable.safetensors`` + ``<dir>/meta.json`` and a PEFT adapter
  folder ``<dir>/adapter/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save, save_file

from policies.tiny import TinySa2VA, TinySa2VAConfig

BASE_WEIGHTS = "model.safetensors"
BASE_CONFIG = "config.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
TRAINABLE_META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several error types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def _what_folder(missing: Path) -> str | None:
    """Why ``missing`` (a base model's config.json or an RL checkpoint's meta.json) is not there: its folder is
    the other kind of checkpoint, or does not exist."""
    directory = missing.parent
    if missing.name == BASE_CONFIG and (directory / TRAINABLE_WEIGHTS).is_file():
        return (
            f"{directory} is an RL checkpoint ({TRAINABLE_WEIGHTS} + {TRAINABLE_META}), not a base model folder "
            f"({BASE_CONFIG} + {BASE_WEIGHTS}, what `raysys sft` writes); `raysys eval` and `export` take it "
            "as --checkpoint"
        )
    if missing.name == TRAINABLE_META and (directory / BASE_WEIGHTS).is_file():
        return (
            f"{directory} is a base model folder ({BASE_CONFIG} + {BASE_WEIGHTS}, what `raysys sft` writes), not "
            f"an RL checkpoint ({TRAINABLE_WEIGHTS} + {TRAINABLE_META}, under runs/<name>/checkpoints/): use it "
            f"as policy.checkpoint={directory}"
        )
    if not directory.exists():
        return f"checkpoint folder {directory} does not exist"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(_what_folder(path) or f"checkpoint metadata {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint metadata {path} is not valid JSON: {exc}") from exc


def load_torch_file(path: str | Path, *, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` in raysys's words: torch's own refusal advises retrying with
    ``weights_only=False``, which would run whatever code a pickle carries."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{what} {path} cannot be loaded as plain tensors: it is corrupt, or it holds pickled Python objects, "
            "which raysys never unpickles (they can run code). Use a file raysys wrote, or re-save it from "
            "trusted code as a plain state dict"
        ) from None
    except Exception as exc:  # truncated or foreign files raise several types
        raise CheckpointError(
            f"{what} {path} could not be read ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


def save_base_model(model: TinySa2VA, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Tied embeddings share storage; safetensors refuses shared tensors, and load re-ties them.
    state.pop("language_model.lm_head.weight", None)
    save_file(state, str(directory / BASE_WEIGHTS))
    (directory / BASE_CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2))
    return directory


def load_base_model(directory: str | Path) -> TinySa2VA:
    """Rebuild TinySa2VA from ``config.json`` and load ``model.safetensors`` strictly."""
    directory = Path(directory)
    raw = _read_json(directory / BASE_CONFIG)
    try:
        cfg = TinySa2VAConfig(**raw)
    except TypeError as exc:
        raise CheckpointError(f"{directory / BASE_CONFIG} does not describe a TinySa2VA: {exc}") from exc
    model = TinySa2VA(cfg)
    state = _read_safetensors(directory / BASE_WEIGHTS)
    expected = {k for k in model.state_dict() if k != "language_model.lm_head.weight"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / BASE_WEIGHTS} does not match TinySa2VA({directory / BASE_CONFIG}): "
            f"{len(missing)} missing (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{directory / BASE_WEIGHTS} does not fit the model: {exc}") from exc
    model.language_model.tie_weights()
    return model


def trainable_meta(policy, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metadata stored next to trainable tensors: the LoRA spec they belong to, the base model they sit on
    (``policies.factory.base_identity``), plus ``extra``."""
    lora = dict(vars(policy.spec))
    lora["trainable"] = list(policy.spec.trainable)
    base = getattr(policy, "base_identity", None)
    return {"lora": lora, **({"base": base} if base else {}), **(extra or {})}


def read_trainable_meta(directory: str | Path) -> dict[str, Any]:
    """``meta.json`` of a trainable checkpoint folder (clear errors for a file or a missing folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint {directory} is not a folder; give the folder that holds {TRAINABLE_WEIGHTS} "
            "(e.g. runs/<name>/checkpoints/best)"
        )
    return _read_json(directory / TRAINABLE_META)


def trainable_files(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, bytes]:
    """``trainable.safetensors`` + ``meta.json`` (what :func:`load_trainable` reads) as bytes by file name:
    what a process that should not import torch writes (the metrics sink, for the best weights)."""
    weights = save({k: v.contiguous() for k, v in state.items()})
    return {
        TRAINABLE_WEIGHTS: weights,
        TRAINABLE_META: json.dumps({**meta, "n_tensors": len(state)}, indent=2).encode(),
    }


def write_trainable(state: dict[str, torch.Tensor], meta: dict[str, Any], directory: str | Path) -> Path:
    """``trainable.safetensors`` + ``meta.json`` (what :func:`load_trainable` reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, blob in trainable_files(state, meta).items():
        (directory / name).write_bytes(blob)
    return directory


def save_trainable(policy, directory: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Trainable tensors as safetensors + metadata + a PEFT adapter folder."""
    directory = write_trainable(policy.trainable_state_dict(), trainable_meta(policy, extra), directory)
    policy.save_adapter(str(directory / "adapter"))
    return directory


def load_trainable(
    policy, directory: str | Path, *, strict: bool = True, max_missing_fraction: float = 0.0
) -> dict[str, Any]:
    """Load ``trainable.safetensors`` into ``policy``; returns the metadata. Mismatches raise with counts."""
    directory = Path(directory)
    meta = _read_json(directory / TRAINABLE_META)
    state = _read_safetensors(directory / TRAINABLE_WEIGHTS)
    try:
        policy.load_trainable_state_dict(state, strict=strict, max_missing_fraction=max_missing_fraction)
    except ValueError as exc:
        raise CheckpointError(f"{directory / TRAINABLE_WEIGHTS}: {exc}") from exc
    return meta
