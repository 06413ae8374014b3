"""Sa2VA's prompt layout: templates, the teacher-forced token ids of one row, and a batch of rows padded for one
LLM forward (docs/sa2va_adapter.md, "What the forward does", steps 3-4).

A row is ``template.INSTRUCTION("<image>\\n" + prompt)`` with the image placeholder expanded to N image tokens,
then the answer (``"It is [SEG]."``) and the template's SUFFIX. Rows of a batch differ in length (the tile count
sets N, prompts differ): :func:`pack_rows` pads them on the right. A real token then keeps its position (the
LLMs here number positions 0..L-1 whatever the mask says; Qwen-VL's M-RoPE positions are computed per row) and
its causal context (everything before it is real), so its hidden state is the one an unpadded forward gives.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SEG_TOKEN = "[SEG]"
DEFAULT_ANSWER = "It is [SEG]."
"""Teacher-forced answer (one of Sa2VA's SFT ANSWER_LIST forms); the template's SUFFIX is appended."""
INTERNVL_IMAGE_TOKENS = ("<img>", "<IMG_CONTEXT>", "</img>")
QWEN_IMAGE_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")

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


def template_name(remote: Any) -> str | None:
    name = getattr(remote.config, "template", None)
    return None if name is None else str(name).replace("-", "_")


def prompt_template(remote: Any, flavour: str) -> dict[str, Any] | None:
    """The template named by ``remote.config.template``: the checkpoint's own PROMPT_TEMPLATE table if its
    module has one, else :data:`PROMPT_TEMPLATES`. None only for Qwen-VL without a template (the processor's
    chat template is used then, as the remote ``predict_forward`` does)."""
    name = template_name(remote)
    if name is None:
        if flavour == "internvl":
            raise ValueError("model.config.template is missing: Sa2VA's InternVL models name their template")
        return None
    table = getattr(sys.modules.get(type(remote).__module__), "PROMPT_TEMPLATE", None) or {}
    if name in table:
        return dict(table[name])
    if name in PROMPT_TEMPLATES:
        return dict(PROMPT_TEMPLATES[name])
    known = sorted(set(table) | set(PROMPT_TEMPLATES))
    raise ValueError(f"model.config.template {name!r} is not a known prompt template; known: {known}")


def encode_prompt(
    prompt: str,
    n_image_tokens: int,
    *,
    tokenizer: Any,
    template: dict[str, Any] | None,
    flavour: str,
    answer: str,
    processor: Any | None = None,
) -> list[int]:
    """Token ids of the templated turn with ``n_image_tokens`` image placeholders + ``answer`` + SUFFIX.

    As Sa2VA's training: the instruction is encoded with special tokens (BOS for InternLM2 tokenizers, none
    for Qwen), the answer without; "<image>" is replaced by start + context x N + end tokens. Without a
    template (Qwen-VL only) the processor's chat template gives the instruction and EOS ends the answer.
    """
    if SEG_TOKEN not in answer:
        raise ValueError(f"the teacher-forced answer must contain {SEG_TOKEN}, got {answer!r}")
    if template is not None:
        start, context, end = INTERNVL_IMAGE_TOKENS if flavour == "internvl" else QWEN_IMAGE_TOKENS
        user = prompt if "<image>" in prompt else "<image>\n" + prompt
        text = user.replace("<image>", start + context * n_image_tokens + end, 1).strip()
        instruction = template["INSTRUCTION"].format(input=text, round=1, bot_name="BOT")
        suffix = template.get("SUFFIX", "")
    else:
        content = [{"type": "image"}, {"type": "text", "text": prompt.replace("<image>", "").strip()}]
        messages = [{"role": "user", "content": content}]
        instruction = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pad = getattr(processor, "image_token", QWEN_IMAGE_TOKENS[1])
        if instruction.count(pad) != 1:
            raise ValueError(f"the processor's chat template should hold one {pad!r}: {instruction!r}")
        instruction = instruction.replace(pad, pad * n_image_tokens)
        suffix = tokenizer.eos_token or ""
    ids = list(tokenizer.encode(instruction))
    return ids + list(tokenizer.encode(answer + suffix, add_special_tokens=False))


# ------------------------------------------------------------------------------------------------ batching
@dataclass(frozen=True)
class RowLayout:
    """One row's token ids and where its image tokens and its answer's [SEG] are (cached per prompt).

    ids: [L] int64. image: [N] positions of the image tokens, in order. seg: position of the last [SEG] (the
    answer's; a prompt may mention [SEG] too).
    """

    ids: np.ndarray
    image: np.ndarray
    seg: int

    @classmethod
    def from_ids(cls, ids: Sequence[int], *, image_token: int, seg_token: int) -> RowLayout:
        arr = np.asarray(ids, dtype=np.int64)
        segs = np.flatnonzero(arr == seg_token)
        if segs.size == 0:
            raise ValueError(f"the token ids hold no {SEG_TOKEN} (id {seg_token})")
        return cls(ids=arr, image=np.flatnonzero(arr == image_token), seg=int(segs[-1]))


@dataclass(frozen=True)
class PackedRows:
    """B rows right-padded to the longest, L tokens, on the model's device.

    ids: [B, L] (padding: ``pad_id``). attention_mask: [B, L] 1 for real tokens, or None when no row is padded
        (the LLM then builds its plain causal mask, as for one row). seg_index: [B] flat index of each row's
        [SEG] in the [B * L] tokens. image_index: [sum N_i] flat index of every image token, row after row (the
        order of the rows' vision embeddings concatenated). positions: Qwen-VL's M-RoPE [3, B, L] or None.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor | None
    seg_index: torch.Tensor
    image_index: torch.Tensor
    positions: torch.Tensor | None


def pack_rows(
    rows: Sequence[RowLayout],
    *,
    pad_id: int,
    device: torch.device,
    positions: Sequence[np.ndarray] | None = None,
) -> PackedRows:
    """Pad ``rows`` on the right and move ids, mask, indices and (``positions``: per row [3, L_i]) M-RoPE
    positions to ``device`` in one host-to-device copy (instead of one per row and tensor)."""
    b = len(rows)
    lengths = [len(r.ids) for r in rows]
    width = max(lengths)
    padded = any(n != width for n in lengths)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : lengths[i]] = r.ids
        mask[i, : lengths[i]] = 1
    seg = np.array([i * width + r.seg for i, r in enumerate(rows)], dtype=np.int64)
    image = np.concatenate([i * width + r.image for i, r in enumerate(rows)]).astype(np.int64)
    parts = [ids, mask if padded else None, seg, image]
    if positions is not None:
        pos = np.zeros((3, b, width), dtype=np.int64)  # padding: position 0, as a batched get_rope_index
        for i, p in enumerate(positions):
            pos[:, i, : lengths[i]] = p
        parts.append(pos)
    present = [p for p in parts if p is not None]
    # non_blocking: no wait for the GPU's queued work; from pageable memory CUDA stages the bytes before the
    # call returns, so the array may go once it has
    flat = torch.from_numpy(np.concatenate([p.ravel() for p in present])).to(device, non_blocking=True)
    views: list[torch.Tensor | None] = []
    offset = 0
    for p in parts:
        if p is None:
            views.append(None)
            continue
        views.append(flat[offset : offset + p.size].view(p.shape))
        offset += p.size
    if positions is None:
        views.append(None)
    return PackedRows(*views)


def scatter_rows(embeds: torch.Tensor, packed: PackedRows, vision: torch.Tensor) -> torch.Tensor:
    """[B, L, D] token embeddings with ``vision`` [sum N_i, D] written at the image tokens, out of place
    (``index_copy`` with host-computed indices: no device-side mask count, no host sync)."""
    flat = embeds.flatten(0, 1).index_copy(0, packed.image_index, vision.to(embeds.dtype))
    return flat.view_as(embeds)


def gather_seg(hidden: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """[B, L, D] hidden states -> [B, D] at each row's [SEG]."""
    return hidden.flatten(0, 1).index_select(0, packed.seg_index)
