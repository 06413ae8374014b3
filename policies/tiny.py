"""TinySa2VA: the embedded default policy — Sa2VA's structure at CPU size, built offline from configs.

    image ─┬─ vision_model (patch conv) ─ mlp1 ─▶ image tokens ─┐
           │                                                    ├─ language_model (tiny Qwen2) ─ [SEG] hidden
           │      prompt ─ tokenizer (chat template) ───────────┘                │
           │                                                             text_hidden_fcs
           └─ grounding_encoder.sam2_model.image_encoder ─▶ hi/mid/low features   │ e
                                grounding_encoder.sam2_model.sam_mask_decoder(features, e) ─▶ logits [H, W]

Module names mirror Sa2VA's (``language_model``, ``mlp1``, ``vision_model``, ``text_hidden_fcs``,
``grounding_encoder.sam2_model.sam_mask_decoder``) so the same LoRA target tables apply. The mask decoder
keeps a full-resolution path (``hi`` features) so 1-2 px vessels are representable.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "[SEG]",
)
TEMPLATES = {
    # Sa2VA's templates.py forms; the tiny model uses the Qwen chat form like Sa2VA-1B/InternVL3.
    "qwen_chat": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
}
ANSWER = "It is [SEG].<|im_end|>"


@dataclass(frozen=True)
class TinySa2VAConfig:
    """Sizes of the tiny model (all CPU-sized). Saved next to checkpoints so they rebuild identically."""

    hi_channels: int = 16
    mid_channels: int = 32
    low_channels: int = 48
    vit_patch: int = 16
    vit_dim: int = 48
    token_grid: int = 8
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 128
    seg_dim: int = 32
    decoder_dim: int = 32
    template: str = "qwen_chat"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_tokenizer():
    """A character-level tokenizer with Sa2VA's special tokens, built in code (no hub download).

    Character level keeps every prompt distinct without a trained vocabulary.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    from policies.compat import cpu_torchvision

    cpu_torchvision()  # before transformers imports it
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[2:])})
    return tok


def _conv(cin: int, cout: int, *, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation)


