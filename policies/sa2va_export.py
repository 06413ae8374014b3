"""Writing Sa2VA weights and merged release folders that Sa2VA's own ``from_pretrained`` loads
(``load_sa2va`` in policies/sa2va.py reloads them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from policies.sa2va import Sa2VAModel

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")


def save_weights(model: nn.Module, folder: str | Path) -> Path:
    """``model.safetensors`` with every tensor of ``model``'s state dict, as ``from_pretrained`` reads it.

    Not ``save_pretrained``: under transformers < 4.57 it builds ``Sa2VAChatConfig()`` without arguments, which
    fails (``KeyError: 'architectures'``), and under 5.x it rewrites config.json."""
    from safetensors.torch import save_model

    path = Path(folder) / "model.safetensors"
    save_model(model, str(path), metadata={"format": "pt"})
    return path


def save_merged(model: Sa2VAModel, source: str | Path, out: str | Path) -> Path:
    """Write ``model`` (LoRA already merged, no PEFT wrapper) as a release folder at ``out``: its weights in
    one ``model.safetensors`` (:func:`save_weights`), and every other file of the ``source`` checkpoint folder
    (config.json, the remote code, the tokenizer) copied unchanged, so Sa2VA's own
    ``AutoModel.from_pretrained(out, trust_remote_code=True)`` and ``predict_forward`` load and run it. The source's config.json is kept rather than re-saved: a
    config.json written by transformers 5 loses ``llm_config.rope_theta``, which older versions then
    silently replace by 10000."""
    import shutil

    source, out = Path(source), Path(out)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"{source} has no config.json: a merged export needs the base checkpoint folder"
        )
    if hasattr(model.model, "peft_config") or any(".lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("merge the LoRA first (merge_and_unload): the export must be a plain Sa2VA model")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; export into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.model, out)
    weights = {f for pattern in WEIGHT_FILES for f in source.glob(pattern)}
    for f in sorted(source.iterdir()):
        if f.is_file() and f not in weights:
            shutil.copy(f, out / f.name)
    return out
