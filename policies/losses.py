"""Advantages and losses for mask-policy RL and SFT: pure functions, registered by name.

Every function here takes tensors and keyword-only scalars and returns tensors (no `.item()`, no
host sync), so the learner can log stats whenever it chooses to pay for the sync. Shapes: B images,
K sampled masks per image (the group), H x W pixels, ty x tx tiles.

Pixel means are taken over all FOV pixels of the batch at once (token-level, as DAPO does for
LLM tokens): an image with a larger FOV contributes more pixels to the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from policies.distributions import entropy, kl_bernoulli, pixel_log_probs

__all__ = [
    "ADVANTAGE_FNS",
    "POLICY_LOSSES",
    "STAT_NORMALISERS",
    "baseline_advantages",
    "dpo_loss",
    "entropy_bonus",
    "expand_tiles",
    "get_advantage_fn",
    "get_policy_loss",
    "group_advantages",
    "kl_penalty",
    "loss_normalisers",
    "masked_mean",
    "mean_baseline_advantages",
    "mixed_advantages",
    "policy_gradient_loss",
    "ppo_clipped_loss",
    "rce_loss",
    "rce_weights",
    "rloo_advantages",
    "seg_loss",
    "tile_advantages",
    "value_loss",
]


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: A = (R - mean_group) / (std_group + eps), the group being the K masks of an image.

    std is the POPULATION standard deviation (divide by K, `correction=0`), not the unbiased one, so
    K = 1 and a group of identical rewards both give A = 0 rather than NaN.

    Args:
        rewards: [B,K] (or [B,K,*rest]: each trailing position is normalised independently over K).
        eps: added to the std so a near-constant group does not blow up.

    Returns:
        advantages: same shape as rewards.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


def mean_baseline_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO advantages: A = R - mean_group, no std division (avoids up-weighting easy images).

    Args:
        rewards: [B,K] (or [B,K,*rest]).
        eps: unused; accepted so every advantage function has the same signature.

    Returns:
        advantages: same shape as rewards.
    """
    del eps
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """RLOO advantages: A_i = R_i - mean_{j != i} R_j = K / (K - 1) * (R_i - mean_group); zeros when K = 1.

    Args:
        rewards: [B,K] (or [B,K,*rest]).
        eps: unused; accepted so every advantage function has the same signature.

    Returns:
        advantages: same shape as rewards.
    """
    del eps
    k = rewards.shape[1]
    if k < 2:
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean(dim=1, keepdim=True)) * (k / (k - 1))


ADVANTAGE_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": group_advantages,
    "dr_grpo": mean_baseline_advantages,
    "rloo": rloo_advantages,
}


def get_advantage_fn(name: str) -> Callable[..., torch.Tensor]:
    """Group-baseline advantage function by config name (a key of ADVANTAGE_FNS)."""
    try:
        return ADVANTAGE_FNS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_FNS)}"
        ) from None