class TinyImageEncoder(nn.Module):
    """The SAM2 image-encoder analogue: multiscale features at 1, 1/2 and 1/4 resolution."""

    def __init__(self, cfg: TinySa2VAConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.hi_channels, cfg.mid_channels, cfg.low_channels
        self.stem = nn.Sequential(_conv(3, c1), nn.GELU(), _conv(c1, c1), nn.GELU())
        self.down1 = nn.Sequential(_conv(c1, c2, stride=2), nn.GELU(), _conv(c2, c2), nn.GELU())
        self.down2 = nn.Sequential(
            _conv(c2, c3, stride=2),
            nn.GELU(),
            _conv(c3, c3, dilation=2),
            nn.GELU(),
            _conv(c3, c3, dilation=4),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hi = self.stem(x)
        mid = self.down1(hi)
        return hi, mid, self.down2(mid)


class TinyMaskDecoder(nn.Module):
    """The SAM2 mask-decoder analogue conditioned on the language embedding ``e``.

    FiLM at 1/4 and 1/2 resolution, then a full-resolution refinement whose per-pixel features are scored
    against a hypernetwork vector from ``e`` (SAM's dot-product mask head) plus a local conv head.
    """

    def __init__(self, cfg: TinySa2VAConfig) -> None:
        super().__init__()
        d, c1 = cfg.decoder_dim, cfg.hi_channels
        self.low_proj = nn.Conv2d(cfg.low_channels, d, 1)
        self.low_film = nn.Linear(cfg.seg_dim, 2 * d)
        self.low_conv = _conv(d, d)
        self.mid_proj = nn.Conv2d(cfg.mid_channels, d, 1)
        self.mid_film = nn.Linear(cfg.seg_dim, 2 * d)
        self.mid_conv = _conv(d, d)
        self.hi_proj = nn.Conv2d(d, c1, 1)
        self.hi_conv = _conv(c1, c1)
        self.hi_conv2 = _conv(c1, c1)
        self.hyper = nn.Sequential(nn.Linear(cfg.seg_dim, c1), nn.GELU(), nn.Linear(c1, c1))
        self.local_head = nn.Conv2d(c1, 1, 1)

    @staticmethod
    def _film(x: torch.Tensor, film: nn.Linear, e: torch.Tensor) -> torch.Tensor:
        gamma, beta = film(e).chunk(2, dim=-1)
        return x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]

    def forward(
        self, hi: torch.Tensor, mid: torch.Tensor, low: torch.Tensor, e: torch.Tensor
    ) -> torch.Tensor:
        """hi [B,C1,H,W], mid [B,C2,H/2,W/2], low [B,C3,H/4,W/4], e [B,S] -> logits [B,H,W]."""
        x = F.gelu(self._film(self.low_proj(low), self.low_film, e))
        x = F.gelu(self.low_conv(x))
        x = F.interpolate(x, size=mid.shape[-2:], mode="bilinear", align_corners=False) + self.mid_proj(mid)
        x = F.gelu(self._film(self.mid_conv(x), self.mid_film, e))
        x = F.interpolate(x, size=hi.shape[-2:], mode="bilinear", align_corners=False)
        x = F.gelu(self.hi_conv(self.hi_proj(x) + hi))
        x = F.gelu(self.hi_conv2(x)) + x
        w = self.hyper(e)
        return (x * w[:, :, None, None]).sum(1) + self.local_head(x)[:, 0]


class _SAM2Model(nn.Module):
    def __init__(self, cfg: TinySa2VAConfig) -> None:
        super().__init__()
        self.image_encoder = TinyImageEncoder(cfg)
        self.sam_mask_decoder = TinyMaskDecoder(cfg)


class _GroundingEncoder(nn.Module):
    def __init__(self, cfg: TinySa2VAConfig) -> None:
        super().__init__()
        self.sam2_model = _SAM2Model(cfg)


class TinyVisionModel(nn.Module):
    """The InternViT analogue: patch embedding pooled to a token_grid x token_grid set of image tokens."""

    def __init__(self, cfg: TinySa2VAConfig) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.vit_dim, cfg.vit_patch, stride=cfg.vit_patch)
        self.mix = nn.Conv2d(cfg.vit_dim, cfg.vit_dim, 3, padding=1)
        self.grid = cfg.token_grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,3,H,W] normalised -> tokens [B, grid*grid, vit_dim]."""
        t = self.mix(F.gelu(self.patch(x)))
        t = F.adaptive_avg_pool2d(t, self.grid)
        return t.flatten(2).transpose(1, 2)


@dataclass
class TinyFeatures:
    """Frozen features of a batch: hi [B,C1,H',W'], mid [B,C2,H'/2,W'/2], low [B,C3,H'/4,W'/4], tokens
    [B,T,D], where H' x W' is the image size padded up to a multiple of 4 and ``size`` = (H, W) the size
    the logits are cropped back to."""

    hi: torch.Tensor
    mid: torch.Tensor
    low: torch.Tensor
    tokens: torch.Tensor
    size: tuple[int, int] | None = None

    def index(self, idx: torch.Tensor | Sequence[int] | slice) -> TinyFeatures:
        return TinyFeatures(self.hi[idx], self.mid[idx], self.low[idx], self.tokens[idx], self.size)

    def to(self, device: torch.device | str) -> TinyFeatures:
        return TinyFeatures(*(t.to(device) for t in (self.hi, self.mid, self.low, self.tokens)), self.size)

    @staticmethod
    def cat(parts: Sequence[TinyFeatures]) -> TinyFeatures:
        sizes = {p.size for p in parts}
        if len(sizes) > 1:
            raise ValueError(f"cannot batch features of images of different sizes {sorted(sizes)}")
        return TinyFeatures(
            *(torch.cat([getattr(p, k) for p in parts]) for k in ("hi", "mid", "low", "tokens")),
            parts[0].size,
        )

    def __len__(self) -> int:
        return self.hi.shape[0]


def images_to_tensor(images: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B,H,W,3] (numpy or torch) -> ImageNet-normalised float [B,3,H,W]."""
    x = images if torch.is_tensor(images) else torch.tensor(np.asarray(images))  # copies read-only arrays
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B,H,W,3], got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return (x - mean) / std


