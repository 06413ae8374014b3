"""The Sa2VA adapter against Sa2VA's real Hugging Face remote code (not the structural fake).

A release-shaped checkpoint folder is built once, at random init, from the remote files in
``../shared/sa2va_remote`` (or ``$RAYSYS_SA2VA_REMOTE``) by ``raysys sa2va random-init`` (shape "test": 2-layer
InternViT and Qwen2, 448-px tiles, offline tokenizer). SAM2 is full size (Hiera-L, 224 M parameters), because
the remote ``sam2.py`` hard-codes it: each 1024-px SAM2 encode costs about 15 s on 2 CPU cores, so the tests
share one encode of one image where they can. The folder is loaded through ``load_sa2va`` under the installed
transformers, with the compatibility shims of ``policies/compat.py``.
"""

from __future__ import annotations

import dataclasses
import os
import re
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

PROMPT = "Please segment the blood vessels."
ANSWER = "It is [SEG]."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from raysys.cli import main

    out = tmp_path_factory.mktemp("ck") / "sa2va_random"  # as a user builds one: raysys sa2va random-init
    assert main(["sa2va", "random-init", "--shape", "test", "--out", str(out), "--remote", str(REMOTE)]) == 0
    return out


@pytest.fixture(scope="module")
def policy(checkpoint):
    from policies.config import PolicyConfig
    from policies.factory import build_policy

    policy = build_policy(
        PolicyConfig(kind="sa2va", checkpoint=str(checkpoint), dtype="float32", trust_remote_code=True)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0 (LoRA a no-op); give it a value so every test sees it act
        for n, p in policy.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.02, generator=gen)
    return policy


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """48 x 96: not square, and InternVL tiles it into 2 x 1 tiles + a thumbnail (768 image tokens)."""
    return (np.random.default_rng(0).random((1, 48, 96, 3)) * 255).astype(np.uint8)


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
    # the remote forces eager attention without flash-attn; the adapter runs the LLM with SDPA
    assert model.attention == "sdpa" and model.model.language_model.config._attn_implementation == "sdpa"
    # bfloat16 backbone, float32 trained parts
    half = load_sa2va(str(checkpoint), dtype="bfloat16", trust_remote_code=True)
    dtypes = {n.split(".")[0]: p.dtype for n, p in half.model.named_parameters()}
    assert dtypes["language_model"] == torch.bfloat16 and dtypes["text_hidden_fcs"] == torch.float32
    assert {p.dtype for p in half.sam2.sam_mask_decoder.parameters()} == {torch.float32}
    # the remote generation set-up casts everything to one dtype; the trained parts come back as they were
    heads = {n: p.detach().clone() for n, p in half.model.named_parameters() if p.dtype == torch.float32}
    assert heads and all(
        ".text_hidden_fcs." in n or ".sam_mask_decoder." in n for n in [f".{n}" for n in heads]
    )
    from policies.sa2va_remote_checks import remote_generation

    with remote_generation(half):
        assert half.model.text_hidden_fcs[0].weight.dtype == torch.bfloat16
    after = dict(half.model.named_parameters())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], t) for n, t in heads.items())


def test_remote_code_needs_the_users_opt_in(checkpoint) -> None:
    from policies.sa2va import Sa2VALoadError, load_sa2va

    with pytest.raises(Sa2VALoadError, match=r"modeling_sa2va_chat\.py.*trust_remote_code=True"):
        load_sa2va(str(checkpoint), dtype="float32")


def test_adapter_sam_heads_match_the_remote_heads(policy, image, features) -> None:
    from policies.sa2va_remote_checks import sam_heads_difference

    assert sam_heads_difference(policy.base, image, features=features) < 1e-4


def test_sdpa_attention_gives_the_eager_seg_hidden_state(policy, image, features) -> None:
    from policies.compat import set_attention

    lm = policy.base.model.language_model
    with torch.no_grad():
        sdpa = policy.base.seg_hidden_states(features, [PROMPT])
        set_attention(lm, "eager")
        try:
            eager = policy.base.seg_hidden_states(features, [PROMPT])
        finally:
            set_attention(lm, "sdpa")
    assert lm.config._attn_implementation == "sdpa"
    assert sdpa.abs().max() > 0.1  # a real comparison, not of zeros
    torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)


