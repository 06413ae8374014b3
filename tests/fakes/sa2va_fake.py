"""A CPU-tiny structural fake of Sa2VA's HF remote code (docs/sa2va_adapter.md).

The objects built here have the same attribute paths, call signatures and output shapes as what
``AutoModel.from_pretrained("ByteDance/Sa2VA-*", trust_remote_code=True)`` returns, at toy sizes with random
weights. They pin structure only: nothing here is numerically equivalent to Sa2VA.

InternVL flavour (``Sa2VAChatModel``)              Qwen-VL flavour (``Sa2VAChatModelQwen``)
  .config.template, .config.llm_config             .config.template, .config.text_config
  .vision_model (InternViT names: attn.qkv, ...)   .model = a real tiny transformers
  .mlp1, .extract_feature(pixel_values)                Qwen2_5_VLForConditionalGeneration:
  .language_model: a real tiny Qwen2ForCausalLM        .model.model.visual (MLP gate/up/down_proj: a trap
      or an InternLM2-named module                     for naive LoRA suffix matching)
      (attention.wqkv/wo, feed_forward.w1/w2/w3)       .model.model.language_model.layers.N...
both: .grounding_encoder = SAM2 wrapper (preprocess_image, hidden_dim) with .sam2_model:
        image_encoder (Hiera-like, attn.qkv/attn.proj), sam_prompt_encoder, sam_mask_decoder
        (transformer.*.q_proj/k_proj/v_proj/out_proj: the LoRA trap; conv_s0/conv_s1; four hypernetwork MLPs;
        IoU and object-score heads), memory_attention (q/k/v_proj: another trap), no_mem_embed,
        forward_image, _prepare_backbone_features, _use_multimask, _forward_sam_heads
      .text_hidden_fcs = Linear(d, d), ReLU, Linear(d, hidden_dim), Dropout(0)

Sizes the real model hard-codes are attributes here: SAM2 ``image_size`` 64 (real 1024), the InternVL tile
``force_image_size`` 32 (real 448), SAM ``hidden_dim`` 32 (real 256), Qwen-VL ``min_pixels``/``max_pixels``.

Where each part lives: ``sa2va_tokenizer`` (special tokens, PROMPT_TEMPLATE, the tokenizer), ``sa2va_sam2``
(SAM2 and text_hidden_fcs), ``sa2va_internvl`` (InternViT, InternLM2, Sa2VAChatModel, make_internvl_fake),
``sa2va_qwen_vl`` (Sa2VAChatModelQwen, QwenVLProcessor, make_qwen_vl_fake). Import from here.
"""

from __future__ import annotations

from fakes.sa2va_internvl import InternLM2ForCausalLM, InternVisionModel, Sa2VAChatModel, make_internvl_fake
from fakes.sa2va_qwen_vl import QwenVLProcessor, Sa2VAChatModelQwen, make_qwen_vl_fake
from fakes.sa2va_sam2 import SAM2, SAM2Base, text_hidden_fcs
from fakes.sa2va_tokenizer import PROMPT_TEMPLATE, SPECIAL_TOKENS, build_fake_tokenizer

__all__ = [
    "PROMPT_TEMPLATE",
    "SAM2",
    "SPECIAL_TOKENS",
    "InternLM2ForCausalLM",
    "InternVisionModel",
    "QwenVLProcessor",
    "SAM2Base",
    "Sa2VAChatModel",
    "Sa2VAChatModelQwen",
    "build_fake_tokenizer",
    "make_internvl_fake",
    "make_qwen_vl_fake",
    "text_hidden_fcs",
]