def baseline_advantages(
    rewards: torch.Tensor, baseline: torch.Tensor, *, valid: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Value-baseline (PPO) advantages: A = (R - V) / (std(R - V) + eps), one std over the whole batch.

    Args:
        rewards: [B,K] whole-image rewards, or [B,K,ty,tx] tile rewards.
        baseline: V broadcastable to ``rewards`` (e.g. [B,1] image values, [B,1,ty,tx] tile values).
        valid: for tile rewards, [B,ty,tx] bool: tiles that count; the others get 0 (whatever their reward, NaN
            included) and stay out of the std. Fewer than 2 valid values: all advantages are 0.
        eps: added to the std.

    Returns:
        advantages: shaped like ``rewards``.
    """
    adv = rewards - baseline
    if valid is None:
        return adv / (adv.std() + eps)
    keep = valid.bool().unsqueeze(1)
    adv = torch.where(keep, adv, adv.new_zeros(()))
    kept = adv[keep.expand_as(adv)]
    if kept.numel() < 2:  # no spread to normalise by (e.g. no tile with a GT reward): no tile signal
        return torch.zeros_like(adv)
    return adv / (kept.std() + eps)


def tile_advantages(
    tile_rewards: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    eps: float = 1e-6,
    method: str = "grpo",
) -> torch.Tensor:
    """Per-tile group advantages: each tile is normalised across the K samples on its own.

    Spatial credit assignment (docs/design.md): with one reward per image every pixel's advantage carries
    the noise of all other pixels; scoring each tile separately gives each region its own signal.

    Args:
        tile_rewards: [B,K,ty,tx] reward of each sample restricted to each tile.
        valid: [B,ty,tx] bool, tiles that count (e.g. those touching the FOV); None means all.
            Invalid tiles get advantage 0 whatever their reward (even NaN).
        eps: see `group_advantages`.
        method: a key of ADVANTAGE_FNS ("grpo" = per-tile mean/std normalisation).

    Returns:
        advantages: [B,K,ty,tx].
    """
    if tile_rewards.dim() != 4:
        raise ValueError(f"tile_rewards must be [B,K,ty,tx], got shape {tuple(tile_rewards.shape)}")
    adv = get_advantage_fn(method)(tile_rewards, eps=eps)
    if valid is None:
        return adv
    if valid.shape != (tile_rewards.shape[0], *tile_rewards.shape[2:]):
        raise ValueError(
            f"valid must be [B,ty,tx] = {(tile_rewards.shape[0], *tile_rewards.shape[2:])}, got {tuple(valid.shape)}"
        )
    return torch.where(valid.bool().unsqueeze(1), adv, adv.new_zeros(()))


def expand_tiles(adv: torch.Tensor, *, tile: int, height: int, width: int) -> torch.Tensor:
    """Broadcast per-tile values to their pixels; the last row/column of tiles is cropped to H, W.

    Args:
        adv: [B,K,ty,tx] with ty = ceil(H / tile), tx = ceil(W / tile).
        tile: tile side in pixels.
        height, width: H, W of the image.

    Returns:
        per-pixel values: [B,K,H,W].
    """
    ty, tx = adv.shape[-2:]
    if tile < 1 or ty != -(-height // tile) or tx != -(-width // tile):
        raise ValueError(
            f"{ty}x{tx} tiles of side {tile} do not cover a {height}x{width} image; "
            f"expected {-(-height // max(tile, 1))}x{-(-width // max(tile, 1))} tiles"
        )
    out = adv.repeat_interleave(tile, dim=-2).repeat_interleave(tile, dim=-1)
    return out[..., :height, :width]


def mixed_advantages(
    image_adv: torch.Tensor,
    tile_adv: torch.Tensor | Sequence[torch.Tensor],
    *,
    tile: int | Sequence[int],
    height: int,
    width: int,
    tile_weight: float | torch.Tensor,
) -> torch.Tensor:
    """Per-pixel advantage mixing scales: (1 - w) * image advantage + w * its tile's advantage.

    With several tile sizes (multi-scale tiles) a pixel's tile advantage is the mean over the sizes of the
    advantage of the tile holding it.

    Args:
        image_adv: [B,K] whole-image advantages.
        tile_adv: [B,K,ty,tx] per-tile advantages, or one such tensor per size in ``tile``.
        tile, height, width: see `expand_tiles`; ``tile`` is a sequence when ``tile_adv`` is.
        tile_weight: w in [0, 1], one for the batch or one per image ([B]; e.g. 0 for images without tile
            rewards); 0 = pure image-level GRPO, 1 = pure tile-level.

    Returns:
        advantages: [B,K,H,W].
    """
    if torch.is_tensor(tile_weight):
        if tile_weight.shape != image_adv.shape[:1]:
            raise ValueError(f"a per-image tile_weight must be [B], got {tuple(tile_weight.shape)}")
        if not bool(((tile_weight >= 0) & (tile_weight <= 1)).all()):
            raise ValueError("tile_weight must be in [0, 1]")
        tile_weight = tile_weight[:, None, None, None]
    elif not 0.0 <= tile_weight <= 1.0:
        raise ValueError(f"tile_weight must be in [0, 1], got {tile_weight}")
    advs, sizes = ([tile_adv], [tile]) if torch.is_tensor(tile_adv) else (list(tile_adv), list(tile))
    if not advs or len(advs) != len(sizes):
        raise ValueError(f"give one tile size per tile advantage tensor, got {len(sizes)} for {len(advs)}")
    for a in advs:
        if image_adv.shape != a.shape[:2]:
            raise ValueError(
                f"image_adv {tuple(image_adv.shape)} must be [B,K] matching tile_adv {tuple(a.shape)}"
            )
    tiles = expand_tiles(advs[0], tile=sizes[0], height=height, width=width)
    for a, t in zip(advs[1:], sizes[1:], strict=True):
        tiles = tiles + expand_tiles(a, tile=t, height=height, width=width)
    if len(advs) > 1:
        tiles = tiles / len(advs)
    return (1.0 - tile_weight) * image_adv[..., None, None] + tile_weight * tiles


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------


def _broadcast_fov(fov: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B,H,W] fov -> [B,1,...,1,H,W] so it broadcasts against x [B,K,...,H,W]."""
    fov = fov.bool()
    if fov.dim() > x.dim() or fov.shape[-2:] != x.shape[-2:] or fov.shape[0] != x.shape[0]:
        raise ValueError(f"fov {tuple(fov.shape)} does not broadcast over x {tuple(x.shape)} as [B,...,H,W]")
    extra = x.dim() - fov.dim()
    return fov.reshape(fov.shape[0], *([1] * extra), *fov.shape[1:])


def masked_mean(x: torch.Tensor, fov: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of x over FOV pixels (and every other dim), as a scalar tensor.

    Args:
        x: [B,H,W] or [B,K,H,W] (any [B,...,H,W]).
        fov: [B,H,W] bool, broadcast over the K dim; None averages everything.
            An empty FOV gives 0, not NaN. Out-of-FOV values are ignored even if NaN/inf.

    Returns:
        scalar tensor.
    """
    if fov is None:
        return x.mean()
    m = _broadcast_fov(fov, x).expand_as(x)
    total = torch.where(m, x, x.new_zeros(())).sum()
    return total / m.sum().clamp_min(1).to(x.dtype)


def loss_normalisers(
    fov: torch.Tensor, rewards: torch.Tensor, tile_valid: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each image's part of what the RL loss terms average over, by name: a minibatch split into micro-batches
    weights each micro-batch's terms by its share of the minibatch's normaliser, so that the weighted terms,
    and their gradients, sum to the whole minibatch's (``raysys.learner``).

    "pixels": FOV pixels (policy losses, KL, entropy: masked means over K x FOV; K is the same for every image);
    "masks": 1 (``rce_loss`` and the per-image ``value_loss``: means over B x K);
    "tiles": valid tiles (the per-tile ``value_loss``: a mean over K x valid tiles);
    "pairs": 1 where the image has a preference pair, its K rewards not all equal (``dpo_loss``).

    Args:
        fov: [B,H,W] bool. rewards: [B,K]. tile_valid: [B,ty,tx] bool.

    Returns:
        {name: [B] int64}.
    """
    return {
        "pixels": fov.bool().flatten(1).sum(1),
        "masks": torch.ones(fov.shape[0], dtype=torch.long, device=fov.device),
        "tiles": tile_valid.bool().flatten(1).sum(1),
        "pairs": (rewards.amax(1) > rewards.amin(1)).long(),
    }


# ---------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------


def _ratio_stats(
    ratio: torch.Tensor, log_ratio: torch.Tensor, fov: torch.Tensor | None, clip: float
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            # Fraction of pixels whose ratio left the trust region (CleanRL convention: regardless of
            # whether the sign of A made the clip bind).
            "clipfrac": masked_mean(((ratio - 1.0).abs() > clip).to(ratio.dtype), fov),
            # k3 estimator (r - 1) - log r: unbiased for KL(old || new) and >= 0 per sample.
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, fov),
            "ratio_mean": masked_mean(ratio, fov),
        }


def _log_ratio(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if logp_new.shape != logp_old.shape:
        raise ValueError(f"logp_new {tuple(logp_new.shape)} and logp_old {tuple(logp_old.shape)} differ")
    if advantages.dim() == 2:
        advantages = advantages[..., None, None]
    return logp_new - logp_old.detach(), advantages.detach()


def ppo_clipped_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    fov: torch.Tensor | None = None,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate per pixel: -min(r A, clip(r, 1 - c, 1 + c) A), FOV-masked mean.

    Each pixel is an action token with ratio r = exp(logp_new - logp_old) and the advantage of its mask
    (or of its tile, after `mixed_advantages`).

    Args:
        logp_new: [B,K,H,W] pixel log-probs under the policy being updated (with grad).
        logp_old: [B,K,H,W] pixel log-probs under the rollout policy (detached here).
        advantages: [B,K,H,W], [B,K,1,1] or [B,K] (detached here).
        fov: [B,H,W] bool or None.
        clip: c, the trust-region half-width.

    Returns:
        loss: scalar tensor.
        stats: {"clipfrac", "approx_kl", "ratio_mean"} scalar tensors without grad.
    """
    log_ratio, adv = _log_ratio(logp_new, logp_old, advantages)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), fov)
    return loss, _ratio_stats(ratio, log_ratio, fov, clip)


def policy_gradient_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    fov: torch.Tensor | None = None,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unclipped importance-weighted policy gradient: -r A per pixel, FOV-masked mean.

    At r = 1 its gradient is REINFORCE's, -A grad log pi. Same arguments and stats as
    `ppo_clipped_loss` so the two are interchangeable by name; `clip` only feeds the clipfrac stat.

    Returns:
        loss: scalar tensor.
        stats: {"clipfrac", "approx_kl", "ratio_mean"} scalar tensors without grad.
    """
    log_ratio, adv = _log_ratio(logp_new, logp_old, advantages)
    ratio = log_ratio.exp()
    loss = masked_mean(-adv * ratio, fov)
    return loss, _ratio_stats(ratio, log_ratio, fov, clip)


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "ppo_clip": ppo_clipped_loss,
    "pg": policy_gradient_loss,
}


STAT_NORMALISERS: dict[str, str | None] = {
    "clipfrac": "pixels", "approx_kl": "pixels", "ratio_mean": "pixels",
    "dpo_margin": "pairs", "dpo_accuracy": "pairs", "dpo_pairs": None,
}  # fmt: skip
"""What each stat of the policy losses is a mean over (a key of ``loss_normalisers``; None: a count)."""


def get_policy_loss(name: str) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Policy loss by config name (a key of POLICY_LOSSES)."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; choose one of {sorted(POLICY_LOSSES)}") from None


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip: float | None = None,
    old_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of a value baseline (no 1/2 factor), optionally clipped as in PPO2.

    Clipped: v_c = v_old + clip(v - v_old, -c, c); loss = mean(max((v - R)^2, (v_c - R)^2)).

    Args:
        values: [B] or [B,K] predictions (with grad).
        returns: same shape, targets (detached here).
        clip: c, or None for plain MSE.
        old_values: same shape, predictions at rollout time; required when clip is set.

    Returns:
        loss: scalar tensor.
    """
    if values.shape != returns.shape:
        raise ValueError(f"values {tuple(values.shape)} and returns {tuple(returns.shape)} must match")
    returns = returns.detach()
    err = (values - returns).square()
    if clip is None:
        return err.mean()
    if old_values is None:
        raise ValueError("value_loss with clip set needs old_values (the rollout-time value predictions)")
    old = old_values.detach()
    clipped = old + (values - old).clamp(-clip, clip)
    return torch.maximum(err, (clipped - returns).square()).mean()


# ---------------------------------------------------------------------------------------------
# RCE warm-up, regularisers, SFT
# ---------------------------------------------------------------------------------------------


def rce_weights(rewards: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """Reward-weighted CE weights: K * softmax_K(R / beta), so each group's mean weight is 1.

    Args:
        rewards: [B,K].
        beta: temperature; small beta imitates only the best mask, large beta all masks equally.

    Returns:
        weights: [B,K], positive, mean 1 per row.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return torch.softmax(rewards / beta, dim=1) * rewards.shape[1]


