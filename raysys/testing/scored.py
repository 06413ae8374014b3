"""Bit-for-bit comparison of what the learner receives (ScoredRollout and the RolloutBatch inside it), for the
tests that score one batch on two paths: the CPU reward actors, and the rollout actors' own scoring
(``reward.device: cuda``; on CPU in tests/unit, on CUDA in tests/gpu)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SCORING_CASES = {  # overrides of rl_small.SMALL_RL
    "tiles": [],
    "multi_scale_self_critical": ["reward.tile_sizes=[16,8,32]", "learner.advantage=self_critical"],
    "crops_all_terms": [
        "data.size=96",
        "data.crop=64",
        "reward.tile_sizes=[8,16]",
        "reward.weights.cldice=0.3",
        "reward.weights.betti=0.2",
    ],
}
"""GT rewards with 16-px tiles; multi-scale tiles with greedy masks (self-critical); crops (new every iteration,
their targets cached per box; tile validity differs between them at 8 px) with every term, holes included."""
SCORING_CALLS = ((0, (0, 2, 3)), (1, (1, 2)), (5, (0, 2, 3)), (5, (2,)))
"""(iteration, images) of the rollouts each case scores: the targets of repeated images or crops come from cache."""

TIMINGS = frozenset({"seconds"})
"""Fields that time the work (ScoredRollout.seconds, RolloutBatch.seconds): the only ones that may differ."""


def differences(a: Any, b: Any, where: str = "scored") -> list[str]:
    """Where ``a`` and ``b`` differ, recursively over dataclass fields (timings aside), dicts (keys in order),
    lists and arrays (dtype, shape and every bit: NaNs must sit in the same places); [] when identical."""
    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
    if dataclasses.is_dataclass(a):
        return [
            d
            for f in dataclasses.fields(a)
            if f.name not in TIMINGS
            for d in differences(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
        ]
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"]
        if a.tobytes() != b.tobytes():
            return [f"{where}: values differ at {int((a != b).sum())} of {a.size} entries"]
        return []
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{where}: keys {list(a)} vs {list(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]
