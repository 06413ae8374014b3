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
"""

from __future__ import annotations

import math
import string
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from policies.compat import cpu_torchvision

cpu_torchvision()  # before transformers imports a CUDA-only torchvision on a CPU machine
from transformers.modeling_outputs import (  # noqa: E402
    BaseModelOutput,
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<unk>",
    "<s>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "[SEG]",
    "<|user|>",
    "<|end|>",
    "<|assistant|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The remote modeling module imports PROMPT_TEMPLATE from its templates.py; the adapter looks it up on the
# module of the remote class, so this fake module carries (a subset of) the same table.
PROMPT_TEMPLATE = {
    "qwen_chat": {
        "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "SUFFIX": "<|im_end|>",
        "SUFFIX_AS_EOS": True,
        "SEP": "\n",
        "STOP_WORDS": ["<|im_end|>", "<|endoftext|>"],
    },
    "internlm2_chat": {
        "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "SUFFIX": "<|im_end|>",
        "SUFFIX_AS_EOS": True,
        "SEP": "\n",
        "STOP_WORDS": ["<|im_end|>"],
    },
    "phi3_chat": {
        "SYSTEM": "<|system|>\n{system}<|end|>\n",
        "INSTRUCTION": "<|user|>\n{input}<|end|>\n<|assistant|>\n",
        "SUFFIX": "<|end|>",
        "SUFFIX_AS_EOS": True,
        "SEP": "\n",
        "STOP_WORDS": ["<|end|>"],
    },
}


def build_fake_tokenizer(*, bos: bool = False):
    """Character-level tokenizer with Sa2VA's (and Qwen-VL's) special tokens, built in code.

    ``bos=True`` mimics InternLM2 tokenizers, whose ``encode`` prepends ``<s>`` with add_special_tokens=True.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()  # characters back to text without separators
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<s>" if bos else None,
    )
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[3:])})
    return tok


# ------------------------------------------------------------------------------------------------ SAM2 parts
class LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLP(nn.Module):
    """SAM's MLP (``.layers``; ReLU between layers)."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output=False
    ):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims, [*dims[1:], output_dim], strict=True)
        )
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class Attention(nn.Module):
    """SAM2's attention layer: q_proj/k_proj/v_proj/out_proj (the names naive LoRA matching would catch)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = embedding_dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dim, 2)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0)) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, image_pe)
        q, k = queries + point_embedding, keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MaskDecoder(nn.Module):
    """SAM2's MaskDecoder: output tokens [obj_score, iou, 4 mask tokens] + prompts through a two-way
    transformer, 4x upscaling fused with the high-res features (conv_s0/conv_s1), hypernetwork dot product."""

    def __init__(self, transformer_dim: int, num_multimask_outputs: int = 3) -> None:
        super().__init__()
        c = transformer_dim
        self.transformer_dim = c
        self.transformer = TwoWayTransformer(depth=2, dim=c, num_heads=2, mlp_dim=2 * c)
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        self.obj_score_token = nn.Embedding(1, c)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.use_high_res_features = True
        self.conv_s0 = nn.Conv2d(c, c // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(c, c // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(c, c, c // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(c, c, self.num_mask_tokens, 3, sigmoid_output=True)
        self.pred_obj_score_head = nn.Linear(c, 1)
        self.dynamic_multimask_via_stability = True
        self.use_multimask_token_for_obj_ptr = True

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ):
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, repeat_image,
            high_res_features,
        )  # fmt: skip
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            # the real decoder falls back to the most stable multimask output here; the fake keeps token 0
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def predict_masks(self, image_embeddings, image_pe, sparse, dense, repeat_image, high_res_features):
        out_tokens = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight])
        out_tokens = out_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        src = (
            torch.repeat_interleave(image_embeddings, tokens.shape[0], 0)
            if repeat_image
            else image_embeddings
        )
        src = src + dense
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], 0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 1]
        mask_tokens_out = hs[:, 2 : 2 + self.num_mask_tokens]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        upscaled = act1(ln1(dc1(src) + feat_s1))
        upscaled = act2(dc2(upscaled) + feat_s0)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        object_score_logits = self.pred_obj_score_head(hs[:, 0])
        return masks, iou_pred, mask_tokens_out, object_score_logits


