"""Learned reward net: architecture, perturbed-mask data, training, checkpoint I/O, scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from envs.metrics import dice
from envs.perturb import perturb_mask
from envs.rewards import MultiObjectiveReward
from envs.synthetic import generate_fundus
from envs.types import VesselSample
from policies.config import RewardNetConfig
from policies.reward_data import build_reward_dataset, dice_histogram
from policies.reward_net import (
    PARAM_COUNT,
    LightweightRewardNetwork,
    RewardNetScorer,
    load_reward_net,
    to_inputs,
)
from policies.reward_train import pearson, spearman, train_reward_net

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def fundus() -> VesselSample:
    return generate_fundus(3, 128)


@pytest.fixture(scope="module")
def tiny_samples() -> list[VesselSample]:
    return [generate_fundus(100 + i, 64) for i in range(6)]


@pytest.fixture(scope="module")
def trained(tiny_samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward_net")
    cfg = RewardNetConfig(epochs=2, batch_size=4, masks_per_image=2)
    report = train_reward_net(tiny_samples[:4], tiny_samples[4:], cfg, out_dir=out, seed=0)
    return report, out


# ---------------------------------------------------------------------------------------------- network


def test_parameter_count_is_the_original_experiments() -> None:
    net = LightweightRewardNetwork()
    # conv 6304 + 51264 + 73856, BN 64 + 128 + 256, FC 8256 + 65
    assert sum(p.numel() for p in net.parameters()) == PARAM_COUNT == 140_193


def test_forward_shapes_range_and_input_forms() -> None:
    torch.manual_seed(0)
    net = LightweightRewardNetwork().eval()
    image = torch.randint(0, 256, (3, 3, 64, 80), dtype=torch.uint8)
    mask = torch.rand(3, 64, 80) > 0.5
    with torch.no_grad():
        out = net(image.float() / 255.0, mask[:, None].float())
        assert out.shape == (3,)
        assert torch.all((out > 0) & (out < 1))
        # uint8 image and bool [B, H, W] mask are the same inputs
        torch.testing.assert_close(net(image, mask), out)
    with pytest.raises(ValueError, match="at least 64x64"):
        net(torch.rand(1, 3, 48, 48), torch.zeros(1, 48, 48))
    with pytest.raises(ValueError, match="mask"):
        net(torch.rand(2, 3, 64, 64), torch.zeros(3, 64, 64))


def test_to_inputs_converts_uint8_and_bool() -> None:
    images = np.full((2, 64, 64, 3), 255, np.uint8)
    images[1] = 0
    masks = np.zeros((2, 64, 64), bool)
    masks[0, 5, 7] = True
    img, msk = to_inputs(images, masks)
    assert img.shape == (2, 3, 64, 64) and msk.shape == (2, 1, 64, 64)
    assert img.dtype == msk.dtype == torch.float32
    assert img[0].min() == 1.0 and img[1].max() == 0.0
    assert msk.sum() == 1 and msk[0, 0, 5, 7] == 1
    with pytest.raises(ValueError, match="uint8"):
        to_inputs(images.astype(np.float32), masks)


# ----------------------------------------------------------------------------------------- perturbations


def test_perturbations_span_dice_and_follow_severity(fundus) -> None:
    gt, fov = fundus.mask, fundus.fov
    rng = np.random.default_rng(0)
    dices = []
    for severity in (0.0, 0.25, 0.5, 0.75, 0.95):
        m = perturb_mask(gt, rng, fov=fov, severity=severity)
        assert m.dtype == bool and m.shape == gt.shape and not np.any(m & ~fov)
        dices.append(dice(m, gt, fov))
        # the budgets are solved from the Dice formula, so the result lands near 1 - severity
        assert dices[-1] == pytest.approx(1.0 - severity, abs=0.08)
    assert min(dices) < 0.3 and max(dices) > 0.9
    assert not perturb_mask(gt, rng, fov=fov, mode="empty").any()
    np.testing.assert_array_equal(perturb_mask(gt, rng, fov=fov, mode="full"), fov)


def test_random_perturbations_are_deterministic_per_seed_and_spread(fundus) -> None:
    gt, fov = fundus.mask, fundus.fov

    def draw(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [perturb_mask(gt, rng, fov=fov) for _ in range(8)]

    a, b, c = draw(7), draw(7), draw(8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    d = [dice(m, gt, fov) for m in a + c]
    assert min(d) < 0.3 and max(d) > 0.9


def test_perturb_mask_rejects_bad_arguments(fundus) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="severity"):
        perturb_mask(fundus.mask, rng, severity=1.5)
    with pytest.raises(ValueError, match="fov"):
        perturb_mask(fundus.mask, rng, fov=np.ones((3, 3), bool))


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_dice_targets_and_policy_masks(tiny_samples) -> None:
    samples = tiny_samples[:2]
    policy = [np.stack([s.mask, np.zeros_like(s.mask)]) for s in samples]
    ds = build_reward_dataset(samples, masks_per_image=3, seed=1, policy_masks=policy)
    assert len(ds) == 2 * (3 + 2)
    image, mask, target = ds[0]
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64) and target.shape == ()
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    for j in range(len(ds)):
        s = samples[ds.image_index[j]]
        assert ds.targets[j] == pytest.approx(dice(ds.masks[j], s.mask, s.fov), abs=1e-6)
    kinds = np.array(ds.kinds)
    np.testing.assert_allclose(ds.targets[kinds == "policy"], [1.0, 0.0, 1.0, 0.0])
    assert sum(dice_histogram(ds.dice)) == len(ds)
    # a callable gets (sample, rng) and may return one [H, W] mask
    ds2 = build_reward_dataset(samples, masks_per_image=1, seed=1, policy_masks=lambda s, rng: s.mask)
    assert ds2.kinds.count("policy") == 2
    with pytest.raises(ValueError, match="policy masks for sample"):
        build_reward_dataset(samples, masks_per_image=1, seed=1, policy_masks=[np.zeros((1, 8, 8), bool)] * 2)


def test_dataset_reward_target_is_rescaled_with_the_reward_bounds(tiny_samples) -> None:
    s = tiny_samples[0]
    reward = MultiObjectiveReward()
    ds = build_reward_dataset([s], masks_per_image=4, seed=2, target="reward")
    lo, hi = reward.bounds()
    for m, y in zip(ds.masks, ds.targets, strict=True):
        assert y == pytest.approx((reward(m, s.mask, s.fov).total - lo) / (hi - lo), abs=1e-6)
        assert 0.0 <= y <= 1.0
    with pytest.raises(ValueError, match="reward_fn"):
        build_reward_dataset([s], masks_per_image=1, seed=0, reward_fn=reward)


# --------------------------------------------------------------------------------------- correlations


def test_pearson_and_spearman_hand_cases() -> None:
    # x - mean = [-1.5, -.5, .5, 1.5], y - mean = [-1.5, .5, -.5, 1.5]: 4 / sqrt(5 * 5) = 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # monotone but not linear: ranks agree perfectly
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99
    # tie: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    x, y = np.random.default_rng(0).normal(size=(2, 30))
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant: no association measurable


# ---------------------------------------------------------------------------------------------- training


def _plain(obj: object) -> bool:
    """True if obj holds only dicts/lists of tensors, numbers, strings."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return all(_plain(v) for v in obj)
    return isinstance(obj, torch.Tensor | int | float | str | bool)


