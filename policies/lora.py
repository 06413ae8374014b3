"""LoRA on the language model only, plus explicitly trainable heads (PEFT).

Targets are regexes over fully qualified module names rooted at the language model, so SAM2's and the
vision tower's q/k/v/gate/up/down projections never match (PEFT's plain suffix matching would wrap them).
Heads (``text_hidden_fcs``, the mask decoder) are PEFT ``modules_to_save``: PEFT keeps their original
weights, so ``disable_adapter()`` is the reference policy without a second model copy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

log = logging.getLogger(__name__)

# Language-model roots: InternVL-style ``language_model.model.layers`` and Qwen-VL-style
# ``model.language_model.layers``; anchored so ``vision_model``/``visual``/``grounding_encoder`` never match.
_LLM_ROOT = r"(?:.*\.)?language_model\.(?:model\.)?layers\.\d+\."

_ATTN_MLP = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip
LLM_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qwen2": _ATTN_MLP,
    "qwen3": _ATTN_MLP,
    "llama": _ATTN_MLP,
    "internlm2": ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
}
"""Per-backbone LoRA targets, relative to a decoder layer of the language model."""

ARCHITECTURE_TO_BACKBONE = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2_5_VLForConditionalGeneration": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3VLForConditionalGeneration": "qwen3",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "internlm2",
    "Phi3ForCausalLM": "phi3",
}

# Mask-decoder LoRA (decoder_mode="lora"): the attention projections of SAM2's two-way transformer, or the
# tiny decoder's convolutions.
DECODER_LORA_TARGET = (
    r"(?:.*\.)?sam_mask_decoder\.(?:transformer\..*\.(?:q_proj|k_proj|v_proj|out_proj)"
    r"|(?:low_conv|mid_conv|hi_conv|hi_conv2|low_proj|mid_proj|hi_proj))"
)
HEAD_MODULES = {"text_hidden_fcs": "text_hidden_fcs", "mask_decoder": "sam_mask_decoder"}


def llm_target_regex(backbone: str) -> str:
    """Full-match regex of the LoRA targets of ``backbone`` under the language model only."""
    if backbone not in LLM_LORA_TARGETS:
        raise ValueError(f"no LoRA target table for backbone {backbone!r}; known: {sorted(LLM_LORA_TARGETS)}")
    names = "|".join(re.escape(t) for t in LLM_LORA_TARGETS[backbone])
    return f"{_LLM_ROOT}(?:{names})"


@dataclass(frozen=True)
class LoRASpec:
    backbone: str = "qwen2"
    trainable: tuple[str, ...] = ("llm_lora", "text_hidden_fcs", "mask_decoder")
    decoder_mode: str = "full"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0


def apply_lora(model: nn.Module, spec: LoRASpec):
    """Wrap ``model`` with PEFT: LoRA on the LLM (always injected so ``reference()`` is uniform; frozen when
    ``llm_lora`` is not trainable), heads as modules_to_save (or decoder LoRA). Returns the PeftModel."""
    from policies.compat import cpu_torchvision

    cpu_torchvision()  # before PEFT imports transformers
    from peft import LoraConfig, get_peft_model

    target = llm_target_regex(spec.backbone)
    to_save = [HEAD_MODULES["text_hidden_fcs"]]
    if spec.decoder_mode == "lora":
        target = f"(?:{target})|(?:{DECODER_LORA_TARGET})"
    elif spec.decoder_mode == "full":
        to_save.append(HEAD_MODULES["mask_decoder"])
    else:
        raise ValueError(f"decoder_mode must be 'full' or 'lora', got {spec.decoder_mode!r}")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target,
        modules_to_save=to_save,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    set_trainable_parts(peft_model, spec.trainable)
    _check_scope(peft_model)
    return peft_model


def part_of(name: str) -> str | None:
    """Which trainable part a PEFT parameter name belongs to, or None for frozen base weights."""
    if ".modules_to_save." in name:
        if ".text_hidden_fcs." in name:
            return "text_hidden_fcs"
        if ".sam_mask_decoder." in name:
            return "mask_decoder"
    if ".lora_" in name:
        return "mask_decoder" if ".sam_mask_decoder." in name else "llm_lora"
    return None


def set_trainable_parts(peft_model: nn.Module, parts: Sequence[str]) -> None:
    """requires_grad on exactly the adapter/head tensors of ``parts``; everything else frozen."""
    for name, p in peft_model.named_parameters():
        p.requires_grad_(part_of(name) in parts)


def _check_scope(peft_model: nn.Module) -> None:
    """LoRA must sit under the language model (or the mask decoder) only."""
    for name, _ in peft_model.named_parameters():
        if ".lora_" in name and not (re.search(r"language_model\.", name) or ".sam_mask_decoder." in name):
            raise RuntimeError(f"LoRA leaked outside the language model/mask decoder: {name}")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; PEFT's saved head copies count once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if ".modules_to_save." not in n)
    return trainable, total
