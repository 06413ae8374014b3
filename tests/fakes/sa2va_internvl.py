"""The InternVL flavour of the fake (remote ``modeling_sa2va_chat.py``): ``Sa2VAChatModel`` with an InternViT
vision model, ``mlp1`` and a language model that is a real tiny ``Qwen2ForCausalLM`` or an InternLM2-named
module (attention.wqkv/wo, feed_forward.w1/w2/w3); ``make_internvl_fake`` builds it with its tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPast, CausalLMOutputWithPast

from fakes.sa2va_sam2 import SAM2, text_hidden_fcs
from fakes.sa2va_tokenizer import PROMPT_TEMPLATE, build_fake_tokenizer


# ------------------------------------------------------------------------------------------------ InternViT
class _InternAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _InternBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _InternAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 2 * dim)
        self.mlp.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class InternVisionModel(nn.Module):
    """InternViT: CLS + patch tokens; ``forward(pixel_values, output_hidden_states, return_dict)``."""

    def __init__(self, image_size: int, patch_size: int, hidden_size: int) -> None:
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, hidden_size, patch_size, stride=patch_size)
        self.embeddings.class_embedding = nn.Parameter(0.02 * torch.randn(1, 1, hidden_size))
        self.embeddings.position_embedding = nn.Parameter(0.02 * torch.randn(1, n + 1, hidden_size))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([_InternBlock(hidden_size)])

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.class_embedding.dtype

    def forward(self, pixel_values, output_hidden_states=False, return_dict=True):
        x = self.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.embeddings.class_embedding.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.embeddings.position_embedding
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return BaseModelOutput(
            last_hidden_state=x, hidden_states=tuple(states) if output_hidden_states else None
        )


# ------------------------------------------------------------------------------------------------ InternLM2
class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class InternLM2Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.wqkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, n, c))


class InternLM2MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention_norm = _RMSNorm(dim)
        self.attention = InternLM2Attention(dim, heads)
        self.ffn_norm = _RMSNorm(dim)
        self.feed_forward = InternLM2MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2Model(nn.Module):
    """InternLM2's decoder (remote ``modeling_internlm2.py`` names); causal, all-ones masks only, no RoPE."""

    def __init__(self, config) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            InternLM2DecoderLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = _RMSNorm(config.hidden_size)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        x = self.norm(x)
        states[-1] = x
        return BaseModelOutputWithPast(
            last_hidden_state=x, hidden_states=tuple(states) if output_hidden_states else None
        )


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def forward(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=None, **kw
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        return CausalLMOutputWithPast(
            logits=self.output(out.last_hidden_state), hidden_states=out.hidden_states
        )


# ------------------------------------------------------------------------------------------------ top level
class Sa2VAChatModel(nn.Module):
    """InternVL-flavour remote model (``modeling_sa2va_chat.py``)."""

    def __init__(self, config, language_model: nn.Module, *, sam_image_size: int = 64, sam_dim: int = 32):
        super().__init__()
        self.config = config
        image_size = config.force_image_size or config.vision_config.image_size
        patch_size = config.vision_config.patch_size
        self.template = PROMPT_TEMPLATE[config.template.replace("-", "_")]
        self.select_layer = config.select_layer
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = int((image_size // patch_size) ** 2 * config.downsample_ratio**2)
        self.llm_arch_name = config.llm_config.architectures[0]
        self.vision_model = InternVisionModel(image_size, patch_size, config.vision_config.hidden_size)
        self.language_model = language_model
        vit_hidden = config.vision_config.hidden_size * int(1 / config.downsample_ratio) ** 2
        llm_hidden = config.llm_config.hidden_size
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit_hidden),
            nn.Linear(vit_hidden, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )
        self.img_context_token_id = None
        self.grounding_encoder = SAM2(image_size=sam_image_size, hidden_dim=sam_dim)
        self.text_hidden_fcs = text_hidden_fcs(llm_hidden, self.grounding_encoder.hidden_dim)
        self.init_prediction_config = False

    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        return x.permute(0, 2, 1, 3).contiguous()

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.select_layer == -1:
            vit_embeds = self.vision_model(
                pixel_values=pixel_values, output_hidden_states=False, return_dict=True
            ).last_hidden_state
        else:
            vit_embeds = self.vision_model(
                pixel_values=pixel_values, output_hidden_states=True, return_dict=True
            ).hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]
        h = w = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()


def make_internvl_fake(*, llm: str = "qwen2", template: str = "qwen_chat", seed: int = 0):
    """(remote model, tokenizer) of the InternVL flavour; ``llm`` is ``qwen2`` or ``internlm2``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = build_fake_tokenizer(bos=llm == "internlm2")
    if llm == "qwen2":
        llm_config = Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            architectures=["Qwen2ForCausalLM"],
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
        llm_config._attn_implementation = "sdpa"
        language_model = Qwen2ForCausalLM(llm_config)
    elif llm == "internlm2":
        llm_config = SimpleNamespace(
            architectures=["InternLM2ForCausalLM"],
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
        language_model = InternLM2ForCausalLM(llm_config)
    else:
        raise ValueError(f"llm must be qwen2 or internlm2, got {llm!r}")
    config = SimpleNamespace(
        architectures=["Sa2VAChatModel"],
        template=template,
        llm_config=llm_config,
        vision_config=SimpleNamespace(image_size=32, patch_size=8, hidden_size=16),
        force_image_size=32,
        downsample_ratio=0.5,
        select_layer=-1,
        ps_version="v2",
        use_llm_lora=0,
        use_backbone_lora=0,
    )
    return Sa2VAChatModel(config, language_model).eval(), tok
