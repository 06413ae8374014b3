"""Frozen-feature caches: the image encoders run once per image (or crop, or window) and the rollout workers,
the learner and validation reuse the result across K samples, epochs and iterations."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from raysys.data import TrainView


def _nbytes(features: object) -> int:
    """Bytes of every tensor in a features object (also inside its lists and tuples: Sa2VA's FPN levels)."""

    def size(x: object) -> int:
        if torch.is_tensor(x):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(size(v) for v in x)
        return 0

    return sum(size(v) for v in vars(features).values())


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
    """Two iterations' worth for crops or jittered images (new every iteration); up to 2 GiB of whole images
    (reused)."""
    if view.varies:
        return FeatureCache(policy, max_items=2 * images_per_iteration)
    return FeatureCache(policy, max_bytes=WHOLE_IMAGE_CACHE_BYTES)
