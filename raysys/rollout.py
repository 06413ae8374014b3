"""RolloutWorker: holds a policy copy and samples K masks per image at the current policy version.

A plain class; ``ray.remote(num_gpus=..., num_cpus=..., max_restarts=...)`` is applied where it is launched,
so tests build it in-process.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from envs.datasets import load_dataset
from policies.distributions import pack_masks
from policies.factory import build_policy
from raysys.batches import RolloutBatch
from raysys.config import Config
from raysys.data import TrainView, dataset_for_split, train_view

log = logging.getLogger(__name__)


def sample_seed(seed: int, iteration: int, index: int) -> int:
    """Seed of the K samples of image ``index`` at ``iteration``: the same masks whichever worker (or a
    restarted one) draws them, so retries neither lose nor duplicate samples and resumed runs match."""
    return (seed * 1_000_003 + iteration * 10_007 + index) % (2**63 - 1)


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _nbytes(features: object) -> int:
    return sum(t.numel() * t.element_size() for t in vars(features).values() if torch.is_tensor(t))


class FeatureCache:
    """Frozen features per key (an image, or one crop or window of it), computed once and reused across K
    samples, epochs and, for whole images, iterations. Least recently used entries go first once there are
    more than ``max_items`` or they take more than ``max_bytes`` (the keys of the current call stay)."""

    def __init__(
        self, policy, *, batch_size: int = 8, max_items: int | None = None, max_bytes: int | None = None
    ) -> None:
        self.policy, self.batch_size = policy, batch_size
        self.max_items, self.max_bytes = max_items, max_bytes
        self._cache: OrderedDict[Hashable, object] = OrderedDict()
        self.nbytes = 0

    def get(self, keys: Sequence[Hashable], images: Sequence[np.ndarray]):
        """Features of ``keys`` concatenated in order; ``images`` (uint8, one per key) feed the misses."""
        image_of = dict(zip(keys, images, strict=True))
        missing = [k for k in image_of if k not in self._cache]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            feats = self.policy.frozen_features(np.stack([image_of[k] for k in chunk]))
            for j, k in enumerate(chunk):
                one = type(feats).cat([feats.index(slice(j, j + 1))])  # a copy: the batch can be freed
                self._cache[k] = one
                self.nbytes += _nbytes(one)
        out = [self._cache[k] for k in keys]
        for k in keys:
            self._cache.move_to_end(k)
        keep = len(set(keys))
        while len(self._cache) > keep and (
            (self.max_items is not None and len(self._cache) > self.max_items)
            or (self.max_bytes is not None and self.nbytes > self.max_bytes)
        ):
            self.nbytes -= _nbytes(self._cache.popitem(last=False)[1])
        return type(out[0]).cat(out)

    def __len__(self) -> int:
        return len(self._cache)


WHOLE_IMAGE_CACHE_BYTES = 2 << 30
"""Frozen features of whole training images kept per actor (tiny policy: ~110 B per pixel, so all of DRIVE's
training set; FIVES-sized sets are recomputed as needed)."""


def feature_cache(policy, view: TrainView, images_per_iteration: int) -> FeatureCache:
    """Two iterations' worth for crops (new every iteration); up to 2 GiB of whole images (reused)."""
    if view.cropped:
        return FeatureCache(policy, max_items=2 * images_per_iteration)
    return FeatureCache(policy, max_bytes=WHOLE_IMAGE_CACHE_BYTES)


class RolloutWorker:
    def __init__(self, cfg: Config, worker_index: int = 0) -> None:
        if cfg.rollout.torch_threads > 0:
            torch.set_num_threads(cfg.rollout.torch_threads)
        self.cfg = cfg
        self.index = worker_index
        self.device = pick_device(cfg.rollout.gpus_per_worker)
        self.policy = build_policy(cfg.policy, seed=cfg.run.seed, device=self.device)
        self.train = train_view(cfg, dataset_for_split(cfg.data, "train", load=load_dataset))
        self.features = feature_cache(self.policy, self.train, cfg.rollout.images_per_iteration)
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
        """K masks per image [B, K, H, W] (H x W: the training crop or the whole image), sampled from
        Bernoulli(sigmoid(z / T)) inside the FOV."""
        t0 = time.perf_counter()
        k, temperature = self.cfg.rollout.samples_per_image, self.cfg.rollout.temperature
        indices = [int(i) for i in indices]
        keys, samples = zip(*(self.train.get(i, iteration) for i in indices), strict=True)
        if len({smp.mask.shape for smp in samples}) > 1:
            sizes = sorted({smp.mask.shape for smp in samples})
            raise ValueError(
                f"training images of different sizes {sizes} cannot share a rollout batch; train on crops "
                "(data.crop, e.g. 128)"
            )
        feats = self.features.get(keys, [s.image for s in samples])
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