def test_tiny_training_writes_loadable_checkpoints_and_report(trained) -> None:
    report, out = trained
    for name in ("best_reward_net.pth", "final_reward_net.pth", "metrics.json", "calibration.png"):
        assert (out / name).is_file(), name
    assert report.n_train == 8 and report.n_val == 4 and report.n_train_images == 4
    assert len(report.train_mse) == len(report.val_mse_per_epoch) == 2
    assert report.val_mse == pytest.approx(min(report.val_mse_per_epoch))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_mse"] == pytest.approx(report.val_mse) and "net" not in metrics

    ckpt = torch.load(out / "best_reward_net.pth", weights_only=True)
    assert set(ckpt) == {"model_state_dict", "config", "epoch", "val_mse"}
    assert _plain(ckpt) and ckpt["config"]["target"] == "dice"
    assert ckpt["epoch"] == report.best_epoch and ckpt["val_mse"] == pytest.approx(report.val_mse)
    final = torch.load(out / "final_reward_net.pth", weights_only=True)
    assert final["epoch"] == 2 and _plain(final)

    loaded = load_reward_net(out / "best_reward_net.pth")
    assert not loaded.training
    img, msk = to_inputs(np.zeros((2, 64, 64, 3), np.uint8) + 90, np.eye(64, dtype=bool)[None].repeat(2, 0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(img, msk), report.net(img, msk))


def test_training_changes_every_parameter(trained, tiny_samples) -> None:
    report, _ = trained
    torch.manual_seed(0)
    init = LightweightRewardNetwork()  # train_reward_net(seed=0) initialises from torch seed 0
    for (name, p0), p1 in zip(init.named_parameters(), report.net.parameters(), strict=True):
        assert not torch.equal(p0, p1), name


def test_load_errors_name_the_file(trained, tmp_path: Path) -> None:
    _, out = trained
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_reward_net(missing)

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"corrupt\.pth cannot be loaded as plain tensors: it is corrupt"):
        load_reward_net(corrupt)

    bare = tmp_path / "bare.pth"
    torch.save(LightweightRewardNetwork().state_dict(), bare)
    with pytest.raises(ValueError, match=r"bare\.pth has no 'model_state_dict'"):
        load_reward_net(bare)

    ckpt = torch.load(out / "best_reward_net.pth", weights_only=True)
    sd = ckpt["model_state_dict"]
    del sd["head.3.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["head.1.weight"] = torch.zeros(64, 256)
    bad = tmp_path / "mismatch.pth"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match=r"mismatch\.pth.*1 missing.*1 unexpected.*1 with the wrong shape"):
        load_reward_net(bad)


# ----------------------------------------------------------------------------------------------- scoring


def test_scorer_scores_k_masks_as_learned(trained, tiny_samples) -> None:
    report, out = trained
    s = tiny_samples[5]
    masks = np.stack([s.mask, ~s.mask, np.zeros_like(s.mask)])
    net = load_reward_net(out / "best_reward_net.pth").train()  # the scorer must switch to eval itself
    scores = RewardNetScorer(net, batch_size=2).score(s.image, masks)
    assert scores.source == "learned"
    assert scores.values.shape == (3,) and scores.values.dtype == np.float32
    assert np.all((scores.values > 0) & (scores.values < 1))
    img, msk = to_inputs(np.repeat(s.image[None], 3, 0), masks)
    with torch.no_grad():
        np.testing.assert_allclose(scores.values, report.net(img, msk).numpy(), rtol=1e-5, atol=1e-6)
    # FOV: pixels outside it do not change the score
    scorer = RewardNetScorer.from_checkpoint(out / "best_reward_net.pth")
    a = scorer.score(s.image, masks, fov=s.fov).values
    b = scorer.score(s.image, masks & s.fov).values
    np.testing.assert_allclose(a, b)
    assert scorer.score(s.image, np.zeros((0, 64, 64), bool)).values.shape == (0,)
