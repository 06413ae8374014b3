"""The data node of the config -> sequences of VesselSample."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from envs.types import DEFAULT_PROMPT, VesselSample
from envs.windows import crop_box, crop_sample, jitter_sample, rescale_sample, standardize_sample
from raysys.config import Config, DataConfig

if TYPE_CHECKING:
    from policies.evaluation import Inference


class _Mapped(Sequence[VesselSample]):
    """``base`` with ``fn`` applied to each sample as it is read."""

    def __init__(self, base: Sequence[VesselSample], fn: Callable[[VesselSample], VesselSample]) -> None:
        self._base, self._fn = base, fn

    def __len__(self) -> int:
        return len(self._base)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._fn(self._base[index])


def _with_prompt(prompt: str) -> Callable[[VesselSample], VesselSample]:
    """Gives samples that carry only the default prompt the configured one."""

    def fn(s: VesselSample) -> VesselSample:
        return dataclasses.replace(s, prompts=(prompt,)) if s.prompts == (DEFAULT_PROMPT,) else s

    return fn


def dataset_for_split(
    cfg: DataConfig, split: str, *, load: Callable[..., Sequence[VesselSample]]
) -> Sequence[VesselSample]:
    """Load ``split`` ("train", "val" or "test") as the data config describes."""
    kwargs: dict[str, Any]
    if cfg.kind == "synthetic":
        n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
        kwargs = {"n": n, "size": cfg.size, "seed": cfg.seed, "domain": cfg.domain}
    else:
        kwargs = {"val_fraction": cfg.val_fraction} if cfg.val_fraction > 0 else {}
        if cfg.kind in ("polygon_json", "parquet") and cfg.allow_outside_root:
            kwargs["allow_outside_root"] = True
        if cfg.skip_unlabelled:
            kwargs["skip_unlabelled"] = True
    samples = load(cfg.kind, cfg.root, split=split, **kwargs)
    if cfg.standardize:
        samples = _Mapped(samples, standardize_sample)
    return samples if cfg.prompt == DEFAULT_PROMPT else _Mapped(samples, _with_prompt(cfg.prompt))


class TrainView(Sequence[VesselSample]):
    """The training split as iteration ``iteration`` sees it: whole (rescaled) images, or one seeded crop
    per image and iteration that holds at least ``data.crop_min_fov`` FOV; with ``jitter`` > 0 each then
    gets a seeded gamma and contrast per iteration (``rollout.jitter``).

    The rollout actors, the reward actors and the learner each build one from the same config and agree on
    every crop without sending pixels (a crop's id names its box, and the reward actor and learner check
    it). SFT trains on the view's whole (rescaled) images and draws its own crops.
    """

    def __init__(
        self,
        cfg: DataConfig,
        samples: Sequence[VesselSample],
        *,
        crop: int | None,
        seed: int,
        jitter: float = 0.0,
        cache: int = 32,
    ) -> None:
        self.samples, self.seed, self.jitter = samples, int(seed), float(jitter)
        self.crop, self.scale, self.min_fov = crop, cfg.scale, cfg.crop_min_fov
        self._scaled: OrderedDict[int, VesselSample] = OrderedDict()
        self._cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def cropped(self) -> bool:
        return self.crop is not None

    @property
    def varies(self) -> bool:
        """Whether an image's pixels change from one iteration to the next (a new crop or jitter)."""
        return self.cropped or self.jitter > 0

    def __getitem__(self, index: int) -> VesselSample:  # type: ignore[override]
        """The whole image ``index`` at ``data.scale`` (SFT draws its own crops from these)."""
        return self._base(index)

    def _base(self, index: int) -> VesselSample:
        if self.scale == 1.0:
            return self.samples[index]
        if index in self._scaled:
            self._scaled.move_to_end(index)
        else:
            self._scaled[index] = rescale_sample(self.samples[index], self.scale)
            if len(self._scaled) > self._cache:
                self._scaled.popitem(last=False)
        return self._scaled[index]

    def _box(self, index: int, iteration: int, fov: np.ndarray):
        rng = np.random.default_rng([self.seed, int(iteration) & 0xFFFFFFFF, int(index), 0xC0])
        return crop_box(fov, self.crop, rng, min_fov=self.min_fov)

    def get(self, index: int, iteration: int) -> tuple[Hashable, VesselSample]:
        """(feature-cache key, sample) of image ``index`` at ``iteration`` (the key names the crop, and the
        iteration when the pixels are jittered)."""
        base = self._base(index)
        if self.crop is None:
            key, sample = (index,), base
        else:
            box = self._box(index, iteration, base.fov)
            key, sample = (index, box.y0, box.x0, box.h, box.w), crop_sample(base, box, self.crop)
        if self.jitter > 0:
            rng = np.random.default_rng([self.seed, int(iteration) & 0xFFFFFFFF, int(index), 0x717])
            key, sample = (*key, "jitter", int(iteration)), jitter_sample(sample, rng, self.jitter)
        return key, sample


def train_view(cfg: Config, samples: Sequence[VesselSample]) -> TrainView:
    return TrainView(cfg.data, samples, crop=cfg.train_crop, seed=cfg.run.seed, jitter=cfg.rollout.jitter)


def inference_for(cfg: Config) -> Inference:
    """Full-image inference as the config describes: windows of the training crop unless ``eval.window``
    says otherwise, at ``data.scale``."""
    from policies.evaluation import Inference

    window = cfg.train_crop if cfg.eval.window is None else (cfg.eval.window or None)
    return Inference(window=window, overlap=cfg.eval.window_overlap, scale=cfg.data.scale)
