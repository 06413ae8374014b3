"""The interface every segmentation policy implements (tiny and real Sa2VA alike)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class SegmentationPolicy(Protocol):
    """A text-promptable segmenter whose mask logits are the RL policy's parameters.

    ``images`` are uint8 [B, H, W, 3] (numpy or torch); the task resolution is the image's own H x W.
    """

    def frozen_features(self, images: Any) -> Any:
        """Features of the frozen parts for ``images``, computed once and reused across K samples and by
        the learner. Pass them back as ``features=`` to :meth:`mask_logits`."""
        ...

    def mask_logits(
        self, images: Any, prompts: Sequence[str], *, features: Any | None = None
    ) -> torch.Tensor:
        """float [B, H, W] mask logits with autograd through the trainable parameters."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trainable tensors (LoRA + heads), detached, on CPU, under stable names."""
        ...

    def load_trainable_state_dict(
        self, state_dict: dict[str, torch.Tensor], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Load trainable tensors; returns (missing, unexpected) names and raises when ``strict`` and any
        trainable tensor is missing or unexpected."""
        ...

    def reference(self) -> AbstractContextManager[None]:
        """Context in which the policy is the reference policy (adapters and head deltas disabled)."""
        ...

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters an optimiser updates."""
        ...
