"""TinySa2VA + LoRA policy: interface, prompt dependence, trainable scope, reference, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from policies.base import SegmentationPolicy
from policies.checkpoint import (
    CheckpointError,
    load_base_model,
    load_trainable,
    save_base_model,
    save_trainable,
)
from policies.lora import LoRASpec, parameter_counts, part_of
from policies.policy import AdapterPolicy, CheckpointMismatchError
from policies.tiny import TinySa2VA, TinySa2VAConfig, build_tokenizer


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)


def _policy(seed: int = 0, **spec) -> AdapterPolicy:
    torch.manual_seed(seed)
    return AdapterPolicy(TinySa2VA(), LoRASpec(**spec))


def test_tokenizer_has_sa2va_special_tokens() -> None:
    tok = build_tokenizer()
    for t in ("[SEG]", "<IMG_CONTEXT>", "<img>", "</img>"):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] == t
    assert tok.encode("Vessels", add_special_tokens=False) == tok.encode("vessels", add_special_tokens=False)


def test_policy_implements_the_protocol_and_shapes(images) -> None:
    pol = _policy()
    assert isinstance(pol, SegmentationPolicy)
    logits = pol.mask_logits(images, ["segment the vessels"] * 2)
    assert logits.shape == (2, 64, 48) and logits.requires_grad
    feats = pol.frozen_features(images)
    again = pol.mask_logits(images, ["segment the vessels"] * 2, features=feats)
    torch.testing.assert_close(logits, again)  # cached frozen features give the same logits


def test_prompt_changes_the_mask(images) -> None:
    pol = _policy()
    feats = pol.frozen_features(images)
    a = pol.mask_logits(images, ["segment the blood vessels"] * 2, features=feats)
    b = pol.mask_logits(images, ["find only the thick arteries"] * 2, features=feats)
    assert not torch.allclose(a, b)


def test_lora_only_on_the_language_model() -> None:
    pol = _policy()
    lora = [n for n, _ in pol.model.named_parameters() if ".lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    assert not [n for n in lora if "vision_model" in n or "grounding_encoder" in n]
    trainable, total = parameter_counts(pol.model)
    assert 0 < trainable < total


def test_decoder_lora_mode_targets_the_decoder_only() -> None:
    pol = _policy(decoder_mode="lora")
    dec = [n for n, _ in pol.model.named_parameters() if ".lora_" in n and "sam_mask_decoder" in n]
    assert dec and all(part_of(n) == "mask_decoder" for n in dec)
    assert not [n for n, _ in pol.model.named_parameters() if ".lora_" in n and "image_encoder" in n]


@pytest.mark.parametrize(
    "parts",
    [("llm_lora", "text_hidden_fcs", "mask_decoder"), ("text_hidden_fcs", "mask_decoder"), ("llm_lora",)],
)
def test_update_changes_every_trainable_and_no_frozen_parameter(images, parts) -> None:
    pol = _policy(trainable=parts)
    # LoRA B starts at zero, so A gets no gradient on the first step; two steps move both.
    before = {n: p.detach().clone() for n, p in pol.model.named_parameters()}
    opt = torch.optim.Adam(pol.trainable_parameters(), lr=1e-2)
    target = torch.from_numpy(images[..., 1] > 128).float()
    for _ in range(2):
        logits = pol.mask_logits(images, ["segment the vessels"] * 2)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in pol.model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if part_of(n) in parts:
            assert changed, f"trainable {n} did not change"
        else:
            assert not changed, f"frozen {n} changed"


def test_reference_is_the_starting_policy(images) -> None:
    pol = _policy()
    feats = pol.frozen_features(images)
    start = pol.mask_logits(images, ["v"] * 2, features=feats).detach()
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    moved = pol.mask_logits(images, ["v"] * 2, features=feats).detach()
    with pol.reference():
        ref = pol.mask_logits(images, ["v"] * 2, features=feats).detach()
    after = pol.mask_logits(images, ["v"] * 2, features=feats).detach()
    assert not torch.allclose(start, moved)
    torch.testing.assert_close(ref, start)
    torch.testing.assert_close(after, moved)  # adapters are back on after the context


def test_trainable_state_dict_round_trip_and_mismatch(tmp_path, images) -> None:
    src, dst = _policy(seed=1), _policy(seed=1)
    with torch.no_grad():
        for p in src.trainable_parameters():
            p.add_(0.05)
    sd = src.trainable_state_dict()
    assert all(not t.requires_grad and t.device.type == "cpu" for t in sd.values())
    assert sum(t.numel() * t.element_size() for t in sd.values()) == src.trainable_bytes() < src.model_bytes()
    save_trainable(src, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter" / "adapter_config.json").is_file()
    load_trainable(dst, tmp_path / "ckpt")
    feats = src.frozen_features(images)
    torch.testing.assert_close(
        src.mask_logits(images, ["v"] * 2, features=feats), dst.mask_logits(images, ["v"] * 2, features=feats)
    )
    # A checkpoint with a different LoRA rank / part set does not load silently.
    other = _policy(r=4)
    with pytest.raises(CheckpointError, match="other shapes"):
        load_trainable(other, tmp_path / "ckpt")
    heads_only = _policy(trainable=("text_hidden_fcs",))
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        heads_only.load_trainable_state_dict(sd)
    partial = {k: v for i, (k, v) in enumerate(sd.items()) if i % 2}
    with pytest.raises(CheckpointMismatchError, match="missing"):
        dst.load_trainable_state_dict(partial)
    missing, _ = dst.load_trainable_state_dict(partial, max_missing_fraction=0.6)
    assert len(missing) == len(sd) - len(partial)


def test_base_model_checkpoint_round_trip(tmp_path, images) -> None:
    torch.manual_seed(3)
    model = TinySa2VA(TinySa2VAConfig(llm_layers=1))
    save_base_model(model, tmp_path / "m")
    again = load_base_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(model(images, ["a", "b"]), again(images, ["a", "b"]))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_base_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_base_model(tmp_path / "nope")


def test_base_checkpoint_from_another_config_is_rejected(tmp_path) -> None:
    save_base_model(TinySa2VA(TinySa2VAConfig(llm_layers=1)), tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"llm_layers": 2}))
    with pytest.raises(CheckpointError, match="missing"):
        load_base_model(tmp_path / "a")


def test_forward_backward_speed_budget_shape() -> None:
    # The CPU budget is measured by benchmarks; here only that a 4x256x256 batch runs with gradients.
    torch.manual_seed(0)
    model = TinySa2VA()
    x = np.zeros((4, 256, 256, 3), np.uint8)
    out = model(x, ["v"] * 4)
    out.mean().backward()
    assert out.shape == (4, 256, 256)
    assert all(p.grad is not None for p in model.grounding_encoder.parameters())


def test_reference_keeps_the_trainable_subset(images) -> None:
    pol = _policy()
    pol.set_trainable_parts(["mask_decoder"])
    with pol.reference():
        pass
    lora = [p.requires_grad for n, p in pol.model.named_parameters() if part_of(n) == "llm_lora"]
    assert lora and not any(lora)


def test_sft_jitter_changes_training_and_zero_jitter_changes_nothing(tmp_path) -> None:
    from envs.synthetic import SyntheticFundus
    from policies.config import SFTConfig
    from policies.sft import train_sft

    train, val = SyntheticFundus("train", n=2, size=64, seed=0), SyntheticFundus("val", n=1, size=64, seed=0)

    def weights(jitter: float, name: str) -> list:
        torch.manual_seed(0)
        model = TinySa2VA()
        cfg = SFTConfig(steps=2, batch_size=2, eval_every=2, jitter=jitter)
        train_sft(model, train, val, cfg, out_dir=tmp_path / name, seed=0)
        return [p.detach().clone() for p in model.parameters()]

    plain, again, jittered = weights(0.0, "a"), weights(0.0, "b"), weights(0.4, "c")
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plain, jittered, strict=True))
