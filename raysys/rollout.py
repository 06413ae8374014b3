"""RolloutWorker: holds a policy copy and samples K masks per image at the current policy version.

A plain class; ``ray.remote(num_gpus=..., num_cpus=..., max_restarts=...)`` is applied where it is launched,
so tests build it in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from envs.datasets import load_dataset
from policies.distributions import pack_masks
from policies.factory import build_policy
from raysys.batches import RolloutBatch
from raysys.config import Config
from raysys.data import dataset_for_split

log = logging.getLogger(__name__)


def sample_seed(seed: int, iteration: int, index: int) -> int:
    """Seed of the K samples of image ``index`` at ``iteration``: the same masks whichever worker (or a
    restarted one) draws them, so retries neither lose nor duplicate samples and resumed runs match."""
    return (seed * 1_000_003 + iteration * 10_007 + index) % (2**63 - 1)


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


class FeatureCache:
    """Frozen features per dataset index, computed once and reused across iterations and K samples."""

    def __init__(self, policy, samples: Sequence, *, batch_size: int = 8) -> None:
        self.policy, self.samples, self.batch_size = policy, samples, batch_size
        self._cache: dict[int, object] = {}

    def get(self, indices: Sequence[int]):
        missing = [i for i in dict.fromkeys(indices) if i not in self._cache]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            feats = self.policy.frozen_features(np.stack([self.samples[i].image for i in chunk]))
            for j, i in enumerate(chunk):
                self._cache[i] = feats.index(slice(j, j + 1))
        first = self._cache[indices[0]]
        return type(first).cat([self._cache[i] for i in indices])

    def __len__(self) -> int:
        return len(self._cache)


class RolloutWorker:
    def __init__(self, cfg: Config, worker_index: int = 0) -> None:
        if cfg.rollout.torch_threads > 0:
            torch.set_num_threads(cfg.rollout.torch_threads)
        self.cfg = cfg
        self.index = worker_index
        self.device = pick_device(cfg.rollout.gpus_per_worker)
        self.policy = build_policy(cfg.policy, seed=cfg.run.seed, device=self.device)
        self.samples = dataset_for_split(cfg.data, "train", load=load_dataset)
        self.features = FeatureCache(self.policy, self.samples)
        self.version = 0

    def ready(self) -> dict[str, object]:
        from raysys.placement import placement

        return {**placement(), "worker": self.index, "version": self.version, "device": str(self.device)}

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Load only the trainable tensors (Ray resolves an ObjectRef argument to the dict)."""
        self.policy.load_trainable_state_dict(state_dict, strict=True)
        self.version = int(version)
        return self.version

    @torch.no_grad()
    def sample(self, indices: Sequence[int], *, iteration: int) -> RolloutBatch:
        """K masks per image [B, K, H, W], sampled from Bernoulli(sigmoid(z / T)) inside the FOV."""
        t0 = time.perf_counter()
        k, temperature = self.cfg.rollout.samples_per_image, self.cfg.rollout.temperature
        indices = [int(i) for i in indices]
        samples = [self.samples[i] for i in indices]
        feats = self.features.get(indices)
        logits = self.policy.mask_logits(
            np.stack([s.image for s in samples]), [s.prompt for s in samples], features=feats
        ).float()
        probs = torch.sigmoid(logits / temperature)
        masks = torch.empty((len(indices), k, *probs.shape[-2:]), dtype=torch.bool, device=probs.device)
        for b, i in enumerate(indices):
            gen = torch.Generator(device=probs.device).manual_seed(
                sample_seed(self.cfg.run.seed, iteration, i)
            )
            u = torch.rand((k, *probs.shape[-2:]), generator=gen, device=probs.device)
            fov = torch.tensor(samples[b].fov, device=probs.device)
            masks[b] = (u < probs[b]) & fov
        return RolloutBatch(
            indices=indices,
            ids=[s.id for s in samples],
            masks=pack_masks(masks.cpu()),
            version=self.version,
            iteration=iteration,
            temperature=temperature,
            worker=self.index,
            seconds=time.perf_counter() - t0,
        )
