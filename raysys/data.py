"""The data node of the config -> sequences of VesselSample."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from envs.types import DEFAULT_PROMPT, VesselSample
from raysys.config import DataConfig


class _WithPrompt(Sequence[VesselSample]):
    """Gives samples that carry only the default prompt the configured one, lazily."""

    def __init__(self, base: Sequence[VesselSample], prompt: str) -> None:
        self._base, self._prompt = base, prompt

    def __len__(self) -> int:
        return len(self._base)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        s = self._base[index]
        if s.prompts == (DEFAULT_PROMPT,):
            s = dataclasses.replace(s, prompts=(self._prompt,))
        return s


def dataset_for_split(
    cfg: DataConfig, split: str, *, load: Callable[..., Sequence[VesselSample]]
) -> Sequence[VesselSample]:
    """Load ``split`` ("train", "val" or "test") as the data config describes."""
    kwargs: dict[str, Any]
    if cfg.kind == "synthetic":
        n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
        kwargs = {"n": n, "size": cfg.size, "seed": cfg.seed}
    else:
        kwargs = {"val_fraction": cfg.val_fraction} if cfg.val_fraction > 0 else {}
    samples = load(cfg.kind, cfg.root, split=split, **kwargs)
    return samples if cfg.prompt == DEFAULT_PROMPT else _WithPrompt(samples, cfg.prompt)
