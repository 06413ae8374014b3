"""Sa2VA's text side, shared by both flavours of the fake: the special tokens, the chat templates (a subset of
the remote ``templates.py``) and a character-level tokenizer built in code."""

from __future__ import annotations

import string

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


# The remote modeling modules import PROMPT_TEMPLATE from their templates.py and the adapter looks it up on the
# module of the remote class, so the fake's modeling modules (sa2va_internvl, sa2va_qwen_vl) import this
# (a subset of the same table) the same way.
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
