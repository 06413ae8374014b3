"""Typed data contracts shared by the task world."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_PROMPT = "Please segment the blood vessels."


@dataclass(frozen=True, eq=False)
class VesselSample:
    """One image of the task world.

    Attributes:
        image: uint8 [H, W, 3] RGB.
        mask: bool [H, W] vessel ground truth (all False when a dataset has no labels for this image).
        fov: bool [H, W] field-of-view mask (all True when the source has none).
        id: unique, human-readable id (file stem or "synthetic-<split>-<seed>").
        prompts: one or more text prompts; ``prompt`` is the first.
        has_mask: False for unlabelled images (GT-free rewards only).
    """

    image: np.ndarray
    mask: np.ndarray
    fov: np.ndarray
    id: str
    prompts: tuple[str, ...] = field(default=(DEFAULT_PROMPT,))
    has_mask: bool = True

    def __post_init__(self) -> None:
        img, mask, fov = self.image, self.mask, self.fov
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(
                f"sample {self.id!r}: image must be uint8 HxWx3, got "
                f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}"
            )
        h, w = img.shape[:2]
        for name, arr in (("mask", mask), ("fov", fov)):
            if not isinstance(arr, np.ndarray) or arr.dtype != np.bool_ or arr.ndim != 2:
                raise ValueError(
                    f"sample {self.id!r}: {name} must be a bool HxW array, got "
                    f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}"
                )
            if arr.shape != (h, w):
                raise ValueError(
                    f"sample {self.id!r}: {name} is {arr.shape[1]}x{arr.shape[0]} (WxH) "
                    f"but the image is {w}x{h}"
                )
        if isinstance(self.prompts, str) or not self.prompts:
            raise ValueError(f"sample {self.id!r}: prompts must be a non-empty tuple of strings")
        object.__setattr__(self, "prompts", tuple(str(p) for p in self.prompts))

    @property
    def prompt(self) -> str:
        return self.prompts[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]
