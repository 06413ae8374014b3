"""Per-pixel Bernoulli mask policy: sampling, log-probabilities, entropy, KL, bit-packing.

The policy's mask logits z [B,H,W] define one independent Bernoulli per pixel,
m_ij ~ Bernoulli(sigmoid(z_ij / T)), so a whole mask's log-probability is the sum of its
pixels' log-probabilities (docs/design.md, "The RL problem"). Every function that
works in log space uses `logsigmoid` / `softplus` so that |z| = 100 stays finite.

Shapes: B images, K sampled masks per image, H x W pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "PackedMasks",
    "entropy",
    "kl_bernoulli",
    "mask_log_probs",
    "pack_masks",
    "pixel_log_probs",
    "sample_masks",
    "unpack_masks",
]


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def _check_masks(logits: torch.Tensor, masks: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B,H,W], got shape {tuple(logits.shape)}")
    b, h, w = logits.shape
    if masks.dim() != 4 or masks.shape[0] != b or masks.shape[2:] != (h, w):
        raise ValueError(
            f"masks must be [B,K,H,W] = [{b},K,{h},{w}] to match logits, got shape {tuple(masks.shape)}"
        )


@torch.no_grad()
def sample_masks(
    logits: torch.Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample K binary masks per image, pixel-wise m_ij ~ Bernoulli(sigmoid(z_ij / T)).

    Args:
        logits: z, [B,H,W] float.
        k: masks per image (the GRPO group size).
        temperature: T > 0; T > 1 flattens probabilities towards 0.5, T < 1 sharpens them.
        generator: torch RNG for reproducible samples; must live on `logits.device`.

    Returns:
        masks: [B,K,H,W] bool, no grad.
    """
    if k < 1:
        raise ValueError(f"k (masks per image) must be >= 1, got {k}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B,H,W], got shape {tuple(logits.shape)}")
    probs = torch.sigmoid(_scaled(logits.detach().float(), temperature)).unsqueeze(1)
    b, h, w = logits.shape
    u = torch.rand((b, k, h, w), generator=generator, device=logits.device, dtype=probs.dtype)
    return u < probs


def pixel_log_probs(logits: torch.Tensor, masks: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-pixel log pi(m_ij) = m log sigmoid(z/T) + (1 - m) log sigmoid(-z/T).

    Args:
        logits: z, [B,H,W] float; gradients flow back to it.
        masks: m, [B,K,H,W] bool or float in [0, 1].
        temperature: T > 0.

    Returns:
        log-probabilities: [B,K,H,W] float (<= 0).
    """
    _check_masks(logits, masks)
    z = _scaled(logits, temperature).unsqueeze(1)
    m = masks.to(z.dtype)
    return m * F.logsigmoid(z) + (1.0 - m) * F.logsigmoid(-z)


def mask_log_probs(
    logits: torch.Tensor,
    masks: torch.Tensor,
    *,
    fov: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Whole-mask log pi(m) = sum of pixel log-probabilities over the field of view.

    Args:
        logits: z, [B,H,W] float.
        masks: m, [B,K,H,W] bool or float.
        fov: [B,H,W] bool, pixels that count; None counts every pixel.
        temperature: T > 0.

    Returns:
        log-probabilities: [B,K] float.
    """
    lp = pixel_log_probs(logits, masks, temperature=temperature)
    if fov is not None:
        # where, not multiply: an out-of-FOV -inf/NaN must not leak into the sum.
        lp = torch.where(fov.bool().unsqueeze(1), lp, lp.new_zeros(()))
    return lp.sum(dim=(-2, -1))


def entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Exact Bernoulli entropy per pixel, in nats.

    H = p softplus(-z) + (1 - p) softplus(z), with p = sigmoid(z/T) and z already divided by T.
    Both terms are >= 0, so unlike softplus(z) - p z there is no cancellation at large |z|.

    Args:
        logits: z, [B,H,W] (any shape works) float.
        temperature: T > 0.

    Returns:
        entropy: same shape as logits, in [0, ln 2].
    """
    z = _scaled(logits, temperature)
    return torch.sigmoid(z) * F.softplus(-z) + torch.sigmoid(-z) * F.softplus(z)


class _BernoulliKL(torch.autograd.Function):
    """KL(Bernoulli(sigmoid(z)) || Bernoulli(sigmoid(z_ref))) with its analytic gradient.

    dKL/dz = p (1 - p) (z - z_ref) and dKL/dz_ref = q - p (p = sigmoid(z), q = sigmoid(z_ref)): both are
    exactly 0 when z == z_ref. Autograd through the logsigmoid formula instead gives the difference of two
    separately rounded copies of p (1 - p), up to 6e-8 per pixel at identical logits, which Adam's
    normalisation turns into real steps of a policy that sits at its reference.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, zr: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, zr)
        kl = torch.sigmoid(z) * (F.logsigmoid(z) - F.logsigmoid(zr)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - F.logsigmoid(-zr)
        )
        return kl.clamp_min(0.0)  # against rounding; the gradient is the unclamped KL's

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        z, zr = ctx.saved_tensors
        p = torch.sigmoid(z)
        gz = grad * p * torch.sigmoid(-z) * (z - zr) if ctx.needs_input_grad[0] else None
        gzr = grad * (torch.sigmoid(zr) - p) if ctx.needs_input_grad[1] else None
        return gz, gzr


