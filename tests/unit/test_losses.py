"""Advantages and losses: hand-worked numbers, clipping behaviour, FOV masking, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from policies.distributions import pixel_log_probs, sample_masks
from policies.losses import (
    ADVANTAGE_FNS,
    POLICY_LOSSES,
    baseline_advantages,
    dpo_loss,
    entropy_bonus,
    expand_tiles,
    get_advantage_fn,
    get_policy_loss,
    group_advantages,
    kl_penalty,
    loss_normalisers,
    masked_mean,
    mixed_advantages,
    policy_gradient_loss,
    ppo_clipped_loss,
    rce_loss,
    rce_weights,
    seg_loss,
    tile_advantages,
    value_loss,
)

LN2 = math.log(2.0)


# --- advantages -------------------------------------------------------------------------------


def test_group_advantages_hand_values() -> None:
    # [1, 2, 3]: mean 2, population std sqrt((1 + 0 + 1) / 3) = 0.816497 -> +-1 / 0.816497 = +-1.224745.
    # [5, 5, 5]: std 0 -> 0 / eps = 0. [0, 4, 8] is [1, 2, 3] scaled: same advantages.
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 4.0, 8.0]])
    a = group_advantages(r)
    expected = torch.tensor([[-1.224745, 0.0, 1.224745], [0.0, 0.0, 0.0], [-1.224745, 0.0, 1.224745]])
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=0)
    assert torch.equal(group_advantages(torch.tensor([[0.7], [0.1]])), torch.zeros(2, 1))


def test_other_group_baselines_hand_values() -> None:
    r = torch.tensor([[1.0, 2.0, 3.0]])
    # Dr. GRPO: R - mean = [-1, 0, 1].
    torch.testing.assert_close(get_advantage_fn("dr_grpo")(r), torch.tensor([[-1.0, 0.0, 1.0]]))
    # RLOO: 1 - mean(2, 3) = -1.5, 2 - mean(1, 3) = 0, 3 - mean(1, 2) = 1.5.
    torch.testing.assert_close(get_advantage_fn("rloo")(r), torch.tensor([[-1.5, 0.0, 1.5]]))
    assert get_advantage_fn("grpo") is group_advantages and set(ADVANTAGE_FNS) >= {"grpo", "rloo"}
    with pytest.raises(ValueError, match="grpo"):
        get_advantage_fn("gae")


def test_tile_advantages_normalise_each_tile_across_samples() -> None:
    # B=1, K=2, 1x3 tiles. Tile 0 rewards (0.2, 0.6): any two distinct values -> (-1, +1).
    # Tile 1 rewards equal (1, 1) -> (0, 0). Tile 2 is invalid (no FOV): NaN reward still gives 0.
    r = torch.tensor([[[[0.2, 1.0, float("nan")]], [[0.6, 1.0, 3.0]]]])
    valid = torch.tensor([[[True, True, False]]])
    a = tile_advantages(r, valid=valid)
    assert a.shape == (1, 2, 1, 3)
    torch.testing.assert_close(a, torch.tensor([[[[-1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]]]), atol=1e-5, rtol=0)
    # Without `valid`, a tile equals group_advantages applied to that tile's K rewards.
    r2 = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(tile_advantages(r2)[:, :, 1, 2], group_advantages(r2[:, :, 1, 2]))
    with pytest.raises(ValueError, match="valid"):
        tile_advantages(r2, valid=torch.ones(2, 4, 3, dtype=torch.bool))


def test_expand_tiles_repeats_and_crops() -> None:
    # 2x2 tiles of side 2 over a 3x4 image: the second tile row is cropped to one pixel row.
    adv = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    out = expand_tiles(adv, tile=2, height=3, width=4)
    expected = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0]])
    torch.testing.assert_close(out, expected.reshape(1, 1, 3, 4))
    with pytest.raises(ValueError, match="tiles"):
        expand_tiles(adv, tile=2, height=5, width=4)


def test_mixed_advantages_hand_values() -> None:
    # w = 0.25: 0.75 * 2 + 0.25 * [0, 0, 4, 4] = [1.5, 1.5, 2.5, 2.5].
    image_adv = torch.tensor([[2.0]])
    tile_adv = torch.tensor([[0.0, 4.0]]).reshape(1, 1, 1, 2)
    out = mixed_advantages(image_adv, tile_adv, tile=2, height=2, width=4, tile_weight=0.25)
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.5, 2.5, 2.5]] * 2).reshape(1, 1, 2, 4))
    with pytest.raises(ValueError, match="tile_weight"):
        mixed_advantages(image_adv, tile_adv, tile=2, height=2, width=4, tile_weight=1.5)
    # Two sizes: a pixel's tile advantage is the mean of its tiles' advantages, (0 + 8) / 2 and (4 + 8) / 2.
    whole = torch.tensor([[8.0]]).reshape(1, 1, 1, 1)
    out = mixed_advantages(image_adv, [tile_adv, whole], tile=[2, 4], height=2, width=4, tile_weight=0.25)
    torch.testing.assert_close(out, torch.tensor([[2.5, 2.5, 3.0, 3.0]] * 2).reshape(1, 1, 2, 4))
    with pytest.raises(ValueError, match="one tile size per"):
        mixed_advantages(image_adv, [tile_adv, whole], tile=[2], height=2, width=4, tile_weight=0.25)


# --- reductions -------------------------------------------------------------------------------


def test_masked_mean_ignores_out_of_fov_pixels() -> None:
    # FOV = the diagonal of a 2x2 image, broadcast over K = 2: in-FOV values 1, 4, 5, 8 -> mean 4.5.
    # Off-diagonal values are NaN/inf and must not leak.
    x = torch.tensor([[[[1.0, float("nan")], [float("inf"), 4.0]], [[5.0, 1e9], [-1e9, 8.0]]]])
    fov = torch.tensor([[[True, False], [False, True]]])
    torch.testing.assert_close(masked_mean(x, fov), torch.tensor(4.5))
    torch.testing.assert_close(masked_mean(x[:, 1], fov), torch.tensor(6.5))
    torch.testing.assert_close(masked_mean(torch.arange(4.0).reshape(1, 2, 2)), torch.tensor(1.5))


def test_masked_mean_empty_fov_is_zero_with_finite_grad() -> None:
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = masked_mean(x, torch.zeros(2, 4, 4, dtype=torch.bool))
    assert out.dim() == 0 and out == 0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# --- policy losses ----------------------------------------------------------------------------


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 2x2 mask: ratios (1.5, 0.5, 1.1, 1.5) with advantages (+1, -1, +2, -1)."""
    ratios = torch.tensor([1.5, 0.5, 1.1, 1.5]).reshape(1, 1, 2, 2)
    logp_old = torch.full((1, 1, 2, 2), -0.7)
    logp_new = (logp_old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0]).reshape(1, 1, 2, 2)
    return logp_new, logp_old, adv


