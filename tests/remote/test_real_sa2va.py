"""The Sa2VA adapter against Sa2VA's real Hugging Face remote code (not the structural fake).

A checkpoint folder is built once, at random init, from the remote files in ``../shared/sa2va_remote`` (or
``$RAYSYS_SA2VA_REMOTE``). It has a 2-layer Qwen2 LLM, a 2-layer InternViT and an offline byte-level
tokenizer with Sa2VA's special tokens. SAM2 is full size (Hiera-L, 224 M parameters), because the remote
``sam2.py`` hard-codes it. The folder is loaded through ``load_sa2va`` under the installed transformers,
with the compatibility shims of ``policies/compat.py``. One 1024-px SAM2 encode is shared by the
tests (about 15 s on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
REMOTE = Path(os.environ.get("RAYSYS_SA2VA_REMOTE", ROOT.parent / "shared" / "sa2va_remote"))
pytestmark = pytest.mark.skipif(
    not (REMOTE / "modeling_sa2va_chat.py").is_file(),
    reason=f"Sa2VA's remote code is not at {REMOTE} (set RAYSYS_SA2VA_REMOTE to its folder)",
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>",
           "<ref>", "</ref>", "<box>", "</box>", "[SEG]", "<p>", "</p>", "<vp>", "</vp>"]  # fmt: skip
PROMPT = "Please segment the blood vessels."
CONFIG = {
    "architectures": ["Sa2VAChatModel"],
    "auto_map": {
        "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
        "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
        "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
    },
    "model_type": "sa2va_chat",
    "template": "qwen_chat",
    "force_image_size": 56,
    "downsample_ratio": 0.5,
    "select_layer": -1,
    "ps_version": "v2",
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
    "vision_config": {
        "architectures": ["InternVisionModel"], "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 2, "num_hidden_layers": 2, "image_size": 56, "patch_size": 14,
        "qkv_bias": True, "norm_type": "layer_norm", "use_flash_attn": False, "drop_path_rate": 0.0,
    },
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 320,
        "max_position_embeddings": 4096, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    },
}  # fmt: skip


def _tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (no merges) with Sa2VA's special tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    assert len(fast) <= CONFIG["llm_config"]["vocab_size"]
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from policies.compat import prepare

    folder = tmp_path_factory.mktemp("sa2va_random")
    for f in REMOTE.glob("*.py"):
        shutil.copy(f, folder)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    prepare(folder)  # before the first transformers import
    from transformers import AutoConfig, AutoModel

    _tokenizer(folder)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_config(config, trust_remote_code=True)
    model.save_pretrained(folder)
    for f in REMOTE.glob("*.py"):  # save_pretrained may rewrite them; the release ships the originals
        shutil.copy(f, folder)
    return folder


@pytest.fixture(scope="module")
def policy(checkpoint):
    from policies.config import PolicyConfig
    from policies.factory import build_policy

    return build_policy(
        PolicyConfig(kind="sa2va", checkpoint=str(checkpoint), dtype="float32", trust_remote_code=True)
    )


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(0).random((1, 72, 96, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def features(policy, image):
    return policy.frozen_features(image)


def test_the_real_remote_code_loads_under_the_installed_transformers(checkpoint) -> None:
    from safetensors.torch import load_file

    from policies.sa2va import load_sa2va

    model = load_sa2va(str(checkpoint), dtype="float32", trust_remote_code=True)
    assert (model.flavour, model.backbone, model.template_name) == ("internvl", "qwen2", "qwen_chat")
    saved = {}
    for f in checkpoint.glob("*.safetensors"):
        saved.update(load_file(str(f)))
    remote = model.model.state_dict()
    assert len(saved) > 900 and set(saved) <= set(remote)
    assert all(torch.equal(remote[k], saved[k]) for k in saved)  # every saved tensor, bit for bit
    # bfloat16 backbone, float32 trained parts
    half = load_sa2va(str(checkpoint), dtype="bfloat16", trust_remote_code=True)
    dtypes = {n.split(".")[0]: p.dtype for n, p in half.model.named_parameters()}
    assert dtypes["language_model"] == torch.bfloat16 and dtypes["text_hidden_fcs"] == torch.float32
    assert {p.dtype for p in half.sam2.sam_mask_decoder.parameters()} == {torch.float32}


def test_remote_code_needs_the_users_opt_in(checkpoint) -> None:
    from policies.sa2va import Sa2VALoadError, load_sa2va

    with pytest.raises(Sa2VALoadError, match=r"modeling_sa2va_chat\.py.*trust_remote_code=True"):
        load_sa2va(str(checkpoint), dtype="float32")


def test_adapter_sam_heads_match_the_remote_heads(policy, image) -> None:
    assert policy.base.sam_heads_difference(image) < 1e-4


def test_logits_gradients_and_lora_scope_on_the_real_model(policy, image, features) -> None:
    with torch.no_grad():  # LoRA B starts at 0, which blocks the gradient of A: give B a value first
        for n, p in policy.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.02)
    logits = policy.mask_logits(image, [PROMPT], features=features)
    assert logits.shape == (1, 72, 96) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    named = dict(policy.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    lora = [n for n in trainable if ".lora_" in n]
    assert lora and all(re.search(r"language_model\.(model\.)?layers\.\d+\.", n) for n in lora)
    assert any(".text_hidden_fcs." in n for n in trainable) and any(
        ".sam_mask_decoder." in n for n in trainable
    )
    for n in [n for n in trainable if ".lora_" in n or ".text_hidden_fcs." in n]:
        assert named[n].grad is not None and named[n].grad.abs().sum() > 0, n
    assert all(p.grad is None for n, p in named.items() if n not in trainable)  # nothing frozen moves
    policy.model.zero_grad(set_to_none=True)


def test_reference_is_the_unadapted_real_model(policy, image, features) -> None:
    with torch.no_grad(), policy.reference():
        ref = policy.mask_logits(image, [PROMPT], features=features)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if ".lora_B." in n:
                p.add_(0.05)
        moved = policy.mask_logits(image, [PROMPT], features=features)
        with policy.reference():
            again = policy.mask_logits(image, [PROMPT], features=features)
    assert not torch.allclose(moved, ref, atol=1e-4)
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-6)
