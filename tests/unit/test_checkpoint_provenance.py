"""Trainable checkpoints know their base model and LoRA settings: eval/export without the base model use
it, another base model is refused, and a different configured LoRA alpha cannot change the outputs. RL from
a base checkpoint starts from the same LoRA weights for the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.checkpoint import CheckpointError, read_trainable_meta, save_base_model, save_trainable
from policies.config import PolicyConfig
from policies.factory import build_policy, load_policy
from policies.tiny import TinySa2VA


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("prov")
    for name, seed in (("base", 0), ("other", 1)):
        torch.manual_seed(seed)
        save_base_model(TinySa2VA(), root / name)
    policy = build_policy(PolicyConfig(checkpoint=str(root / "base")), seed=0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_trainable(policy, root / "rl")
    images = np.random.default_rng(0).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = policy.mask_logits(images, ["vessels"])
    return root, images, expected


def test_the_checkpoint_records_its_base_and_uses_it_by_default(trained) -> None:
    root, images, expected = trained
    base = read_trainable_meta(root / "rl")["base"]
    assert base["checkpoint"] == str((root / "base").resolve()) and len(base["digest"]) == 16
    policy = load_policy(PolicyConfig(), root / "rl")  # no policy.checkpoint given
    with torch.no_grad():
        torch.testing.assert_close(policy.mask_logits(images, ["vessels"]), expected)


def test_another_base_model_is_refused(trained) -> None:
    root, _, _ = trained
    with pytest.raises(CheckpointError, match="trained on base model"):
        load_policy(PolicyConfig(checkpoint=str(root / "other")), root / "rl")


def test_the_checkpoint_lora_settings_win_over_the_configured_ones(trained) -> None:
    root, images, expected = trained
    policy = load_policy(PolicyConfig(checkpoint=str(root / "base"), lora_alpha=64), root / "rl")
    assert policy.spec.alpha == 16
    with torch.no_grad():
        torch.testing.assert_close(policy.mask_logits(images, ["vessels"]), expected)


def test_a_file_instead_of_a_checkpoint_folder_is_named(trained) -> None:
    root, _, _ = trained
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_policy(PolicyConfig(), root / "rl" / "trainable.safetensors")


def test_lora_initialisation_from_a_base_checkpoint_is_seeded(trained) -> None:
    root, _, _ = trained
    cfg = PolicyConfig(checkpoint=str(root / "base"))
    a, b = build_policy(cfg, seed=3).trainable_state_dict(), build_policy(cfg, seed=3).trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_policy(cfg, seed=4).trainable_state_dict()
    # The seed draws exactly the random LoRA A matrices; LoRA B starts at 0 and the heads come from the base.
    differ = {k for k in a if not torch.equal(a[k], c[k])}
    assert differ == {k for k in a if ".lora_A." in k} and differ
