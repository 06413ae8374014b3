"""Bit-for-bit comparison of what the learner receives (ScoredRollout and the RolloutBatch inside it), for the
tests that score one batch on two paths: the CPU reward actors, and the rollout actors' own scoring
(``reward.device: cuda``; on CPU in tests/unit, on CUDA in tests/gpu)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

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
