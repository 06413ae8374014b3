"""Per-pixel Bernoulli mask policy: hand-worked log-probs, entropy, KL, sampling, bit-packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from policies.distributions import (
    PackedMasks,
    entropy,
    kl_bernoulli,
    mask_log_probs,
    pack_masks,
    pixel_log_probs,
    sample_masks,
    unpack_masks,
)

LN2 = math.log(2.0)
LOG3 = math.log(3.0)


def _z(*values: float) -> torch.Tensor:
    """Logits laid out as a [1,1,N] image."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1)


def test_pixel_log_probs_hand_values() -> None:
    # z = 0: p = 1/2, so log pi(1) = log pi(0) = -ln 2.
    # z = ln 3: p = 3 / (3 + 1) = 0.75, so log pi(1) = ln 0.75 = -0.28768, log pi(0) = ln 0.25 = -1.38629.
    z = _z(0.0, LOG3)
    masks = torch.tensor([[True, True], [False, False]]).reshape(1, 2, 1, 2)
    lp = pixel_log_probs(z, masks)
    assert lp.shape == (1, 2, 1, 2)
    expected = torch.tensor([[-LN2, math.log(0.75)], [-LN2, math.log(0.25)]]).reshape(1, 2, 1, 2)
    torch.testing.assert_close(lp, expected)
    # Float masks give the same numbers as bool masks.
    torch.testing.assert_close(pixel_log_probs(z, masks.float()), expected)


def test_temperature_scales_the_logit() -> None:
    # T = 2 halves the effective logit: z = 2 ln 3 at T = 2 behaves like ln 3 at T = 1 (p = 0.75).
    # T = 0.5 doubles it: z = ln(3)/2 at T = 0.5 behaves like ln 3 too.
    m = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    lp_t2 = pixel_log_probs(_z(2 * LOG3), m, temperature=2.0)
    lp_half = pixel_log_probs(_z(LOG3 / 2), m, temperature=0.5)
    torch.testing.assert_close(lp_t2.flatten(), torch.tensor([math.log(0.75)]))
    torch.testing.assert_close(lp_half.flatten(), torch.tensor([math.log(0.75)]))
    torch.testing.assert_close(entropy(_z(2 * LOG3), temperature=2.0), entropy(_z(LOG3)))
    with pytest.raises(ValueError, match="temperature"):
        pixel_log_probs(_z(0.0), m, temperature=0.0)


def test_mask_log_probs_sums_pixels_inside_fov() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 6, generator=g)
    masks = torch.rand(2, 3, 5, 6, generator=g) > 0.5
    fov = torch.rand(2, 5, 6, generator=g) > 0.3
    lp = pixel_log_probs(z, masks)
    expected = (lp * fov[:, None].float()).sum(dim=(-2, -1))
    out = mask_log_probs(z, masks, fov=fov)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mask_log_probs(z, masks), lp.sum(dim=(-2, -1)))
    # Out-of-FOV pixels do not count at all: changing them changes nothing.
    masks2 = torch.where(fov[:, None], masks, ~masks)
    z2 = torch.where(fov, z, z + 5.0)
    torch.testing.assert_close(mask_log_probs(z2, masks2, fov=fov), out)


def test_log_probs_give_gradients_to_logits() -> None:
    z = torch.zeros(1, 2, 2, requires_grad=True)
    m = torch.tensor([[[[True, False], [True, True]]]])
    mask_log_probs(z, m).sum().backward()
    # d/dz [m log s(z) + (1-m) log s(-z)] = m - s(z) = +-0.5 at z = 0.
    torch.testing.assert_close(z.grad, torch.tensor([[[0.5, -0.5], [0.5, 0.5]]]))


def test_shape_mismatch_is_an_error_that_names_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[B,K,H,W\]"):
        pixel_log_probs(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool))


def test_entropy_hand_values() -> None:
    # z = 0: p = 0.5, H = ln 2 = 0.69315.
    # z = ln 3: p = 0.75, H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.21576 + 0.34657 = 0.56233.
    h = entropy(_z(0.0, LOG3, -LOG3))
    torch.testing.assert_close(h.flatten(), torch.tensor([LN2, 0.562335, 0.562335]))


def test_kl_hand_value_and_zero_on_itself() -> None:
    # p = 0.75 (z = ln 3), q = 0.5 (z = 0): KL = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5)
    #                                         = 0.75 * 0.405465 - 0.25 * 0.693147 = 0.130812.
    kl = kl_bernoulli(_z(LOG3), _z(0.0))
    torch.testing.assert_close(kl.flatten(), torch.tensor([0.130812]))
    # Reverse direction differs (KL is asymmetric): 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.143841.
    torch.testing.assert_close(kl_bernoulli(_z(0.0), _z(LOG3)).flatten(), torch.tensor([0.143841]))
    z = torch.randn(3, 7, 7, generator=torch.Generator().manual_seed(1)) * 5
    assert torch.equal(kl_bernoulli(z, z), torch.zeros_like(z))