def test_ppo_clipped_loss_hand_case() -> None:
    # Per pixel -min(r A, clip(r, 0.8, 1.2) A):
    #   A=+1, r=1.5: -min(1.5, 1.2)   = -1.2  (clipped: no gradient)
    #   A=-1, r=0.5: -min(-0.5, -0.8) =  0.8  (clipped: no gradient)
    #   A=+2, r=1.1: -min(2.2, 2.2)   = -2.2  (inside the region)
    #   A=-1, r=1.5: -min(-1.5, -1.2) =  1.5  (pessimistic side is unclipped: gradient kept)
    # mean = (-1.2 + 0.8 - 2.2 + 1.5) / 4 = -1.1 / 4 = -0.275.
    logp_new, logp_old, adv = _hand_case()
    loss, stats = ppo_clipped_loss(logp_new, logp_old, adv, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.275))
    # clipfrac: |r - 1| > 0.2 for 1.5, 0.5, 1.5 -> 3/4. ratio_mean = 4.6 / 4 = 1.15.
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.75))
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.15))
    # approx_kl = mean((r - 1) - ln r) = mean(0.094535, 0.193147, 0.004690, 0.094535) = 0.096727.
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(0.096727), atol=1e-5, rtol=0)
    assert not any(v.requires_grad for v in stats.values())
    loss.backward()
    # d/dlogp of -r A is -r A; divided by 4 pixels: (0, 0, -2.2 / 4, 1.5 / 4).
    torch.testing.assert_close(logp_new.grad.flatten(), torch.tensor([0.0, 0.0, -0.55, 0.375]))


def test_policy_gradient_loss_hand_case_differs_from_clipped() -> None:
    # -r A = (-1.5, 0.5, -2.2, 1.5) -> mean -1.7 / 4 = -0.425, not the clipped -0.275.
    logp_new, logp_old, adv = _hand_case()
    loss, stats = policy_gradient_loss(logp_new, logp_old, adv)
    torch.testing.assert_close(loss, torch.tensor(-0.425))
    assert set(stats) == {"clipfrac", "approx_kl", "ratio_mean"}