class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        grid = torch.ones((h, w), device=self.positional_encoding_gaussian_matrix.device)
        y = (grid.cumsum(0) - 0.5) / h
        x = (grid.cumsum(1) - 0.5) / w
        return self._pe_encoding(torch.stack([x, y], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._pe_encoding(coords.to(torch.float))


class PromptEncoder(nn.Module):
    """SAM2's PromptEncoder: points (padded with a label -1 point when there is no box), dense no-mask embed."""

    def __init__(
        self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int]
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, 4, kernel_size=2, stride=2),
            LayerNorm2d(4),
            nn.GELU(),
            nn.Conv2d(4, 8, kernel_size=2, stride=2),
            LayerNorm2d(8),
            nn.GELU(),
            nn.Conv2d(8, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5
        if pad:
            points = torch.cat([points, torch.zeros((points.shape[0], 1, 2), device=points.device)], dim=1)
            labels = torch.cat(
                [labels, -torch.ones((labels.shape[0], 1), device=labels.device, dtype=labels.dtype)], dim=1
            )
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels.unsqueeze(-1)
        emb = torch.where(lab == -1, torch.zeros_like(emb) + self.not_a_point_embed.weight, emb)
        for i, pe in enumerate(self.point_embeddings):
            emb = torch.where(lab == i, emb + pe.weight, emb)
        return emb

    def forward(self, points, boxes, masks):
        bs = points[0].shape[0] if points is not None else masks.shape[0]
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=(boxes is None))], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense


class _HieraAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)  # Hiera's names, shared with InternViT
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(F.scaled_dot_product_attention(q, k, v))