def test_kl_non_negative_on_random_logits_and_grads_vanish_at_reference() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 16, 16, generator=g) * 4
    zr = torch.randn(4, 16, 16, generator=g) * 4
    for t in (0.5, 1.0, 3.0):
        kl = kl_bernoulli(z, zr, temperature=t)
        assert (kl >= 0).all() and torch.isfinite(kl).all()
    # Compare with torch.distributions on moderate logits.
    ref = torch.distributions.kl_divergence(
        torch.distributions.Bernoulli(logits=z), torch.distributions.Bernoulli(logits=zr)
    )
    torch.testing.assert_close(kl_bernoulli(z, zr), ref, atol=1e-5, rtol=1e-4)
    zz = zr.clone().requires_grad_(True)
    kl_bernoulli(zz, zr).sum().backward()
    assert torch.equal(zz.grad, torch.zeros_like(zz.grad))  # exactly: float noise here becomes Adam steps


def test_stable_at_large_logits() -> None:
    big = _z(100.0, -100.0)
    h = entropy(big)
    assert torch.isfinite(h).all() and (h >= 0).all() and h.max() < 1e-30
    m = torch.tensor([True, False, False, True]).reshape(1, 2, 1, 2)
    lp = pixel_log_probs(big, m)
    # The likely action costs ~0 nats, the unlikely one ~100 nats; finite either way.
    torch.testing.assert_close(lp.flatten(), torch.tensor([0.0, 0.0, -100.0, -100.0]))
    # Near-certain opposite pixels: p ~ 1, q = sigmoid(-100) ~ e^-100, KL -> 1 * ln(1 / e^-100) = 100 nats.
    kl = kl_bernoulli(_z(100.0, -100.0, 100.0), _z(-100.0, 100.0, 100.0))
    torch.testing.assert_close(kl.flatten(), torch.tensor([100.0, 100.0, 0.0]))
    zg = big.clone().requires_grad_(True)
    (entropy(zg).sum() + kl_bernoulli(zg, -big).sum() + pixel_log_probs(zg, m).sum()).backward()
    assert torch.isfinite(zg.grad).all()


def test_sampling_frequency_matches_sigmoid() -> None:
    # 4000 samples per pixel: the std of a frequency is <= sqrt(0.25 / 4000) = 0.0079, so 0.03 is ~4 sigma.
    z = _z(-2.0, 0.0, LOG3, 3.0)
    g = torch.Generator().manual_seed(0)
    for t in (1.0, 2.0):
        m = sample_masks(z, k=4000, temperature=t, generator=g)
        assert m.dtype == torch.bool and m.shape == (1, 4000, 1, 4)
        freq = m.float().mean(dim=1).flatten()
        torch.testing.assert_close(freq, torch.sigmoid(z.flatten() / t), atol=0.03, rtol=0)


def test_sampling_is_reproducible_and_has_no_grad() -> None:
    z = torch.randn(2, 8, 8, requires_grad=True)
    a = sample_masks(z, k=3, generator=torch.Generator().manual_seed(5))
    b = sample_masks(z, k=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not a.requires_grad
    with pytest.raises(ValueError, match="k"):
        sample_masks(z, k=0)


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1, 1), (2, 3, 17, 13), (8, 8), (0, 4)])
def test_pack_unpack_round_trip(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    masks = rng.random(shape) > 0.5
    packed = pack_masks(masks)
    assert isinstance(packed, PackedMasks)
    assert packed.data.dtype == np.uint8 and packed.data.ndim == 1
    assert packed.nbytes == -(-masks.size // 8)
    out = unpack_masks(packed)
    assert out.dtype == np.bool_ and out.shape == shape
    np.testing.assert_array_equal(out, masks)


def test_pack_compresses_8x_and_accepts_torch_and_01_ints() -> None:
    masks = torch.rand(2, 8, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_masks(masks)
    assert masks.numel() / packed.nbytes == 8.0
    np.testing.assert_array_equal(unpack_masks(packed), masks.numpy())
    ints = masks.numpy().astype(np.int8)
    np.testing.assert_array_equal(unpack_masks(pack_masks(ints)), masks.numpy())
    with pytest.raises(TypeError, match="binary"):
        pack_masks(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="0 and 1"):
        pack_masks(np.full((4, 4), 2, np.int64))
    with pytest.raises(ValueError, match="bytes"):
        unpack_masks(PackedMasks(data=packed.data[:-1], shape=packed.shape))