def test_clipped_equals_unclipped_inside_trust_region() -> None:
    g = torch.Generator().manual_seed(0)
    logp_old = -torch.rand(2, 4, 6, 6, generator=g) * 3
    delta = (torch.rand(2, 4, 6, 6, generator=g) - 0.5) * 0.1  # |log r| < 0.05 -> r in (0.95, 1.052)
    adv = torch.randn(2, 4, 1, 1, generator=g)
    fov = torch.rand(2, 6, 6, generator=g) > 0.3
    a = (logp_old + delta).requires_grad_(True)
    b = (logp_old + delta).requires_grad_(True)
    loss_c, stats = ppo_clipped_loss(a, logp_old, adv, fov=fov, clip=0.2)
    loss_u, _ = policy_gradient_loss(b, logp_old, adv, fov=fov, clip=0.2)
    torch.testing.assert_close(loss_c, loss_u)
    assert stats["clipfrac"] == 0
    loss_c.backward()
    loss_u.backward()
    torch.testing.assert_close(a.grad, b.grad)
    # Same perturbation scaled 20x leaves the region: the losses part ways.
    far = logp_old + 20 * delta
    assert not torch.allclose(
        ppo_clipped_loss(far, logp_old, adv, fov=fov)[0], policy_gradient_loss(far, logp_old, adv, fov=fov)[0]
    )


def test_advantage_shapes_broadcast_alike() -> None:
    logp_old = -torch.rand(2, 3, 4, 4)
    logp_new = logp_old + 0.3 * torch.randn(2, 3, 4, 4)
    adv = torch.randn(2, 3)
    full = ppo_clipped_loss(logp_new, logp_old, adv[..., None, None].expand(2, 3, 4, 4))[0]
    torch.testing.assert_close(ppo_clipped_loss(logp_new, logp_old, adv[..., None, None])[0], full)
    torch.testing.assert_close(ppo_clipped_loss(logp_new, logp_old, adv)[0], full)


def test_policy_loss_registry() -> None:
    assert get_policy_loss("ppo_clip") is ppo_clipped_loss
    assert get_policy_loss("pg") is policy_gradient_loss
    assert set(POLICY_LOSSES) == {"ppo_clip", "pg"}
    with pytest.raises(ValueError, match=r"'pg', 'ppo_clip'"):
        get_policy_loss("trpo")


def test_full_rl_loss_gives_finite_grads_even_with_empty_fov() -> None:
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(2, 8, 8, generator=g) * 3).requires_grad_(True)
    ref = torch.randn(2, 8, 8, generator=g)
    masks = sample_masks(z, k=4, generator=g)
    logp_old = pixel_log_probs(z.detach(), masks)
    adv = group_advantages(torch.randn(2, 4, generator=g))
    grads = []
    for fov in (torch.rand(2, 8, 8, generator=g) > 0.5, torch.zeros(2, 8, 8, dtype=torch.bool)):
        z.grad = None
        loss, stats = ppo_clipped_loss(pixel_log_probs(z, masks), logp_old, adv, fov=fov)
        total = loss + 0.05 * kl_penalty(z, ref, fov=fov) - 0.01 * entropy_bonus(z, fov=fov)
        total.backward()
        assert torch.isfinite(total) and torch.isfinite(z.grad).all()
        assert all(torch.isfinite(v) for v in stats.values())
        grads.append(z.grad)
    # With a non-empty FOV the gradient is non-zero; with the empty one it is exactly zero.
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[1], torch.zeros_like(z))


# --- value, RCE, regularisers -------------------------------------------------------------------


def test_baseline_advantages_hand_values_and_tiles_without_a_reward() -> None:
    # R - V = [1, -1, 3, -3] (4 tiles, one image, K=1): std (unbiased) = sqrt(20/3) = 2.582
    r = torch.tensor([[[[2.0, 0.0], [4.0, -2.0]]]])
    v = torch.ones(1, 1, 2, 2)
    all_valid = torch.ones(1, 2, 2, dtype=torch.bool)
    adv = baseline_advantages(r, v, valid=all_valid, eps=0.0)
    assert torch.allclose(adv.flatten(), torch.tensor([1.0, -1.0, 3.0, -3.0]) / math.sqrt(20 / 3))
    # An invalid tile is 0 even with a NaN reward and stays out of the std: [1, 3, -3] has std sqrt(28/3).
    r_nan = r.clone()
    r_nan[0, 0, 0, 1] = float("nan")
    valid = torch.tensor([[[True, False], [True, True]]])
    adv = baseline_advantages(r_nan, v, valid=valid, eps=0.0)
    assert torch.allclose(adv.flatten(), torch.tensor([1.0, 0.0, 3.0, -3.0]) / math.sqrt(28 / 3))
    # No tile with a reward (a learned reward scores whole images only), or a single one: no tile signal, not
    # NaN (self-critical under a learned reward used to skip every step as non-finite).
    for n_valid in (0, 1):
        valid = torch.zeros(1, 2, 2, dtype=torch.bool)
        valid.view(-1)[:n_valid] = True
        assert torch.equal(baseline_advantages(r_nan, v, valid=valid), torch.zeros_like(r))