class _HieraBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _HieraAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 2 * dim, dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, N, C]
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck: ``backbone_fpn`` at strides 4, 8, 16 (real: 256², 128², 64² for 1024²)."""

    def __init__(self, d_model: int, trunk_dim: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Module()
        self.trunk.patch_embed = nn.Conv2d(3, trunk_dim, kernel_size=4, stride=4)
        self.trunk.blocks = nn.ModuleList([_HieraBlock(trunk_dim)])
        self.trunk.downsample = nn.ModuleList(nn.Conv2d(trunk_dim, trunk_dim, 2, stride=2) for _ in range(2))
        self.neck = nn.Module()
        self.neck.convs = nn.ModuleList(nn.Conv2d(trunk_dim, d_model, 1) for _ in range(3))

    def forward(self, sample: torch.Tensor) -> dict:
        x = self.trunk.patch_embed(sample)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        for block in self.trunk.blocks:
            t = block(t)
        f0 = t.transpose(1, 2).reshape(b, c, h, w)
        f1 = self.trunk.downsample[0](f0)
        f2 = self.trunk.downsample[1](f1)
        fpn = [conv(f) for conv, f in zip(self.neck.convs, (f0, f1, f2), strict=True)]
        pos = [torch.zeros_like(f) for f in fpn]
        return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}


class _MemoryAttentionLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim, 2)
        self.cross_attn_image = Attention(dim, 2)


class SAM2Base(nn.Module):
    """The parts of Sa2VA's SAM2 video predictor (``sam2.py``) that a single-image forward touches."""

    def __init__(self, *, image_size: int = 64, hidden_dim: int = 32) -> None:
        super().__init__()
        self.image_size = image_size
        self.hidden_dim = hidden_dim
        self.num_feature_levels = 3
        self.use_high_res_features_in_sam = True
        self.directly_add_no_mem_embed = True
        self.multimask_output_in_sam = True
        self.multimask_min_pt_num = 0
        self.multimask_max_pt_num = 1
        self.multimask_output_for_tracking = True
        self.pred_obj_scores = True
        self.sam_prompt_embed_dim = hidden_dim
        self.sam_image_embedding_size = image_size // 16
        self.image_encoder = ImageEncoder(hidden_dim)
        self.no_mem_embed = nn.Parameter(0.02 * torch.randn(1, 1, hidden_dim))
        self.memory_attention = nn.Module()
        self.memory_attention.layers = nn.ModuleList([_MemoryAttentionLayer(hidden_dim)])
        emb = self.sam_image_embedding_size
        self.sam_prompt_encoder = PromptEncoder(hidden_dim, (emb, emb), (image_size, image_size))
        self.sam_mask_decoder = MaskDecoder(hidden_dim)
        self.obj_ptr_proj = MLP(hidden_dim, hidden_dim, hidden_dim, 3)

    def forward_image(self, img_batch: torch.Tensor) -> dict:
        backbone_out = self.image_encoder(img_batch)
        if self.use_high_res_features_in_sam:
            fpn = backbone_out["backbone_fpn"]
            fpn[0] = self.sam_mask_decoder.conv_s0(fpn[0])
            fpn[1] = self.sam_mask_decoder.conv_s1(fpn[1])
        return backbone_out

    def _prepare_backbone_features(self, backbone_out: dict):
        backbone_out = backbone_out.copy()
        feature_maps = backbone_out["backbone_fpn"][-self.num_feature_levels :]
        vision_pos_embeds = backbone_out["vision_pos_enc"][-self.num_feature_levels :]
        feat_sizes = [(x.shape[-2], x.shape[-1]) for x in vision_pos_embeds]
        vision_feats = [x.flatten(2).permute(2, 0, 1) for x in feature_maps]
        vision_pos_embeds = [x.flatten(2).permute(2, 0, 1) for x in vision_pos_embeds]
        return backbone_out, vision_feats, vision_pos_embeds, feat_sizes

    def _use_multimask(self, is_init_cond_frame: bool, point_inputs) -> bool:
        num_pts = 0 if point_inputs is None else point_inputs["point_labels"].size(1)
        return (
            self.multimask_output_in_sam
            and (is_init_cond_frame or self.multimask_output_for_tracking)
            and (self.multimask_min_pt_num <= num_pts <= self.multimask_max_pt_num)
        )

    def _forward_sam_heads(
        self,
        backbone_features,
        point_inputs=None,
        mask_inputs=None,
        high_res_features=None,
        multimask_output=False,
        language_embd=None,
    ):
        """Sa2VA's extension of SAM2's heads (language_embd appended to the sparse prompts)."""
        b = backbone_features.size(0)
        device = backbone_features.device
        if point_inputs is not None:
            coords, labels = point_inputs["point_coords"], point_inputs["point_labels"]
        else:
            coords = torch.zeros(b, 1, 2, device=device)
            labels = -torch.ones(b, 1, dtype=torch.int32, device=device)
        sparse, dense = self.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=mask_inputs)
        if language_embd is not None:
            sparse = torch.cat([sparse, language_embd], dim=1)
        low_res_multimasks, ious, sam_output_tokens, object_score_logits = self.sam_mask_decoder(
            image_embeddings=backbone_features,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=False,
            high_res_features=high_res_features,
        )
        low_res_multimasks = low_res_multimasks.float()
        high_res_multimasks = F.interpolate(
            low_res_multimasks, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        sam_output_token = sam_output_tokens[:, 0]
        if multimask_output:
            best = torch.argmax(ious, dim=-1)
            batch = torch.arange(b, device=device)
            low_res_masks = low_res_multimasks[batch, best].unsqueeze(1)
            high_res_masks = high_res_multimasks[batch, best].unsqueeze(1)
            if sam_output_tokens.size(1) > 1:
                sam_output_token = sam_output_tokens[batch, best]
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks
        obj_ptr = self.obj_ptr_proj(sam_output_token)
        return (
            low_res_multimasks,
            high_res_multimasks,
            ious,
            low_res_masks,
            high_res_masks,
            obj_ptr,
            object_score_logits,
        )


class SAM2(nn.Module):
    """The ``grounding_encoder`` wrapper of the HF ``sam2.py``."""

    def __init__(self, *, image_size: int = 64, hidden_dim: int = 32) -> None:
        super().__init__()
        self.sam2_model = SAM2Base(image_size=image_size, hidden_dim=hidden_dim)
        self.hidden_dim = self.sam2_model.hidden_dim
        self.img_mean = (0.485, 0.456, 0.406)
        self.img_std = (0.229, 0.224, 0.225)

    def preprocess_image(self, image: torch.Tensor) -> torch.Tensor:
        image = image / 255.0
        mean = torch.tensor(self.img_mean, dtype=image.dtype, device=image.device)[:, None, None]
        std = torch.tensor(self.img_std, dtype=image.dtype, device=image.device)[:, None, None]
        image -= mean
        image /= std
        return image


def _text_hidden_fcs(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim), nn.Dropout(0.0)
    )


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
        self.text_hidden_fcs = _text_hidden_fcs(llm_hidden, self.grounding_encoder.hidden_dim)
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


class Sa2VAChatModelQwen(nn.Module):
    """Qwen-VL-flavour remote model (``modeling_sa2va_qwen.py``)."""

    def __init__(self, config, model: nn.Module, *, sam_image_size: int = 64, sam_dim: int = 32) -> None:
        super().__init__()
        self.config = config
        self.min_pixels = 4 * 8 * 8  # real: 512 * 28 * 28 (factor = patch 14 x merge 2)
        self.max_pixels = 16 * 8 * 8  # real: 2048 * 28 * 28
        self.model = model
        self.grounding_encoder = SAM2(image_size=sam_image_size, hidden_dim=sam_dim)
        self.text_hidden_fcs = _text_hidden_fcs(
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