def rce_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    weights: torch.Tensor,
    *,
    fov: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Reward-weighted cross-entropy towards sampled masks: -mean_{b,k}(w_bk * mean_FOV log pi(m_bk)).

    Args:
        logits: z, [B,H,W] (with grad).
        masks: [B,K,H,W] bool, sampled masks to imitate.
        weights: [B,K], e.g. `rce_weights(rewards)` (detached here).
        fov: [B,H,W] bool or None; an image with an empty FOV contributes 0.
        temperature: T > 0.

    Returns:
        loss: scalar tensor.
    """
    if weights.shape != masks.shape[:2]:
        raise ValueError(f"weights {tuple(weights.shape)} must be [B,K] = {tuple(masks.shape[:2])}")
    lp = pixel_log_probs(logits, masks, temperature=temperature)
    if fov is None:
        per_mask = lp.mean(dim=(-2, -1))
    else:
        f = fov.bool().unsqueeze(1)
        n = f.sum(dim=(-2, -1)).clamp_min(1).to(lp.dtype)
        per_mask = torch.where(f, lp, lp.new_zeros(())).sum(dim=(-2, -1)) / n
    return -(weights.detach() * per_mask).mean()


def dpo_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    masks: torch.Tensor,
    rewards: torch.Tensor,
    *,
    fov: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on each image's preference pair: its best and worst of K masks by reward.

    loss = -log sigmoid(beta * ((lp(w) - lr(w)) - (lp(l) - lr(l)))), where lp / lr are the policy's /
    reference's per-pixel log-probabilities averaged over the FOV. Pixels where the two masks agree contribute
    the same to both sides and cancel: only the pixels the preference is about move. Images whose K rewards
    are all equal have no pair and count for nothing.

    Args:
        logits, ref_logits: [B,H,W] policy (with grad) and reference logits.
        masks: [B,K,H,W] sampled masks; rewards: [B,K].
        fov: [B,H,W] bool.
        beta: scale of the margin.

    Returns:
        (loss, {"dpo_margin": mean margin, "dpo_accuracy": share of pairs the policy already ranks right,
        "dpo_pairs": pairs used}).
    """
    rows = torch.arange(masks.shape[0], device=masks.device)
    best, worst = rewards.argmax(1), rewards.argmin(1)
    has_pair = rewards[rows, best] > rewards[rows, worst]
    pair = torch.stack([masks[rows, best], masks[rows, worst]], 1)  # [B,2,H,W]
    f = fov.bool()[:, None]
    n = f.sum((-2, -1)).clamp_min(1)

    def per_image(lg: torch.Tensor) -> torch.Tensor:  # [B,2] mean log-prob over the FOV
        return torch.where(f, pixel_log_probs(lg, pair, temperature=temperature), 0.0).sum((-2, -1)) / n

    ratio = per_image(logits) - per_image(ref_logits.detach())
    margin = beta * (ratio[:, 0] - ratio[:, 1])
    used = has_pair.float()
    count = used.sum()
    loss = -(F.logsigmoid(margin) * used).sum() / count.clamp_min(1)
    stats = {
        "dpo_margin": (margin.detach() * used).sum() / count.clamp_min(1),
        "dpo_accuracy": ((margin.detach() > 0).float() * used).sum() / count.clamp_min(1),
        "dpo_pairs": count,
    }
    return loss, stats