def test_value_loss_plain_and_clipped() -> None:
    values = torch.tensor([1.0, 2.0])
    returns = torch.tensor([0.0, 0.0])
    # MSE: (1 + 4) / 2 = 2.5.
    torch.testing.assert_close(value_loss(values, returns), torch.tensor(2.5))
    # Clipped, c = 0.2, old (0.5, 2.5): v_c = (0.7, 2.3); max((1, 4), (0.49, 5.29)) = (1, 5.29) -> 3.145.
    old = torch.tensor([0.5, 2.5])
    torch.testing.assert_close(value_loss(values, returns, clip=0.2, old_values=old), torch.tensor(3.145))
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, returns, clip=0.2)


def test_rce_weights_hand_values_and_mean_one() -> None:
    # rewards (0, ln 3), beta 1: softmax = (1/4, 3/4), times K=2 -> (0.5, 1.5).
    w = rce_weights(torch.tensor([[0.0, math.log(3.0)]]))
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.5]]))
    w = rce_weights(torch.randn(5, 8), beta=0.3)
    torch.testing.assert_close(w.mean(dim=1), torch.ones(5))
    assert (w > 0).all()
    torch.testing.assert_close(rce_weights(torch.randn(2, 4), beta=1e6), torch.ones(2, 4), atol=1e-4, rtol=0)


def test_rce_loss_hand_values_and_gradient_direction() -> None:
    # z = 0 everywhere: every mask has mean pixel log-prob -ln 2, so loss = ln 2 * mean(w) = ln 2.
    masks = torch.rand(2, 4, 3, 3) > 0.5
    w = rce_weights(torch.randn(2, 4))
    fov = torch.ones(2, 3, 3, dtype=torch.bool)
    fov[:, 0] = False
    torch.testing.assert_close(rce_loss(torch.zeros(2, 3, 3), masks, w, fov=fov), torch.tensor(LN2))
    # One pixel, masks (1, 0), weights (1.5, 0.5): loss = -(1.5 log s(z) + 0.5 log s(-z)) / 2;
    # at z = 0, d/dz = -(1.5 * 0.5 + 0.5 * (-0.5)) / 2 = -0.25: the heavier mask (pixel on) pulls z up.
    z = torch.zeros(1, 1, 1, requires_grad=True)
    m = torch.tensor([True, False]).reshape(1, 2, 1, 1)
    rce_loss(z, m, torch.tensor([[1.5, 0.5]])).backward()
    torch.testing.assert_close(z.grad.flatten(), torch.tensor([-0.25]))
    # Empty FOV: 0, finite gradient.
    z = torch.randn(2, 3, 3, requires_grad=True)
    loss = rce_loss(z, masks, w, fov=torch.zeros(2, 3, 3, dtype=torch.bool))
    loss.backward()
    assert loss == 0 and torch.isfinite(z.grad).all()


def test_kl_penalty_and_entropy_bonus_hand_values() -> None:
    # In FOV: z = ln 3 (p = 0.75) vs z_ref = 0 (q = 0.5): KL = 0.130812; entropy 0.562335.
    # Out of FOV: z = 9 vs -9, which would dominate both means if it leaked.
    z = torch.tensor([[[math.log(3.0), 9.0]]], requires_grad=True)
    ref = torch.tensor([[[0.0, -9.0]]], requires_grad=True)
    fov = torch.tensor([[[True, False]]])
    kl = kl_penalty(z, ref, fov=fov)
    torch.testing.assert_close(kl, torch.tensor(0.130812))
    torch.testing.assert_close(entropy_bonus(z, fov=fov), torch.tensor(0.562335))
    torch.testing.assert_close(entropy_bonus(torch.zeros(2, 3, 3)), torch.tensor(LN2))
    # T = 2 on z = 2 ln 3 is z = ln 3 at T = 1.
    torch.testing.assert_close(
        entropy_bonus(2 * z.detach(), fov=fov, temperature=2.0), torch.tensor(0.562335)
    )
    kl.backward()
    assert ref.grad is None and z.grad is not None


# --- SFT --------------------------------------------------------------------------------------


def test_seg_loss_perfect_confident_prediction_is_zero() -> None:
    target = torch.rand(2, 6, 6) > 0.6
    logits = torch.where(target, 30.0, -30.0)
    assert seg_loss(logits, target) < 1e-6


