"""Random-init Sa2VA checkpoint folders, built offline from Sa2VA's own remote code.

Tests and benchmarks need a real Sa2VA model without a model hub. Given the folder of Sa2VA's Hugging Face
remote-code files (``modeling_sa2va_chat.py`` and its siblings, as a release folder ships them), this writes a
release-shaped folder: the remote files, a ``config.json`` like the release's (``auto_map``, template, vision
and LLM configs), a byte-level tokenizer with Sa2VA's special tokens, and random weights. SAM2 is always
Hiera-L (224 M parameters): the remote ``sam2.py`` hard-codes it. The vision and LLM sizes come from a shape:

* ``test``: 2-layer InternViT (width 32) and 2-layer Qwen2 (width 64, vocabulary 320), 448-px tiles.
* ``1b``: Sa2VA-1B's shapes (InternViT-300M-448px + Qwen2.5-0.5B-Instruct).
* ``4b``: Sa2VA-4B's shapes (InternViT-300M-448px + Qwen2.5-3B-Instruct).

The tokenizer has no merges (one token per byte), so prompts are longer than a real tokenizer's, but every
special token is one id, as in the releases.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>",
                  "</quad>", "<ref>", "</ref>", "<box>", "</box>", "[SEG]", "<p>", "</p>", "<vp>", "</vp>"]  # fmt: skip
"""What Sa2VA adds to its LLM tokenizer (plus Qwen's chat tokens)."""

_INTERNVIT_300M = {
    "architectures": ["InternVisionModel"], "hidden_size": 1024, "intermediate_size": 4096,
    "num_attention_heads": 16, "num_hidden_layers": 24, "image_size": 448, "patch_size": 14,
    "qkv_bias": True, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "use_flash_attn": False,
    "drop_path_rate": 0.0,
}  # fmt: skip
_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768, "rope_theta": 1000000.0,
          "rms_norm_eps": 1e-6, "hidden_act": "silu"}  # fmt: skip

SHAPES: dict[str, dict[str, Any]] = {
    "test": {
        "vision_config": {
            "architectures": ["InternVisionModel"], "hidden_size": 32, "intermediate_size": 64,
            "num_attention_heads": 2, "num_hidden_layers": 2, "image_size": 448, "patch_size": 14,
            "qkv_bias": True, "norm_type": "layer_norm", "use_flash_attn": False, "drop_path_rate": 0.0,
        },
        "llm_config": {
            **_QWEN2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 320, "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
        },
    },
    "1b": {
        "vision_config": _INTERNVIT_300M,
        "llm_config": {
            **_QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
            "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151674, "tie_word_embeddings": False,
        },
    },
    "4b": {
        "vision_config": _INTERNVIT_300M,
        "llm_config": {
            **_QWEN2, "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
            "num_key_value_heads": 2, "num_hidden_layers": 36, "vocab_size": 151674, "tie_word_embeddings": False,
        },
    },
}  # fmt: skip


def release_config(shape: str) -> dict[str, Any]:
    """The ``config.json`` of a release folder (as Sa2VA's convert_to_hf writes it) with ``shape``'s sizes."""
    if shape not in SHAPES:
        raise ValueError(f"unknown Sa2VA shape {shape!r}; known: {sorted(SHAPES)}")
    return {
        "architectures": ["Sa2VAChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
            "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
            "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
        },
        "model_type": "sa2va_chat",
        "template": "qwen_chat",
        "force_image_size": 448,
        "downsample_ratio": 0.5,
        "select_layer": -1,
        "ps_version": "v2",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "torch_dtype": "float32",
        **copy.deepcopy(SHAPES[shape]),
    }


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer without merges plus Sa2VA's special tokens, built without a hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from policies.compat import cpu_torchvision

    cpu_torchvision()  # before transformers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    if len(fast) > vocab_size:
        raise ValueError(f"the tokenizer has {len(fast)} tokens, more than the LLM's vocab_size {vocab_size}")
    fast.save_pretrained(folder)


def copy_remote_code(remote: Path, folder: Path) -> list[str]:
    """Copy the remote-code ``*.py`` files (the release ships them beside the weights)."""
    names = sorted(p.name for p in Path(remote).glob("*.py"))
    if "modeling_sa2va_chat.py" not in names:
        raise FileNotFoundError(f"{remote} has no modeling_sa2va_chat.py: not Sa2VA's remote-code folder")
    for name in names:
        shutil.copy(Path(remote) / name, folder / name)
    return names


def build_model(remote: str | Path, folder: str | Path, shape: str = "test", *, seed: int = 0):
    """Write the folder's code, config and tokenizer, and build the remote model at random init (not saved).
    Returns ``(model, tokenizer)``; the model is float32 on CPU."""
    import torch

    from policies.compat import prepare

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copy_remote_code(Path(remote), folder)
    config = release_config(shape)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    prepare(folder)  # before the first transformers import
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    write_tokenizer(folder, config["llm_config"]["vocab_size"])
    torch.manual_seed(seed)
    model = AutoModel.from_config(
        AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True
    )
    return model.eval(), AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def build_checkpoint(remote: str | Path, folder: str | Path, shape: str = "test", *, seed: int = 0) -> Path:
    """A complete random-init release folder at ``folder`` (which must be empty or absent)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; build a checkpoint into a new folder")
    from policies.sa2va_export import save_weights

    model, _ = build_model(remote, folder, shape, seed=seed)
    save_weights(model, folder)
    return folder