class TinySa2VA(nn.Module):
    """The tiny Sa2VA-shaped segmenter. ``forward(images, prompts) -> logits [B, H, W]``.

    Any H x W: images are padded (edge pixels repeated) up to a multiple of 4, the decoder's two
    upsamplings, and the logits are cropped back to H x W.
    """

    def __init__(self, cfg: TinySa2VAConfig | None = None) -> None:
        super().__init__()
        from policies.compat import cpu_torchvision

        cpu_torchvision()  # before transformers imports it
        from transformers import Qwen2Config, Qwen2ForCausalLM

        self.cfg = cfg or TinySa2VAConfig()
        c = self.cfg
        if c.template not in TEMPLATES:
            raise ValueError(f"unknown template {c.template!r}; allowed: {sorted(TEMPLATES)}")
        self.tokenizer = build_tokenizer()
        self.vision_model = TinyVisionModel(c)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(c.vit_dim),
            nn.Linear(c.vit_dim, c.llm_hidden),
            nn.GELU(),
            nn.Linear(c.llm_hidden, c.llm_hidden),
        )
        llm_cfg = Qwen2Config(
            vocab_size=len(self.tokenizer),
            hidden_size=c.llm_hidden,
            intermediate_size=c.llm_intermediate,
            num_hidden_layers=c.llm_layers,
            num_attention_heads=c.llm_heads,
            num_key_value_heads=c.llm_kv_heads,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=None,
        )
        llm_cfg._attn_implementation = "sdpa"
        self.language_model = Qwen2ForCausalLM(llm_cfg)
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(c.llm_hidden, c.llm_hidden),
            nn.ReLU(),
            nn.Linear(c.llm_hidden, c.seg_dim),
            nn.Dropout(0.0),
        )
        self.grounding_encoder = _GroundingEncoder(c)
        self.img_context_token_id = self.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        self.seg_token_idx = self.tokenizer.convert_tokens_to_ids("[SEG]")
        self._prompt_cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------------- frozen features
    def encode(self, images: Any) -> TinyFeatures:
        """The frozen parts (image encoder, vision tower, projector). Gradients flow if enabled (SFT)."""
        device = next(self.parameters()).device
        x = images_to_tensor(images, device)
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % 4, -w % 4
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        hi, mid, low = self.grounding_encoder.sam2_model.image_encoder(x)
        tokens = self.mlp1(self.vision_model(x))
        return TinyFeatures(hi, mid, low, tokens, (int(h), int(w)))

    # ----------------------------------------------------------------------------------- language side
    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the chat-templated conversation with a single <IMG_CONTEXT> placeholder."""
        if prompt not in self._prompt_cache:
            n_img = self.cfg.token_grid**2
            image = "<img>" + "<IMG_CONTEXT>" * n_img + "</img>"
            text = TEMPLATES[self.cfg.template].format(input=image + prompt) + ANSWER
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            self._prompt_cache[prompt] = ids
        return self._prompt_cache[prompt]

    def seg_embedding(self, tokens: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """tokens [B,T,D] + prompts -> e [B, seg_dim] (last-layer hidden state at [SEG] -> text_hidden_fcs)."""
        if len(prompts) != tokens.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {tokens.shape[0]} images")
        seqs = [self.prompt_ids(p) for p in prompts]
        length = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), length), pad, dtype=torch.long, device=tokens.device)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right padding keeps the image tokens at the same positions
            ids[i, : len(s)] = torch.tensor(s, device=tokens.device)
            attn[i, : len(s)] = 1
        embeds = self.language_model.get_input_embeddings()(ids)
        img_pos = ids == self.img_context_token_id
        embeds = embeds.masked_scatter(
            img_pos[..., None], tokens.to(embeds.dtype).reshape(-1, tokens.shape[-1])
        )
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=attn, output_hidden_states=True, use_cache=False
        )
        hidden = out.hidden_states[-1]
        seg_pos = (ids == self.seg_token_idx).float().argmax(1)
        h_seg = hidden[torch.arange(len(seqs), device=hidden.device), seg_pos]
        return self.text_hidden_fcs(h_seg)

    # ----------------------------------------------------------------------------------- full forward
    def forward(
        self, images: Any, prompts: Sequence[str], features: TinyFeatures | None = None
    ) -> torch.Tensor:
        """-> mask logits [B, H, W] at the image resolution."""
        f = features if features is not None else self.encode(images)
        e = self.seg_embedding(f.tokens, prompts)
        logits = self.grounding_encoder.sam2_model.sam_mask_decoder(f.hi, f.mid, f.low, e)
        if f.size is not None and tuple(logits.shape[-2:]) != f.size:
            logits = logits[:, : f.size[0], : f.size[1]]
        return logits