def test_seg_loss_half_probability_hand_values() -> None:
    # 2x2 image, logits 0 (p = 0.5), 2 positive pixels.
    # BCE = ln 2 per pixel -> 2.0 * 0.693147 = 1.386294.
    # Dice = (2 * sum(p t) + 1) / (sum p + sum t + 1) = (2 * 1 + 1) / (2 + 2 + 1) = 0.6 -> 0.5 * (1 - 0.6) = 0.2.
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(seg_loss(torch.zeros(1, 2, 2), target), torch.tensor(1.586294))
    # Same image with FOV = top row only (target 1, 0 inside it):
    # BCE over 2 FOV pixels still ln 2 -> 1.386294; Dice = (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3 -> 0.5 / 3 = 0.166667.
    fov = torch.tensor([[[True, True], [False, False]]])
    torch.testing.assert_close(seg_loss(torch.zeros(1, 2, 2), target, fov=fov), torch.tensor(1.552961))
    # Batch: the image above plus an empty target predicted confidently empty (BCE ~0, Dice loss 0).
    # BCE mean over 8 pixels = 4 ln 2 / 8 -> 2.0 * 0.346574 = 0.693147; Dice mean (0.4 + 0) / 2 -> 0.5 * 0.2 = 0.1.
    logits = torch.stack([torch.zeros(2, 2), torch.full((2, 2), -30.0)])
    target2 = torch.cat([target, torch.zeros(1, 2, 2)])
    torch.testing.assert_close(seg_loss(logits, target2), torch.tensor(0.793147))


def test_seg_loss_gradients_flow() -> None:
    z = torch.randn(2, 5, 5, requires_grad=True)
    target = torch.rand(2, 5, 5) > 0.5
    seg_loss(z, target, fov=torch.rand(2, 5, 5) > 0.2).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_dpo_moves_only_the_pixels_a_pair_disagrees_on() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 8)
    fov = torch.ones(3, 8, 8, dtype=torch.bool)
    fov[:, :, :2] = False
    masks = torch.rand(3, 4, 8, 8) < 0.5
    masks[:, :, :4] = masks[:, :1, :4]  # every mask agrees on the top half
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.2, 0.8, 0.0], [0.4, 0.4, 0.4, 0.4]])
    z = logits.clone().requires_grad_(True)
    loss, stats = dpo_loss(z, logits, masks, rewards, fov=fov, beta=10.0)
    # The policy is the reference: every margin is 0, loss log 2 over the 2 images with a pair (the third
    # has equal rewards and no pair).
    assert loss.item() == pytest.approx(math.log(2)) and stats["dpo_pairs"] == 2 and stats["dpo_margin"] == 0
    loss.backward()
    g = z.grad
    assert torch.all(g[2] == 0) and torch.all(g[:, :4] == 0) and torch.all(g[:, :, :2] == 0)
    best, worst = masks[0, 1], masks[0, 0]  # rewards 0.9 and 0.1
    differ = (best != worst) & fov[0]
    assert torch.all(g[0][~differ] == 0) and torch.all(g[0][differ] != 0)
    # A step against the gradient raises the best mask's log-probability over the worst one's.
    stepped, _ = dpo_loss(logits - 50.0 * g, logits, masks, rewards, fov=fov, beta=10.0)
    assert stepped.item() < loss.item()


def test_loss_normalisers_weight_a_split_batch_back_to_the_whole() -> None:
    fov = torch.zeros(3, 2, 2, dtype=torch.bool)
    fov[0] = True  # 4 pixels
    fov[1, 0] = True  # 2 pixels; image 2 has none
    rewards = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.2, 0.3]])  # image 1: equal rewards, no DPO pair
    tile_valid = torch.tensor([[[True, False]], [[True, True]], [[False, False]]])
    n = loss_normalisers(fov, rewards, tile_valid)
    assert {k: v.tolist() for k, v in n.items()} == {
        "pixels": [4, 2, 0], "masks": [1, 1, 1], "tiles": [1, 2, 0], "pairs": [1, 0, 1],
    }  # fmt: skip
    # A masked mean over images {0} and {1, 2}, each weighted by its share of the 6 FOV pixels (4/6, 2/6), is the
    # mean over all three: (4/6) * mean_0 + (2/6) * mean_12.
    x = torch.arange(12.0).reshape(3, 2, 2)
    share = n["pixels"] / n["pixels"].sum()
    parts = share[:1].sum() * masked_mean(x[:1], fov[:1]) + share[1:].sum() * masked_mean(x[1:], fov[1:])
    torch.testing.assert_close(parts, masked_mean(x, fov))
