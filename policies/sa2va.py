"""Sa2VA adapter: a real Sa2VA HF checkpoint behind TinySa2VA's ``encode`` / ``forward`` interface.

Sa2VA's own code has no differentiable path to mask logits (``generate`` is no_grad, SAM2's video propagation
is inference_mode, masks come back binarised). This module re-implements Sa2VA's *training* forward against
the remote-code objects (docs/sa2va_adapter.md), as one teacher-forced pass:

    image ─┬─ DirectResize(S) ─ grounding_encoder.preprocess_image ─ sam2.image_encoder ─▶ FPN levels  (cached)
           ├─ InternVL: dynamic 448² tiles + thumbnail ─ extract_feature (ViT, pixel shuffle, mlp1) ─┐ (cached)
           └─ Qwen-VL : image_processor(min/max pixels) ─ visual tower ───────────────────────────────┤
    template.INSTRUCTION("<image>\\n" + prompt) + "It is [SEG]." + SUFFIX ─ tokenizer ─ embed, scatter ◀┘
      ─ language model (LoRA) ─ last hidden state at [SEG] ─ text_hidden_fcs ─▶ e [B, 1, 256]
    FPN ─ sam_mask_decoder.conv_s0/conv_s1 (high-res), top level + no_mem_embed
      ─ sam_prompt_encoder(one padding point) ++ e ─ sam_mask_decoder(multimask) ─ best predicted IoU
      ─ low-res logits [B, 1, 256, 256] ─ bilinear to S² then to H x W ─▶ logits [B, H, W]

S = ``sam2_model.image_size`` (1024). Everything up to the cached features runs under no_grad; gradients reach
the LLM's LoRA, ``text_hidden_fcs`` and the whole mask decoder (conv_s0/conv_s1 included, which is why the cache
holds the FPN levels *before* those convolutions). docs/sa2va_adapter.md lists what is verified and what not.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from policies.compat import set_attention
from policies.lora import ARCHITECTURE_TO_BACKBONE
from policies.sa2va_preprocess import (
    MAX_DYNAMIC_PATCH,
    MIN_DYNAMIC_PATCH,
    USE_THUMBNAIL,
    as_uint8_images,
    direct_resize,
    dynamic_tiles,
    normalize_tile,
)
from policies.sa2va_prompts import (
    DEFAULT_ANSWER,
    INTERNVL_IMAGE_TOKENS,
    QWEN_IMAGE_TOKENS,
    SEG_TOKEN,
    RowLayout,
    encode_prompt,
    gather_seg,
    pack_rows,
    prompt_template,
    scatter_rows,
    template_name,
)

log = logging.getLogger(__name__)

# Sa2VAChatModelQwen.min_pixels / max_pixels (single-image training values), used if the remote lacks them.
QWEN_MIN_PIXELS = 512 * 28 * 28
QWEN_MAX_PIXELS = 2048 * 28 * 28

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Sa2VALoadError(OSError):
    """A Sa2VA checkpoint could not be loaded (missing folder, no hub access, incompatible remote code)."""


# ------------------------------------------------------------------------------------------------ features
@dataclass
class Sa2VAFeatures:
    """Frozen features of B images, computed once by :meth:`Sa2VAModel.encode` and reused.

    fpn: SAM2 ``backbone_fpn`` levels *before* the decoder's conv_s0/conv_s1, each [B, C, h_l, w_l]
        (real model: C = 256 at 256², 128², 64²; about 43 MB per image in bfloat16).
    vision: per image, the MLLM's vision embeddings [N_i, D] (InternVL: tiles x 256 tokens; Qwen-VL: merged
        patches), or None where the vision tower must run inside the LLM call (Qwen3-VL deepstack).
    grid_thw: per image, Qwen-VL's ``image_grid_thw`` [1, 3] (None for InternVL).
    pixel_values: per image, Qwen-VL processor pixels, kept only when ``vision`` is None.
    sizes: per image, the original (H, W).
    """

    fpn: tuple[torch.Tensor, ...]
    vision: list[torch.Tensor | None]
    grid_thw: list[torch.Tensor | None]
    pixel_values: list[torch.Tensor | None]
    sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return self.fpn[0].shape[0]

    def index(self, idx: torch.Tensor | Sequence[int] | slice | int) -> Sa2VAFeatures:
        rows = torch.atleast_1d(torch.arange(len(self))[idx])
        pick = rows.tolist()
        return Sa2VAFeatures(
            fpn=tuple(level[rows.to(level.device)] for level in self.fpn),
            vision=[self.vision[i] for i in pick],
            grid_thw=[self.grid_thw[i] for i in pick],
            pixel_values=[self.pixel_values[i] for i in pick],
            sizes=[self.sizes[i] for i in pick],
        )

    def to(self, device: torch.device | str) -> Sa2VAFeatures:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Sa2VAFeatures(
            fpn=tuple(level.to(device) for level in self.fpn),
            vision=[move(t) for t in self.vision],
            grid_thw=[move(t) for t in self.grid_thw],
            pixel_values=[move(t) for t in self.pixel_values],
            sizes=list(self.sizes),
        )

    @staticmethod
    def cat(parts: Sequence[Sa2VAFeatures]) -> Sa2VAFeatures:
        return Sa2VAFeatures(
            fpn=tuple(torch.cat(levels) for levels in zip(*(p.fpn for p in parts), strict=True)),
            vision=[t for p in parts for t in p.vision],
            grid_thw=[t for p in parts for t in p.grid_thw],
            pixel_values=[t for p in parts for t in p.pixel_values],
            sizes=[s for p in parts for s in p.sizes],
        )


# ------------------------------------------------------------------------------------------------ remote layout
def _flavour(remote: nn.Module) -> str:
    for attr in ("grounding_encoder", "text_hidden_fcs"):
        if not hasattr(remote, attr):
            raise TypeError(f"{type(remote).__name__} is not a Sa2VA model: it has no '{attr}'")
    if hasattr(remote, "language_model") and hasattr(remote, "extract_feature"):
        return "internvl"
    inner = getattr(remote, "model", None)
    if inner is not None and hasattr(getattr(inner, "model", None), "visual"):
        if not hasattr(inner.model, "language_model"):
            raise TypeError("Qwen-VL model without model.model.language_model; use transformers >= 4.52")
        return "qwen_vl"
    if inner is not None and hasattr(inner, "visual"):
        raise TypeError(
            f"{type(inner).__name__} has the pre-4.52 transformers layout (model.visual, model.model.layers): "
            "the LoRA tables expect model.model.language_model.layers; use transformers >= 4.52 "
            "(Sa2VA's Qwen-VL checkpoints were released for 4.57)"
        )
    raise TypeError(
        f"{type(remote).__name__} matches neither Sa2VA flavour: expected language_model + extract_feature "
        "(InternVL) or model.model.visual + model.model.language_model (Qwen-VL)"
    )


def _backbone(remote: nn.Module, flavour: str) -> str:
    if flavour == "internvl":
        llm_config = getattr(remote.config, "llm_config", None)
        archs = list(getattr(llm_config, "architectures", None) or []) or [
            type(remote.language_model).__name__
        ]
    else:
        archs = [type(remote.model).__name__]
    for arch in archs:
        if arch in ARCHITECTURE_TO_BACKBONE:
            return ARCHITECTURE_TO_BACKBONE[arch]
    raise ValueError(
        f"no LoRA target table for language model architecture {archs[0]!r}; "
        f"known: {sorted(ARCHITECTURE_TO_BACKBONE)}"
    )


def _token_id(tokenizer: Any, token: str) -> int:
    idx = tokenizer.convert_tokens_to_ids(token)
    if idx is None or idx == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token: is this a Sa2VA checkpoint's tokenizer?")
    return int(idx)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def use_sdpa(lm: nn.Module) -> str:
    """Switch a transformers LLM from eager attention to SDPA; returns the implementation now in use.

    Without flash-attn, the remote ``__init__`` sets ``llm_config._attn_implementation = "eager"``, which
    materialises every [tokens x tokens] attention matrix (a 1024-px image gives about 2,600 tokens). SDPA
    computes the same attention (tested to 1e-5) with fused kernels. Remote-code LLMs (InternLM2, Phi-3 here)
    that do not declare SDPA support are left as they are."""
    config = getattr(lm, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current != "eager" or not getattr(lm, "_supports_sdpa", False):
        return str(current)
    set_attention(lm, "sdpa")
    return str(config._attn_implementation)


def _pooled_image_embeddings(out: Any) -> torch.Tensor:
    """``get_image_features`` returns split embeddings (transformers 4.5x) or an output with ``pooler_output``."""
    emb = getattr(out, "pooler_output", out)
    if isinstance(emb, (tuple, list)):
        emb = torch.cat(list(emb), dim=0)
    return emb


# ------------------------------------------------------------------------------------------------ the model
class Sa2VAModel(nn.Module):
    """A Sa2VA remote-code model (``self.model``) with a differentiable ``forward -> logits [B, H, W]``.

    Attributes: ``flavour`` ("internvl" | "qwen_vl"), ``backbone`` (LoRA table key of policies/lora.py),
    ``seg_token_idx``, ``img_context_token_id``, ``template`` (read from ``model.config.template`` on use),
    ``answer`` (the teacher-forced answer, must contain [SEG]).
    """

    def __init__(
        self, remote: nn.Module, tokenizer: Any, processor: Any | None = None, *, answer: str = DEFAULT_ANSWER
    ) -> None:
        super().__init__()
        self.flavour = _flavour(remote)
        if self.flavour == "qwen_vl" and processor is None:
            raise ValueError("a Qwen-VL Sa2VA needs processor= (AutoProcessor.from_pretrained(checkpoint))")
        lm = remote.language_model if self.flavour == "internvl" else remote.model.model.language_model
        if hasattr(lm, "peft_config"):
            raise ValueError(
                "the checkpoint's language model is already PEFT-wrapped (config.use_llm_lora): merge its LoRA "
                "first, otherwise the LoRA target names do not match"
            )
        self.model = remote
        self.tokenizer = tokenizer
        self.processor = processor
        self.answer = answer
        self.backbone = _backbone(remote, self.flavour)
        self.seg_token_idx = _token_id(tokenizer, SEG_TOKEN)
        image_tokens = INTERNVL_IMAGE_TOKENS if self.flavour == "internvl" else QWEN_IMAGE_TOKENS
        self.img_context_token_id = _token_id(tokenizer, image_tokens[1])
        if self.flavour == "internvl":
            # what the remote preparing_for_generation sets; its own forward/generate read them
            remote.img_context_token_id = self.img_context_token_id
            remote.seg_token_idx = self.seg_token_idx
            self._deepstack = False
        else:
            vision_config = getattr(remote.model.config, "vision_config", None)
            # Qwen3-VL injects intermediate ViT features into LLM layers: run the tower inside the LLM call
            self._deepstack = bool(getattr(vision_config, "deepstack_visual_indexes", None))
        _ = self.template  # unknown template names fail here, not at the first forward
        self._layouts: dict[tuple, RowLayout] = {}
        self._positions: dict[tuple, np.ndarray] = {}  # Qwen-VL M-RoPE positions per (row, grid)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = 0 if pad is None or pad == self.img_context_token_id else int(pad)
        self.attention = use_sdpa(lm)
        remote.eval()

    @classmethod
    def from_modules(
        cls, remote_model: nn.Module, tokenizer: Any, processor: Any | None = None, **kwargs: Any
    ) -> Sa2VAModel:
        """Wrap an already-built remote model (tests, or a model loaded some other way)."""
        return cls(remote_model, tokenizer, processor, **kwargs)

    # ------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def sam2(self) -> nn.Module:
        return self.model.grounding_encoder.sam2_model

    @property
    def template_name(self) -> str | None:
        return template_name(self.model)

    @property
    def template(self) -> dict[str, Any] | None:
        """The prompt template named by ``model.config.template`` (policies/sa2va_prompts.py)."""
        return prompt_template(self.model, self.flavour)

    # ------------------------------------------------------------------------------------- prompts
    def prompt_layout(self, prompt: str, n_image_tokens: int) -> RowLayout:
        """The teacher-forced row of ``prompt`` with ``n_image_tokens`` image tokens (cached):
        :func:`policies.sa2va_prompts.encode_prompt` and where its image tokens and [SEG] are."""
        key = (self.template_name, prompt, n_image_tokens, self.answer)
        layout = self._layouts.get(key)
        if layout is None:
            ids = encode_prompt(
                prompt,
                n_image_tokens,
                tokenizer=self.tokenizer,
                template=self.template,
                flavour=self.flavour,
                answer=self.answer,
                processor=self.processor,
            )
            layout = RowLayout.from_ids(
                ids, image_token=self.img_context_token_id, seg_token=self.seg_token_idx
            )
            if layout.image.size != n_image_tokens:
                raise RuntimeError(
                    f"tokenizing the prompt gave {layout.image.size} image tokens for {n_image_tokens} embeddings"
                )
            self._layouts[key] = layout
        return layout

    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        """Token ids of the templated turn with ``n_image_tokens`` image placeholders + the answer + SUFFIX."""
        return self.prompt_layout(prompt, n_image_tokens).ids.tolist()

    # ------------------------------------------------------------------------------------- frozen features
    def _sam_autocast(self) -> contextlib.AbstractContextManager:
        # Sa2VA runs SAM2 under bf16 autocast on CUDA, in training and inference alike; on CPU only a
        # low-precision model needs it (float32 coordinates meet bf16 weights in the prompt encoder)
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        dtype = _param_dtype(self.sam2.image_encoder)
        if dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def upcast_trainable_heads(self) -> Sa2VAModel:
        """Keep what RL trains in float32 (text_hidden_fcs, the whole SAM2 mask decoder) while the frozen
        backbone stays in bf16: small Adam updates vanish in bf16 weights. They still compute in bf16 under
        autocast, like Sa2VA's own mixed-precision training. Call before wrapping with LoRA/PEFT."""
        self.model.text_hidden_fcs.float()
        self.sam2.sam_mask_decoder.float()
        return self

    def sam_pixels(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B,H,W,3] -> SAM2 input [B,3,S,S]: DirectResize(S), cast to SAM2's dtype, preprocess_image."""
        grounding = self.model.grounding_encoder
        size = int(self.sam2.image_size)
        dtype = _param_dtype(self.sam2.image_encoder)
        pixels = [
            torch.from_numpy(direct_resize(image, size)).permute(2, 0, 1).contiguous().to(self.device, dtype)
            for image in images
        ]
        return torch.stack([grounding.preprocess_image(p) for p in pixels])

    def _internvl_vision(self, image: np.ndarray) -> torch.Tensor:
        from PIL import Image

        config = self.model.config
        size = int(getattr(config, "force_image_size", None) or config.vision_config.image_size)
        tiles = dynamic_tiles(
            Image.fromarray(image),
            min_num=MIN_DYNAMIC_PATCH,
            max_num=MAX_DYNAMIC_PATCH,
            image_size=size,
            use_thumbnail=USE_THUMBNAIL,
        )
        pixels = torch.stack([normalize_tile(t, size) for t in tiles])
        emb = self.model.extract_feature(pixels.to(self.device, _param_dtype(self.model.vision_model)))
        return emb.reshape(-1, emb.shape[-1])  # [n_tiles * tokens_per_tile, D]

    def _qwen_vision(
        self, image: np.ndarray
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        from PIL import Image

        vl = self.model.model.model
        with warnings.catch_warnings():  # transformers 5 deprecates min/max_pixels in favour of size=
            warnings.simplefilter("ignore", FutureWarning)
            out = self.processor.image_processor(
                images=[Image.fromarray(image)],
                min_pixels=getattr(self.model, "min_pixels", QWEN_MIN_PIXELS),
                max_pixels=getattr(self.model, "max_pixels", QWEN_MAX_PIXELS),
                return_tensors="pt",
            )
        pixels = torch.as_tensor(out["pixel_values"]).to(self.device, _param_dtype(vl.visual))
        grid = torch.as_tensor(out["image_grid_thw"]).to(self.device)
        if self._deepstack:
            return None, grid, pixels
        emb = _pooled_image_embeddings(vl.get_image_features(pixels, grid))
        return emb, grid, None

    @torch.no_grad()
    def encode(self, images: Any) -> Sa2VAFeatures:
        """The frozen parts of B images (SAM2 image encoder, MLLM vision tower). Cache and pass back."""
        arr = as_uint8_images(images)
        sam2 = self.sam2
        with self._sam_autocast():
            backbone_out = sam2.image_encoder(self.sam_pixels(arr))
        fpn = tuple(backbone_out["backbone_fpn"][-int(getattr(sam2, "num_feature_levels", 3)) :])
        vision, grids, pixels = [], [], []
        for image in arr:
            if self.flavour == "internvl":
                emb, grid, pix = self._internvl_vision(image), None, None
            else:
                emb, grid, pix = self._qwen_vision(image)
            vision.append(emb)
            grids.append(grid)
            pixels.append(pix)
        sizes = [(int(arr.shape[1]), int(arr.shape[2]))] * len(arr)
        return Sa2VAFeatures(fpn=fpn, vision=vision, grid_thw=grids, pixel_values=pixels, sizes=sizes)

    # ------------------------------------------------------------------------------------- language side
    def seg_hidden_states(self, features: Sa2VAFeatures, prompts: Sequence[str]) -> torch.Tensor:
        """[B, D]: the LLM's last-layer (post-norm) hidden state at each row's answer [SEG] token.

        One LLM forward over the batch: rows (whose lengths differ with the tile count and the prompt) are
        padded on the right (policies/sa2va_prompts.py says why that leaves every real token's hidden state
        as an unpadded forward computes it), the vision embeddings are written into the image tokens of all
        rows at once, and each row's [SEG] is gathered. Host work per call: cached prompt layouts, one
        host-to-device copy (Qwen-VL: plus one copy of the grids back); no per-row launches or syncs.
        """
        prompts = list(prompts)
        if len(prompts) != len(features):
            raise ValueError(f"got {len(prompts)} prompts for {len(features)} images")
        if self.flavour == "internvl":
            return self._seg_hidden_internvl(features, prompts)
        return self._seg_hidden_qwen(features, prompts)

    def _seg_hidden_internvl(self, f: Sa2VAFeatures, prompts: list[str]) -> torch.Tensor:
        rows = [self.prompt_layout(p, v.shape[0]) for p, v in zip(prompts, f.vision, strict=True)]
        packed = pack_rows(rows, pad_id=self._pad_id, device=self.device)
        lm = self.model.language_model
        emb = scatter_rows(lm.get_input_embeddings()(packed.ids), packed, torch.cat(f.vision))
        # the decoder without the LM head: logits over the vocabulary are not needed for the mask
        body = lm.model if isinstance(getattr(lm, "model", None), nn.Module) else lm
        out = body(inputs_embeds=emb, attention_mask=packed.attention_mask, use_cache=False)
        return gather_seg(out.last_hidden_state, packed)

    def _mrope_positions(self, vl: nn.Module, layout: RowLayout, grid: tuple[int, ...]) -> np.ndarray:
        """[3, L] Qwen-VL M-RoPE positions of one unpadded row (cached; computed on CPU by the model's own
        ``get_rope_index``, whose signature differs across transformers versions)."""
        key = (layout.ids.tobytes(), grid)
        if key not in self._positions:
            ids = torch.from_numpy(layout.ids)[None]
            kwargs: dict[str, Any] = {
                "input_ids": ids,
                "image_grid_thw": torch.tensor([grid]),
                "attention_mask": torch.ones_like(ids),
            }
            if "mm_token_type_ids" in inspect.signature(vl.get_rope_index).parameters:
                kwargs["mm_token_type_ids"] = (ids == self.img_context_token_id).int()  # text 0, image 1
            self._positions[key] = vl.get_rope_index(**kwargs)[0][:, 0].numpy()
        return self._positions[key]

    def _seg_hidden_qwen(self, f: Sa2VAFeatures, prompts: list[str]) -> torch.Tensor:
        vl = self.model.model.model
        merge = int(vl.visual.spatial_merge_size) ** 2
        grid = torch.cat(f.grid_thw)  # [B, 3]
        rows, positions = [], []
        for prompt, thw in zip(prompts, grid.tolist(), strict=True):  # one device-to-host copy
            rows.append(self.prompt_layout(prompt, thw[0] * thw[1] * thw[2] // merge))
            positions.append(self._mrope_positions(vl, rows[-1], tuple(thw)))
        packed = pack_rows(rows, pad_id=self._pad_id, device=self.device, positions=positions)
        cached = [v is not None for v in f.vision]
        if all(cached):
            emb = scatter_rows(vl.get_input_embeddings()(packed.ids), packed, torch.cat(f.vision))
            out = vl.language_model(
                inputs_embeds=emb,
                attention_mask=packed.attention_mask,
                position_ids=packed.positions,
                use_cache=False,
            )
        elif not any(
            cached
        ):  # Qwen3-VL deepstack: the vision tower runs inside the call, on all rows' pixels
            out = vl(
                input_ids=packed.ids,
                attention_mask=packed.attention_mask,
                position_ids=packed.positions,
                pixel_values=torch.cat(f.pixel_values),
                image_grid_thw=grid,
                use_cache=False,
            )
        else:
            raise ValueError(
                "features mix cached vision embeddings and raw pixels; encode them with one model"
            )
        return gather_seg(out.last_hidden_state, packed)

    # ------------------------------------------------------------------------------------- SAM2 heads
    def _multimask(self) -> bool:
        use = getattr(self.sam2, "_use_multimask", None)
        return True if use is None else bool(use(is_init_cond_frame=True, point_inputs=None))

    def decode(self, fpn: Sequence[torch.Tensor], language_embd: torch.Tensor) -> torch.Tensor:
        """Sa2VA's ``_forward_sam_heads`` with no points and ``language_embd`` [B, 1, C] as an extra sparse
        prompt -> the selected low-res mask logits [B, 1, 4h, 4w] (float32).

        As in training (``inject_language_embd``): frame-0 features = top level + no_mem_embed, high-res
        features through the decoder's conv_s0/conv_s1; ``multimask_output = _use_multimask(True, None)``
        (True for released checkpoints) and the candidate with the highest predicted IoU is kept.
        """
        sam2 = self.sam2
        # under PEFT this is the modules_to_save wrapper: the trainable copy, or the original in reference()
        decoder = sam2.sam_mask_decoder
        if not getattr(sam2, "directly_add_no_mem_embed", True):
            raise NotImplementedError("Sa2VA's single-frame path needs directly_add_no_mem_embed")
        with self._sam_autocast():
            levels = list(fpn)
            if getattr(sam2, "use_high_res_features_in_sam", True):
                levels[0] = decoder.conv_s0(levels[0])
                levels[1] = decoder.conv_s1(levels[1])
            pix = levels[-1] + sam2.no_mem_embed.reshape(1, -1, 1, 1)
            high_res = levels[:-1] or None
            b = pix.shape[0]
            coords = torch.zeros(b, 1, 2, device=pix.device)
            labels = -torch.ones(b, 1, dtype=torch.int32, device=pix.device)
            sparse, dense = sam2.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            sparse = torch.cat([sparse, language_embd], dim=1)
            multimask = self._multimask()
            masks, ious, _, _ = decoder(
                image_embeddings=pix,
                image_pe=sam2.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                repeat_image=False,
                high_res_features=high_res,
            )
        masks = masks.float()
        if multimask:
            masks = masks.take_along_dim(ious.argmax(dim=-1)[:, None, None, None], dim=1)
        return masks

    # ------------------------------------------------------------------------------------- full forward
    def forward(
        self, images: Any, prompts: Sequence[str], features: Sa2VAFeatures | None = None
    ) -> torch.Tensor:
        """-> mask logits [B, H, W] at each image's own resolution, with autograd through LoRA, text_hidden_fcs
        and the mask decoder. Bilinear 256² -> S² -> H x W, as the remote inference upsamples."""
        f = features if features is not None else self.encode(images)
        prompts = list(prompts)
        if len(prompts) != len(f):
            raise ValueError(f"got {len(prompts)} prompts for {len(f)} images")
        if images is not None:
            shape = tuple(as_uint8_images(images).shape[1:3])
            if any(size != shape for size in f.sizes):
                raise ValueError(f"features were computed for images of size {f.sizes[0]}, not {shape}")
        if len(set(f.sizes)) != 1:
            raise ValueError(f"a batch needs one image size, got {sorted(set(f.sizes))}")
        h, w = f.sizes[0]
        fcs = self.model.text_hidden_fcs
        hidden = self.seg_hidden_states(f, prompts).to(_param_dtype(fcs))
        language_embd = fcs(hidden)[:, None, :]  # [B, 1, C]
        low = self.decode(f.fpn, language_embd)
        size = int(self.sam2.image_size)
        full = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        return F.interpolate(full, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


# ------------------------------------------------------------------------------------------------ loading
def _looks_local(checkpoint: str) -> bool:
    """Hub ids are ``org/name``; anything absolute, relative (./, ../, ~) or deeper is a local path."""
    return checkpoint.startswith(("/", "~", ".")) or checkpoint.count("/") > 1 or "\\" in checkpoint


def _no_hub(checkpoint: str, reason: str) -> Sa2VALoadError:
    return Sa2VALoadError(
        f"could not load the Sa2VA checkpoint {checkpoint!r}: {reason}. This machine has no model-hub access: "
        "download the checkpoint where the hub is reachable (e.g. `huggingface-cli download ByteDance/Sa2VA-1B "
        "--local-dir /models/Sa2VA-1B`), copy it here and set policy.checkpoint to that folder."
    )


def load_sa2va(
    checkpoint: str,
    *,
    dtype: str = "bfloat16",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> Sa2VAModel:
    """Load a Sa2VA HF checkpoint (a local folder; hub ids only where a hub is reachable) with its remote code.

    ``dtype``: bfloat16 (what Sa2VA runs in), float16 or float32. ``device``: moved there if given.
    ``trust_remote_code``: must be True; the checkpoint's Python files run on load (refused otherwise).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path = Path(checkpoint).expanduser()
    local = path.exists() or _looks_local(checkpoint)
    if local:
        if not path.is_dir():
            raise _no_hub(checkpoint, f"{path} is not a folder")
        if not (path / "config.json").is_file():
            raise _no_hub(checkpoint, f"{path} has no config.json (not a Hugging Face checkpoint folder)")
    source = str(path) if local else checkpoint
    if not trust_remote_code:
        shipped = sorted(p.name for p in path.glob("*.py")) if local else []
        raise Sa2VALoadError(
            f"{checkpoint} loads with the Python modeling code shipped inside it"
            f"{' (' + ', '.join(shipped) + ')' if shipped else ''}, which runs with your permissions; if you trust "
            "its source, pass trust_remote_code=True (config: policy.trust_remote_code: true)"
        )

    from policies.compat import prepare

    prepare(source)  # before transformers' processors import torchvision
    import transformers
    from packaging.version import Version
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        remote = AutoModel.from_pretrained(
            source, trust_remote_code=True, low_cpu_mem_usage=True, **{dtype_key: _DTYPES[dtype]}
        )  # trust_remote_code: the caller opted in above
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
        flavour = _flavour(remote)
        processor = (
            AutoProcessor.from_pretrained(source, trust_remote_code=True) if flavour == "qwen_vl" else None
        )
    except OSError as exc:
        raise _no_hub(checkpoint, f"{type(exc).__name__}: {exc}") from exc
    except ImportError as exc:
        raise Sa2VALoadError(
            f"the remote code of {checkpoint!r} needs a missing package ({exc}); install raysys's sa2va extra "
            "(pip install -e '.[sa2va]': torchvision, timm, einops), and if it still fails, the transformers "
            "version the checkpoint was released with (docs/sa2va_adapter.md)"
        ) from exc
    model = Sa2VAModel(remote, tokenizer, processor)
    if dtype != "float32":
        model.upcast_trainable_heads()
    log.info(
        "loaded Sa2VA %s (%s flavour, %s backbone, template %s) in %s",
        checkpoint,
        model.flavour,
        model.backbone,
        model.template_name,
        dtype,
    )
    return model.to(device) if device is not None else model