def kl_penalty(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    fov: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over FOV pixels of the exact KL(pi || pi_ref); gradients reach `logits` only.

    Args:
        logits: [B,H,W] policy logits (with grad).
        ref_logits: [B,H,W] reference (adapters-off) logits (detached here).

    Returns:
        scalar tensor >= 0.
    """
    return masked_mean(kl_bernoulli(logits, ref_logits.detach(), temperature=temperature), fov)


def entropy_bonus(
    logits: torch.Tensor, *, fov: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over FOV pixels of the Bernoulli entropy; the caller subtracts c * this from the loss.

    Args:
        logits: [B,H,W] (with grad).

    Returns:
        scalar tensor in [0, ln 2].
    """
    return masked_mean(entropy(logits, temperature=temperature), fov)


def seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    fov: torch.Tensor | None = None,
    bce_weight: float = 2.0,
    dice_weight: float = 0.5,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Sa2VA's supervised mask loss: bce_weight * BCE + dice_weight * soft Dice loss on sigmoid(z).

    BCE is the mean over FOV pixels of the batch. Dice is per image, 1 - (2 sum(p t) + s) / (sum p +
    sum t + s) over FOV pixels with smooth s = 1 (Sa2VA's naive dice, eps 1.0), then averaged over B;
    the smoothing makes an empty target predicted empty cost 0.

    Args:
        logits: z, [B,H,W] (with grad).
        target: [B,H,W] bool or float in [0, 1].
        fov: [B,H,W] bool or None.
        bce_weight, dice_weight: Sa2VA uses 2.0 and 0.5.
        smooth: s above.

    Returns:
        loss: scalar tensor.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must match")
    t = target.to(logits.dtype)
    bce = masked_mean(F.binary_cross_entropy_with_logits(logits, t, reduction="none"), fov)
    p = torch.sigmoid(logits)
    if fov is not None:
        f = fov.to(logits.dtype)
        p, t = p * f, t * f
    inter = (p * t).sum(dim=(-2, -1))
    dice = 1.0 - (2.0 * inter + smooth) / (p.sum(dim=(-2, -1)) + t.sum(dim=(-2, -1)) + smooth)
    return bce_weight * bce + dice_weight * dice.mean()
