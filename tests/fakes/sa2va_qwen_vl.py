"""The Qwen-VL flavour of the fake (remote ``modeling_sa2va_qwen.py``): ``Sa2VAChatModelQwen`` around a real
tiny transformers ``Qwen2_5_VLForConditionalGeneration``, the parts of its processor the adapter uses, and
``make_qwen_vl_fake`` to build all three."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from fakes.sa2va_sam2 import SAM2, text_hidden_fcs

# PROMPT_TEMPLATE is not used here, but the adapter looks the table up on the remote class's module
from fakes.sa2va_tokenizer import PROMPT_TEMPLATE, build_fake_tokenizer  # noqa: F401


class Sa2VAChatModelQwen(nn.Module):
    """Qwen-VL-flavour remote model (``modeling_sa2va_qwen.py``)."""

    def __init__(self, config, model: nn.Module, *, sam_image_size: int = 64, sam_dim: int = 32) -> None:
        super().__init__()
        self.config = config
        self.min_pixels = 4 * 8 * 8  # real: 512 * 28 * 28 (factor = patch 14 x merge 2)
        self.max_pixels = 16 * 8 * 8  # real: 2048 * 28 * 28
        self.model = model
        self.grounding_encoder = SAM2(image_size=sam_image_size, hidden_dim=sam_dim)
        self.text_hidden_fcs = text_hidden_fcs(
            config.text_config.hidden_size, self.grounding_encoder.hidden_dim
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()


class QwenVLProcessor:
    """The parts of ``Qwen2_5_VLProcessor`` the adapter uses: tokenizer, image_processor, chat template."""

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_processor) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        # Qwen2.5-VL's chat template injects a default system turn
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        for m in messages:
            parts = []
            for c in m["content"]:
                if c["type"] == "image":
                    parts.append("<|vision_start|><|image_pad|><|vision_end|>")
                else:
                    parts.append(c["text"])
            text += f"<|im_start|>{m['role']}\n{''.join(parts)}<|im_end|>\n"
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def make_qwen_vl_fake(*, template: str | None = "qwen_chat", seed: int = 0):
    """(remote model, tokenizer, processor) of the Qwen2.5-VL flavour (a real tiny transformers model)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tok = build_fake_tokenizer()
    ids = tok.convert_tokens_to_ids
    vl_config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            "bos_token_id": None,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 32,
            "window_size": 16,
            "fullatt_block_indexes": [0],
            "in_channels": 3,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    vl_config._attn_implementation = "sdpa"
    qwen = Qwen2_5_VLForConditionalGeneration(vl_config)
    config = SimpleNamespace(architectures=["Sa2VAChatModelQwen"], text_config=vl_config.text_config)
    if template is not None:
        config.template = template
    remote = Sa2VAChatModelQwen(config, qwen).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=remote.min_pixels,
        max_pixels=remote.max_pixels,
    )
    return remote, tok, QwenVLProcessor(tok, image_processor)