def test_seg_hidden_state_matches_the_remote_training_forward(policy, image, features) -> None:
    from policies.sa2va_remote_checks import remote_training_seg_hidden

    with torch.no_grad():
        ours = policy.base.seg_hidden_states(features, [PROMPT])[0]
        theirs = remote_training_seg_hidden(policy.base, image, PROMPT)
    assert theirs.abs().max() > 0.1  # a real comparison, not of zeros
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_one_padded_llm_forward_equals_one_image_at_a_time(policy, image, features) -> None:
    # Rows of 768 image tokens (the 48 x 96 image: 2 tiles + thumbnail) and 256 (a 48 x 48 image: 1 tile) with
    # prompts of different lengths, in one LLM forward padded on the right. Every row reuses the module's one
    # SAM2 encode (15 s each on CPU): the mask decoder sees the same image, the LLM rows differ.
    from policies.sa2va_remote_checks import remote_training_seg_hidden

    model = policy.base
    square = (np.random.default_rng(1).random((48, 48, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        one_tile = model._internvl_vision(square)
    three_tiles = features.vision[0]
    assert (one_tile.shape[0], three_tiles.shape[0]) == (256, 768)
    rows = dataclasses.replace(
        features.index([0, 0, 0, 0]), vision=[three_tiles, one_tile, one_tile, three_tiles]
    )
    prompts = [PROMPT, "vessels", "Please segment the thick arteries and the veins.", "segment"]
    with torch.no_grad():
        batched = policy.mask_logits(None, prompts, features=rows)
        single = torch.cat(
            [policy.mask_logits(None, [p], features=rows.index([i])) for i, p in enumerate(prompts)]
        )
        hidden = model.seg_hidden_states(rows, prompts)
        images = [image[0], square, square, image[0]]
        theirs = torch.stack(
            [remote_training_seg_hidden(model, im, p) for im, p in zip(images, prompts, strict=True)]
        )
    # logits of the random-init decoder are small (|z| < 1e-2; rows differ by ~2e-4, measured 5e-9 apart): the
    # bound is the issue's 1e-4 and, so that it can fail, a thousandth of how much two rows' logits differ
    diff = float((batched - single).abs().max())
    spread = float((single[1] - single[2]).abs().max())
    assert diff <= 1e-4 and diff <= 1e-3 * spread, (
        f"max |logit difference| {diff:.2e}, rows differ by {spread:.2e}"
    )
    # each row as Sa2VA's own training forward computes it, one image at a time
    torch.testing.assert_close(hidden, theirs, rtol=0, atol=1e-5)


def test_teacher_forced_mask_matches_the_remote_predict_forward(policy, image, features) -> None:
    from policies.sa2va_remote_checks import compare_with_remote

    before = {n: (p.dtype, p.detach().clone()) for n, p in policy.model.named_parameters()}
    report = compare_with_remote(
        policy.base, image[0], PROMPT, force_answer=ANSWER, features=features, heads=False
    )
    assert report["prediction"].startswith(ANSWER), report
    assert 0.02 < report["remote_mask_fraction"] < 0.98, (
        report
    )  # a mask with both classes, not a trivial match
    assert report["mask_iou"] > 0.999 and report["pixel_agreement"] > 0.9995, report
    assert report["seg_hidden_max_abs_diff"] < 1e-5 and report["seg_hidden_abs_max"] > 0.1, report
    after = dict(policy.model.named_parameters())
    assert all(after[n].dtype == d and torch.equal(after[n], t) for n, (d, t) in before.items())


def test_logits_gradients_and_lora_scope_on_the_real_model(policy, image, features) -> None:
    logits = policy.mask_logits(image, [PROMPT], features=features)
    assert logits.shape == (1, 48, 96) and torch.isfinite(logits).all()
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


def test_activation_checkpointing_keeps_the_real_models_gradients(policy, image, features) -> None:
    from policies.policy import language_model

    def gradients() -> dict[str, torch.Tensor]:
        policy.mask_logits(image, [PROMPT], features=features).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_trainable_parameters() if p.grad is not None}
        policy.model.zero_grad(set_to_none=True)
        return grads

    lm = language_model(policy.base)
    expected = gradients()
    policy.enable_activation_checkpointing()
    try:
        assert lm.training and all(layer.gradient_checkpointing for layer in lm.model.layers)
        got = gradients()
    finally:  # the other tests share this policy
        (getattr(lm, "activation_checkpointing_disable", None) or lm.gradient_checkpointing_disable)()
        lm.eval()
    assert set(got) == set(expected) and any(".lora_A." in n for n in got)
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7)


def test_merged_export_loads_and_runs_in_sa2vas_own_code(
    policy, checkpoint, image, features, tmp_path, monkeypatch
):
    from policies.checkpoint import save_trainable
    from policies.compat import forced_generation, prepare, remote_inference_on
    from raysys.cli import main

    with torch.no_grad():  # trained heads that differ from the base's
        for n, p in policy.model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_trainable(policy, tmp_path / "rl")
    monkeypatch.chdir(tmp_path)
    rc = main(["export", "policy.kind=sa2va", f"policy.checkpoint={checkpoint}", "policy.trust_remote_code=true",
               "policy.dtype=float32", "data.size=64", "data.n_val=1", "--checkpoint", str(tmp_path / "rl"),
               "--out", str(tmp_path / "ex")])  # fmt: skip
    assert rc == 0
    merged = tmp_path / "ex" / "merged"
    assert {"config.json", "modeling_sa2va_chat.py", "tokenizer.json"} <= {f.name for f in merged.iterdir()}
    assert (merged / "config.json").read_bytes() == (checkpoint / "config.json").read_bytes()

    # Sa2VA's own loading and inference code, as its README runs it
    from PIL import Image

    prepare(merged)
    import transformers
    from packaging.version import Version
    from transformers import AutoModel, AutoTokenizer

    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = AutoModel.from_pretrained(merged, trust_remote_code=True, **{dtype_key: torch.float32}).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=True)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    ids = tokenizer.encode(ANSWER + tokenizer.eos_token, add_special_tokens=False)
    with torch.no_grad(), remote_inference_on(model, "cpu"), forced_generation(model.language_model, ids):
        model.preparing_for_generation(tokenizer, torch_dtype=torch.float32)
        result = model.predict_forward(
            image=Image.fromarray(image[0]), text="<image>\n" + PROMPT, tokenizer=tokenizer
        )
    theirs = np.asarray(result["prediction_masks"][0])[0]
    with torch.no_grad():
        ours = (policy.mask_logits(image, [PROMPT], features=features)[0] > 0).numpy()
    assert 0.02 < theirs.mean() < 0.98
    assert (ours == theirs).mean() > 0.9995


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