def kl_bernoulli(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Exact per-pixel KL(pi || pi_ref) between Bernoulli(sigmoid(z/T)) and Bernoulli(sigmoid(z_ref/T)).

    KL = p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q)), every log written as a logsigmoid and
    1 - p as sigmoid(-z), so no log(0) appears even at |z| = 100. Clamped at 0 against rounding.
    The gradient is the analytic one, p (1 - p) (z - z_ref) / T for z: exactly 0 at z == z_ref, so a
    policy at its reference gets no KL push from float rounding.

    Args:
        logits: z of the current policy, [B,H,W] (any shape) float.
        ref_logits: z_ref of the reference policy, same shape.
        temperature: T > 0, applied to both.

    Returns:
        KL: same shape as logits, >= 0, in nats.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have the same shape"
        )
    return _BernoulliKL.apply(_scaled(logits, temperature), _scaled(ref_logits, temperature))


@dataclass(frozen=True, eq=False)
class PackedMasks:
    """Binary masks packed 8 pixels per byte for transport between actors.

    Attributes:
        data: uint8 1-D array from `np.packbits` of the flattened masks, ceil(prod(shape) / 8) bytes.
        shape: the original mask array shape, e.g. (B, K, H, W).
    """

    data: np.ndarray
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of packed payload (what crosses the wire)."""
        return int(self.data.nbytes)

    @property
    def numel(self) -> int:
        """Number of mask pixels represented."""
        return math.prod(self.shape)


def pack_masks(masks: np.ndarray | torch.Tensor) -> PackedMasks:
    """Pack binary masks of any shape [..., H, W] into bits (8x smaller than bool).

    Args:
        masks: bool array/tensor, or an integer one holding only 0 and 1.

    Returns:
        PackedMasks holding the bits and the shape for `unpack_masks`.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        if not np.issubdtype(masks.dtype, np.integer):
            raise TypeError(
                f"pack_masks needs binary masks, got dtype {masks.dtype}; threshold first (e.g. probs > 0.5)"
            )
        if masks.size and (masks.min() < 0 or masks.max() > 1):
            raise ValueError("pack_masks got integer masks with values other than 0 and 1")
        masks = masks.astype(bool)
    data = np.packbits(masks.reshape(-1))
    return PackedMasks(data=data, shape=tuple(int(s) for s in masks.shape))


def unpack_masks(packed: PackedMasks) -> np.ndarray:
    """Exact inverse of `pack_masks`.

    Returns:
        masks: bool ndarray of shape `packed.shape`.
    """
    n = packed.numel
    expected = (n + 7) // 8
    if packed.data.dtype != np.uint8 or packed.data.ndim != 1 or packed.data.size != expected:
        raise ValueError(
            f"packed data must be {expected} uint8 bytes for shape {packed.shape}, "
            f"got {packed.data.size} of dtype {packed.data.dtype}"
        )
    return np.unpackbits(packed.data, count=n).astype(bool).reshape(packed.shape)
