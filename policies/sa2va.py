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
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from policies.lora import ARCHITECTURE_TO_BACKBONE

log = logging.getLogger(__name__)

SEG_TOKEN = "[SEG]"
DEFAULT_ANSWER = "It is [SEG]."
"""Teacher-forced answer (one of Sa2VA's SFT ANSWER_LIST forms); the template's SUFFIX is appended."""
INTERNVL_IMAGE_TOKENS = ("<img>", "<IMG_CONTEXT>", "</img>")
QWEN_IMAGE_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Hard-coded in the remote ``preparing_for_generation`` and the training datasets (they override the config).
MIN_DYNAMIC_PATCH = 1
MAX_DYNAMIC_PATCH = 12
USE_THUMBNAIL = True
# Sa2VAChatModelQwen.min_pixels / max_pixels (single-image training values), used if the remote lacks them.
QWEN_MIN_PIXELS = 512 * 28 * 28
QWEN_MAX_PIXELS = 2048 * 28 * 28

PROMPT_TEMPLATES: dict[str, dict[str, Any]] = {
    # Sa2VA's templates.py (xtuner's table) for the templates its checkpoints name; the checkpoint's own table
    # (PROMPT_TEMPLATE in the remote module) takes precedence when it is importable.
    "qwen_chat": {
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "SUFFIX": "<|im_end|>",
    },
    "internlm2_chat": {
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "SUFFIX": "<|im_end|>",
    },
    "phi3_chat": {"INSTRUCTION": "<|user|>\n{input}<|end|>\n<|assistant|>\n", "SUFFIX": "<|end|>"},
    "llama3_chat": {
        "INSTRUCTION": (
            "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "SUFFIX": "<|eot_id|>",
    },
}

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


# ------------------------------------------------------------------------------------------------ preprocessing
def as_uint8_images(images: Any) -> np.ndarray:
    """uint8 [B, H, W, 3] (numpy or torch; [H, W, 3] is promoted to a batch of one) -> contiguous numpy."""
    arr = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B,H,W,3], got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        integral = np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 255
        if not integral:
            raise ValueError(f"images must be uint8 RGB in [0, 255], got dtype {arr.dtype}")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def direct_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Sa2VA's DirectResize: PIL resize to size x size ignoring the aspect ratio (PIL's default filter)."""
    from PIL import Image

    return np.array(Image.fromarray(image).resize((size, size)))


def _closest_grid(aspect: float, grids: list[tuple[int, int]], width: int, height: int, size: int):
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * size * size * grid[0] * grid[1]:
            best = grid  # a tie goes to the larger grid only if the image is big enough to fill it
    return best


def dynamic_tiles(image, *, min_num: int, max_num: int, image_size: int, use_thumbnail: bool) -> list:
    """InternVL's dynamic tiling of a PIL image: the (cols, rows) grid with cols*rows in [min_num, max_num] whose
    aspect ratio is closest to the image's; image_size² crops row-major, plus a thumbnail if > 1 tile."""
    width, height = image.size
    grids = sorted(
        {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        },
        key=lambda g: g[0] * g[1],
    )
    cols, rows = _closest_grid(width / height, grids, width, height, image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def _normalize_tile(tile, size: int) -> torch.Tensor:
    """Sa2VA's ``transformer``: RGB, Resize((size, size), BICUBIC) (a no-op for tiles), ToTensor, Normalize."""
    from PIL import Image

    tile = tile.convert("RGB")
    if tile.size != (size, size):
        tile = tile.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return x.sub(mean).div(std)


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


def set_attention(lm: nn.Module, name: str) -> None:
    """Set a transformers LLM's attention implementation ("sdpa", "eager") across transformers versions."""
    if hasattr(lm, "set_attn_implementation"):  # transformers >= 4.56
        lm.set_attn_implementation(name)
    else:
        lm.config._attn_implementation = name


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
        self._ids_cache: dict[tuple, list[int]] = {}
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
        name = getattr(self.model.config, "template", None)
        return None if name is None else str(name).replace("-", "_")

    @property
    def template(self) -> dict[str, Any] | None:
        """The prompt template named by ``model.config.template``: the checkpoint's own PROMPT_TEMPLATE table
        if its module has one, else this module's copy. None only for Qwen-VL without a template (the
        processor's chat template is used then, as the remote ``predict_forward`` does)."""
        name = self.template_name
        if name is None:
            if self.flavour == "internvl":
                raise ValueError(
                    "model.config.template is missing: Sa2VA's InternVL models name their template"
                )
            return None
        table = getattr(sys.modules.get(type(self.model).__module__), "PROMPT_TEMPLATE", None) or {}
        if name in table:
            return dict(table[name])
        if name in PROMPT_TEMPLATES:
            return dict(PROMPT_TEMPLATES[name])
        known = sorted(set(table) | set(PROMPT_TEMPLATES))
        raise ValueError(f"model.config.template {name!r} is not a known prompt template; known: {known}")

    # ------------------------------------------------------------------------------------- prompts
    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        """Token ids of the templated turn with ``n_image_tokens`` image placeholders + the answer + SUFFIX.

        As Sa2VA's training: the instruction is encoded with special tokens (BOS for InternLM2 tokenizers,
        none for Qwen), the answer without; "<image>" is replaced by start + context x N + end tokens.
        """
        key = (self.template_name, prompt, n_image_tokens, self.answer)
        if key in self._ids_cache:
            return self._ids_cache[key]
        if SEG_TOKEN not in self.answer:
            raise ValueError(f"the teacher-forced answer must contain {SEG_TOKEN}, got {self.answer!r}")
        template = self.template
        if template is not None:
            start, context, end = INTERNVL_IMAGE_TOKENS if self.flavour == "internvl" else QWEN_IMAGE_TOKENS
            user = prompt if "<image>" in prompt else "<image>\n" + prompt
            text = user.replace("<image>", start + context * n_image_tokens + end, 1).strip()
            instruction = template["INSTRUCTION"].format(input=text, round=1, bot_name="BOT")
            suffix = template.get("SUFFIX", "")
        else:
            content = [{"type": "image"}, {"type": "text", "text": prompt.replace("<image>", "").strip()}]
            messages = [{"role": "user", "content": content}]
            instruction = self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            pad = getattr(self.processor, "image_token", QWEN_IMAGE_TOKENS[1])
            if instruction.count(pad) != 1:
                raise ValueError(f"the processor's chat template should hold one {pad!r}: {instruction!r}")
            instruction = instruction.replace(pad, pad * n_image_tokens)
            suffix = self.tokenizer.eos_token or ""
        ids = list(self.tokenizer.encode(instruction))
        ids += list(self.tokenizer.encode(self.answer + suffix, add_special_tokens=False))
        found = ids.count(self.img_context_token_id)
        if found != n_image_tokens:
            raise RuntimeError(
                f"tokenizing the prompt gave {found} image tokens for {n_image_tokens} embeddings"
            )
        self._ids_cache[key] = ids
        return ids

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
        pixels = torch.stack([_normalize_tile(t, size) for t in tiles])
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
    def _seg_hidden_internvl(self, vision: torch.Tensor, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([self.prompt_ids(prompt, vision.shape[0])], device=self.device)
        lm = self.model.language_model
        emb = lm.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == self.img_context_token_id)[..., None], vision.to(emb.dtype))
        # the decoder without the LM head: logits over the vocabulary are not needed for the mask
        body = lm.model if isinstance(getattr(lm, "model", None), nn.Module) else lm
        out = body(inputs_embeds=emb, attention_mask=torch.ones_like(ids), use_cache=False)
        return ids[0], out.last_hidden_state[0]

    def _rope_index(self, vl: nn.Module, ids: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Qwen-VL's 3-D M-RoPE positions; get_rope_index's signature differs across transformers versions."""
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "image_grid_thw": grid,
            "attention_mask": torch.ones_like(ids),
        }
        if "mm_token_type_ids" in inspect.signature(vl.get_rope_index).parameters:
            kwargs["mm_token_type_ids"] = (ids == self.img_context_token_id).int()  # text 0, image 1
        return vl.get_rope_index(**kwargs)[0]

    def _seg_hidden_qwen(self, f: Sa2VAFeatures, i: int, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        vl = self.model.model.model
        grid = f.grid_thw[i]
        n_tokens = int(grid.prod()) // int(vl.visual.spatial_merge_size) ** 2
        ids = torch.tensor([self.prompt_ids(prompt, n_tokens)], device=self.device)
        mask = torch.ones_like(ids)
        positions = self._rope_index(vl, ids, grid)
        vision = f.vision[i]
        if vision is not None:
            emb = vl.get_input_embeddings()(ids)
            emb = emb.masked_scatter((ids == self.img_context_token_id)[..., None], vision.to(emb.dtype))
            out = vl.language_model(
                inputs_embeds=emb, attention_mask=mask, position_ids=positions, use_cache=False
            )
        else:
            out = vl(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                pixel_values=f.pixel_values[i],
                image_grid_thw=grid,
                use_cache=False,
            )
        return ids[0], out.last_hidden_state[0]

    def seg_hidden_states(self, features: Sa2VAFeatures, prompts: Sequence[str]) -> torch.Tensor:
        """[B, D]: the LLM's last-layer (post-norm) hidden state at the answer's [SEG] token, one image at a
        time (sequence lengths differ with the tile count; the remote code has no batched path either)."""
        rows = []
        for i, prompt in enumerate(prompts):
            if self.flavour == "internvl":
                ids, hidden = self._seg_hidden_internvl(features.vision[i], prompt)
            else:
                ids, hidden = self._seg_hidden_qwen(features, i, prompt)
            seg = (ids == self.seg_token_idx).nonzero()[-1, 0]  # the answer's [SEG] (the last one)
            rows.append(hidden[seg])
        return torch.stack(rows)

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
            best = ious.argmax(dim=-1)
            masks = masks[torch.arange(b, device=masks.device), best].unsqueeze(1)
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

    # ------------------------------------------------------------------------------------- checks
    @contextlib.contextmanager
    def answering(self, answer: str) -> Iterator[None]:
        """Temporarily teacher-force another answer (e.g. the text the model generated)."""
        previous, self.answer = self.answer, answer
        try:
            yield
        finally:
            self.answer = previous

    @contextlib.contextmanager
    def remote_generation(self) -> Iterator[None]:
        """Within: the remote ``predict_forward`` can run. Its set-up (``preparing_for_generation``, which
        ``predict_forward`` runs on first use) casts the whole model to one dtype, bfloat16 by default. Here it
        runs with the backbone's dtype, and every tensor it cast (the float32 trained heads of a bfloat16 load)
        gets its own dtype and exact value back on exit."""
        remote = self.model
        dtype = _param_dtype(self.sam2.image_encoder)
        tensors = dict(remote.named_parameters())
        tensors.update(remote.named_buffers())
        saved = {
            n: t.detach().clone() for n, t in tensors.items() if t.is_floating_point() and t.dtype != dtype
        }
        prepare = getattr(remote, "preparing_for_generation", None)
        try:
            if prepare is not None and "torch_dtype" in inspect.signature(prepare).parameters:
                prepare(self.tokenizer, torch_dtype=dtype)
            elif prepare is not None:
                prepare(self.tokenizer)
            yield
        finally:
            for n, t in tensors.items():
                if n in saved:
                    t.data = saved[n]

    @torch.no_grad()
    def sam_heads_difference(
        self,
        images: Any,
        language_embd: torch.Tensor | None = None,
        *,
        features: Sa2VAFeatures | None = None,
    ) -> float:
        """max |ours - remote| of the selected low-res logits: :meth:`decode` on cached features (``features``
        if given, else :meth:`encode`) vs the remote ``forward_image`` -> ``_prepare_backbone_features`` ->
        ``_forward_sam_heads`` (Sa2VA's training path) on the same language embedding (random if not given)."""
        arr = as_uint8_images(images)
        sam2 = self.sam2
        if language_embd is None:
            language_embd = torch.randn(
                len(arr), 1, int(self.model.grounding_encoder.hidden_dim), device=self.device
            )
        ours = self.decode((features if features is not None else self.encode(arr)).fpn, language_embd)
        with self._sam_autocast():
            feats = sam2.forward_image(self.sam_pixels(arr))
            _, vision_feats, _, feat_sizes = sam2._prepare_backbone_features(feats)
            b, c = vision_feats[-1].shape[1], vision_feats[-1].shape[2]
            pix = (vision_feats[-1] + sam2.no_mem_embed).permute(1, 2, 0).reshape(b, c, *feat_sizes[-1])
            high_res = [
                x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *s)
                for x, s in zip(vision_feats[:-1], feat_sizes[:-1], strict=True)
            ]
            remote = sam2._forward_sam_heads(
                backbone_features=pix,
                point_inputs=None,
                mask_inputs=None,
                high_res_features=high_res,
                multimask_output=sam2._use_multimask(is_init_cond_frame=True, point_inputs=None),
                language_embd=language_embd,
            )[3]
        return float((ours - remote.float()).abs().max())


@torch.no_grad()
def remote_training_seg_hidden(model: Sa2VAModel, image: np.ndarray, prompt: str) -> torch.Tensor:
    """[D]: the [SEG] hidden state of the remote *training* forward (``Sa2VAChatModel.forward``, InternVL
    flavour) on the adapter's token ids and tiles: ``hidden_states[-1]`` at the answer's [SEG]."""
    from PIL import Image

    if model.flavour != "internvl":
        raise NotImplementedError("the remote training forward is compared for the InternVL flavour only")
    remote = model.model
    size = int(getattr(remote.config, "force_image_size", None) or remote.config.vision_config.image_size)
    tiles = dynamic_tiles(Image.fromarray(as_uint8_images(image)[0]), min_num=MIN_DYNAMIC_PATCH,
                          max_num=MAX_DYNAMIC_PATCH, image_size=size, use_thumbnail=USE_THUMBNAIL)  # fmt: skip
    pixels = torch.stack([_normalize_tile(t, size) for t in tiles]).to(model.device)
    n_tokens = len(tiles) * int(remote.num_image_token)
    ids = torch.tensor([model.prompt_ids(prompt, n_tokens)], device=model.device)
    if not hasattr(remote, "_count"):
        remote._count = 0  # a counter Sa2VA's training loop sets before the first forward
    out = remote({"pixel_values": [pixels], "input_ids": ids, "position_ids": None,
                  "attention_mask": torch.ones_like(ids), "labels": None})  # fmt: skip
    seg = (ids[0] == model.seg_token_idx).nonzero()[-1, 0]
    return out.hidden_states[-1][0, seg]


@torch.no_grad()
def compare_with_remote(
    model: Sa2VAModel,
    image: np.ndarray,
    prompt: str,
    *,
    force_answer: str | None = None,
    features: Sa2VAFeatures | None = None,
    heads: bool = True,
) -> dict[str, Any]:
    """The adapter against the checkpoint's own ``predict_forward`` on one image.

    The remote generates an answer (``force_answer`` forces its tokens, e.g. "It is [SEG]." for a randomly
    initialised model, which never emits [SEG] by itself); the adapter teacher-forces the same answer up to
    its [SEG]; our ``logits > 0`` is compared with the remote's ``sigmoid > 0.5`` mask. Also reports
    :meth:`Sa2VAModel.sam_heads_difference` unless ``heads`` is False, and (InternVL) the [SEG] hidden state
    against the remote training forward (:func:`remote_training_seg_hidden`). ``features``: the image's cached
    :meth:`Sa2VAModel.encode` output, to save an encode. Runs on CPU too (the remote's ``.cuda()`` calls are
    redirected to the model's device) and leaves every parameter's dtype and value as it found them.
    """
    from PIL import Image

    from policies.compat import forced_generation, remote_inference_on

    arr = as_uint8_images(image)[0]
    features = features if features is not None else model.encode(arr[None])
    kwargs: dict[str, Any] = {"tokenizer": model.tokenizer}
    if model.flavour == "qwen_vl":
        kwargs["processor"] = model.processor
    text = prompt if "<image>" in prompt else "<image>\n" + prompt
    forced = contextlib.nullcontext()
    if force_answer is not None:
        ids = list(
            model.tokenizer.encode(force_answer + (model.tokenizer.eos_token or ""), add_special_tokens=False)
        )
        lm = model.model.language_model if model.flavour == "internvl" else model.model.model
        forced = forced_generation(lm, ids)
    with model.remote_generation(), remote_inference_on(model.model, model.device), forced:
        result = model.model.predict_forward(image=Image.fromarray(arr), text=text, **kwargs)
    prediction = str(result["prediction"])
    report: dict[str, Any] = {"prediction": prediction}
    if heads:
        report["sam_heads_max_abs_diff"] = model.sam_heads_difference(arr, features=features)
    if model.flavour == "internvl":
        ours = model.seg_hidden_states(features, [prompt])[0]
        theirs = remote_training_seg_hidden(model, arr, prompt)
        report["seg_hidden_max_abs_diff"] = float((ours.float() - theirs.float()).abs().max())
        report["seg_hidden_abs_max"] = float(theirs.abs().max())
    if SEG_TOKEN not in prediction or not result["prediction_masks"]:
        report["error"] = "the model generated no [SEG]; nothing to compare"
        return report
    answer = prediction[: prediction.index(SEG_TOKEN) + len(SEG_TOKEN)]
    with model.answering(answer):
        logits = model(arr[None], [prompt], features=features)[0]
    ours = (logits > 0).cpu().numpy()
    theirs = np.asarray(result["prediction_masks"][0])[0].astype(bool)
    union = np.logical_or(ours, theirs).sum()
    report.update(
        answer=answer,
        remote_mask_fraction=float(theirs.mean()),
        mask_iou=float(np.logical_and(ours, theirs).sum() / union) if union else 1.0,
        pixel_agreement=float((ours == theirs).mean()),
        logit_abs_mean=float(logits.abs().mean()),
    )
    return report


# ------------------------------------------------------------------------------------------------ export
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
