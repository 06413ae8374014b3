"""The bodies of `raysys sft` and `raysys reward-net` (also the pipeline's sft and reward_net stages): the
supervised baseline of the tiny policy, and the learned reward net with the images and policy masks it
learns from."""

from __future__ import annotations

from pathlib import Path

from raysys.config import Config


def run_sft(cfg: Config, out: Path):
    """Supervised baseline of the tiny policy into ``out`` (``model/``, ``metrics.json``); `raysys sft`."""
    import torch

    from envs.datasets import load_dataset
    from policies.sft import train_sft
    from policies.tiny import TinySa2VA
    from raysys.data import dataset_for_split, inference_for, train_view

    train = train_view(cfg, dataset_for_split(cfg.data, "train", load=load_dataset))
    val = dataset_for_split(cfg.data, "val", load=load_dataset)
    torch.manual_seed(cfg.run.seed)
    return train_sft(
        TinySa2VA(), train, val, cfg.sft, out_dir=out, seed=cfg.run.seed, threshold=cfg.eval.threshold,
        crop=cfg.train_crop, crop_min_fov=cfg.data.crop_min_fov, inference=inference_for(cfg),
        progress=True,
    )  # fmt: skip


def policy_mask_fn(checkpoint: str | Path):
    """Masks of a tiny SFT policy (greedy + 2 samples per image) to mix into reward-net data."""
    import numpy as np
    import torch

    from policies.checkpoint import CheckpointError, load_base_model

    try:
        model = load_base_model(checkpoint).eval()
    except CheckpointError as exc:
        raise CheckpointError(f"--policy-checkpoint: {exc}") from exc

    def masks(sample, rng: np.random.Generator) -> np.ndarray:
        with torch.no_grad():
            prob = torch.sigmoid(model(sample.image[None], [sample.prompt])[0])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        sampled = torch.rand((2, *prob.shape), generator=gen) < prob
        return torch.cat([(prob > 0.5)[None], sampled]).numpy()

    return masks


def reward_net_images(cfg: Config, split: str, n: int) -> list:
    """Labelled images the reward net learns from: ``n`` synthetic images of ``split``, or for folder data
    ``n`` training-view pieces of the split (crops or whole rescaled images, in a seeded order; with crops,
    each round over the images draws new crops), so the net sees what RL rollouts score."""
    import numpy as np

    from envs.datasets import load_dataset
    from envs.synthetic import SyntheticFundus
    from raysys.data import dataset_for_split, train_view

    if cfg.data.kind == "synthetic":
        return list(
            SyntheticFundus(split, n=n, size=cfg.data.size, seed=cfg.data.seed, domain=cfg.data.domain)
        )
    view = train_view(cfg, dataset_for_split(cfg.data, split, load=load_dataset))
    if len(view) == 0:
        raise ValueError(
            f"the {split} split of {cfg.data.root} is empty; the reward net needs labelled images"
        )
    # A seeded order, so n < len(view) still spans the whole split (FIVES lists its categories in turn).
    order = np.random.default_rng([cfg.run.seed, 0x5E]).permutation(len(view))
    pieces = [view.get(int(order[j % len(view)]), j // len(view))[1] for j in range(n)]
    unlabelled = [p.id for p in pieces if not p.has_mask]
    if unlabelled:
        raise ValueError(
            f"the reward net needs labelled images; {split} image {unlabelled[0]} of {cfg.data.root} has no mask"
        )
    return pieces


def run_reward_net(cfg: Config, out: Path, *, policy_checkpoint: str | Path | None = None):
    """Train the learned reward net on labelled images of the configured data (plus SFT policy masks when
    given); `raysys reward-net`."""
    from envs.rewards import MultiObjectiveReward
    from policies.reward_data import build_reward_dataset
    from policies.reward_train import train_reward_net

    rn = cfg.reward_net
    reward_fn = MultiObjectiveReward(cfg.reward) if rn.target == "reward" else None
    masks = policy_mask_fn(policy_checkpoint) if policy_checkpoint else None
    datasets = [
        build_reward_dataset(
            reward_net_images(cfg, split, n),
            masks_per_image=rn.masks_per_image, seed=cfg.run.seed + k, target=rn.target, reward_fn=reward_fn,
            policy_masks=masks,
        )
        for k, (split, n) in enumerate((("train", rn.n_train), ("val", rn.n_val)))
    ]  # fmt: skip
    return train_reward_net(*datasets, rn, out_dir=out, seed=cfg.run.seed, reward_fn=reward_fn)
