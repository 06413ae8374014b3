"""Gymnasium environments of the vessel task world (single-step episodes).

- ``VesselSegEnv``: observe an image (+ prompt id), act with a whole mask (MultiBinary) or a probability map
  (Box), get the multi-objective reward.
- ``PromptSelectionEnv``: pick one prompt of a bank; an injected segmenter turns (image, prompt) into a mask.
- ``PostProcessEnv``: pick (threshold, closing radius, minimum component size) for an injected
  probability map.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.postprocess import postprocess
from envs.rewards import MultiObjectiveReward, RewardResult
from envs.types import VesselSample

Segmenter = Callable[[np.ndarray, str], np.ndarray]
"""(image uint8 [H,W,3], prompt) -> mask bool [H,W]."""
ProbabilityMap = Callable[[VesselSample], np.ndarray]
"""sample -> vessel probability float [H,W] in [0, 1]."""
Featurizer = Callable[[VesselSample], np.ndarray]
"""sample -> float32 [D] observation vector."""

IMAGE_FEATURE_GRID = 8


def image_features(sample: VesselSample, *, grid: int = IMAGE_FEATURE_GRID) -> np.ndarray:
    """A cheap, fixed image descriptor: float32 [6 + grid*grid].

    Per-channel mean and std inside the FOV, then the green channel (where vessels show) averaged over a
    grid x grid layout, all scaled to [0, 1]. Policies supply richer embeddings (frozen features).
    """
    img = sample.image.astype(np.float32) / 255.0
    fov = sample.fov if sample.fov.any() else np.ones_like(sample.fov)
    inside = img[fov]
    h, w = fov.shape
    ys = np.linspace(0, h, grid + 1).astype(int)
    xs = np.linspace(0, w, grid + 1).astype(int)
    green = np.add.reduceat(np.add.reduceat(img[..., 1], ys[:-1], axis=0), xs[:-1], axis=1)
    area = np.outer(np.diff(ys), np.diff(xs))
    return np.concatenate([inside.mean(0), inside.std(0), (green / area).ravel()]).astype(np.float32)


def _check_samples(samples: Sequence[VesselSample], who: str) -> tuple[int, int]:
    if len(samples) == 0:
        raise ValueError(f"{who} needs at least one sample")
    shape = samples[0].shape
    for s in samples:
        if s.shape != shape:
            raise ValueError(
                f"{who}: sample {s.id!r} is {s.shape[1]}x{s.shape[0]} but {samples[0].id!r} is "
                f"{shape[1]}x{shape[0]}; resize the dataset to one size"
            )
        if not s.has_mask:
            raise ValueError(f"{who}: sample {s.id!r} has no ground-truth mask; GT rewards need one")
    return shape


class _SingleStepEnv(gym.Env):
    """Shared episode logic: reset picks an image, one step ends the episode."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, samples: Sequence[VesselSample], reward: MultiObjectiveReward | None) -> None:
        self.samples = samples
        self.shape = _check_samples(samples, type(self).__name__)
        self.reward = reward or MultiObjectiveReward()
        self._targets: dict[int, Any] = {}
        self._index: int | None = None

    def _target(self, index: int):
        if index not in self._targets:  # the GT side of the reward is prepared once per image
            s = self.samples[index]
            self._targets[index] = self.reward.prepare_target(s.mask, s.fov)
        return self._targets[index]

    def _pick(self, options: dict[str, Any] | None) -> int:
        if options and "index" in options:
            index = int(options["index"])
            if not 0 <= index < len(self.samples):
                raise IndexError(f"options['index']={index} outside 0..{len(self.samples) - 1}")
            return index
        return int(self.np_random.integers(len(self.samples)))

    def _score(self, mask: np.ndarray) -> RewardResult:
        if self._index is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before reset()")
        s = self.samples[self._index]
        return self.reward.score(mask & s.fov, self._target(self._index))

    def _finish(self, result: RewardResult, **info: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        s = self.samples[self._index]
        info = {"id": s.id, "components": dict(result.components), "source": result.source, **info}
        obs = self.observe(self._index)
        self._index = None
        return obs, float(result.total), True, False, info

    def observe(self, index: int) -> Any:
        """The observation of image ``index`` (also used to batch-evaluate a trained policy)."""
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._index = self._pick(options)
        return self.observe(self._index), {"id": self.samples[self._index].id}


class VesselSegEnv(_SingleStepEnv):
    """Observation: {"image": uint8 [H,W,3], "prompt": prompt id}. Action: a mask or a probability map.

    ``action_type="mask"``: MultiBinary([H, W]); ``"prob"``: Box [0, 1] of shape [H, W], thresholded at
    ``threshold``. Reward: ``MultiObjectiveReward`` total (info["components"] holds each term).
    """

    def __init__(
        self,
        samples: Sequence[VesselSample],
        *,
        reward: MultiObjectiveReward | None = None,
        action_type: Literal["mask", "prob"] = "mask",
        prompts: Sequence[str] | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(samples, reward)
        h, w = self.shape
        self.prompts = list(prompts) if prompts else sorted({p for s in samples for p in s.prompts})
        self.threshold = threshold
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (h, w, 3), np.uint8),
                "prompt": spaces.Discrete(len(self.prompts)),
            }
        )
        if action_type == "mask":
            self.action_space = spaces.MultiBinary([h, w])
        elif action_type == "prob":
            self.action_space = spaces.Box(0.0, 1.0, (h, w), np.float32)
        else:
            raise ValueError(f"action_type must be 'mask' or 'prob', got {action_type!r}")
        self.action_type = action_type

    def observe(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        prompt = self.prompts.index(s.prompt) if s.prompt in self.prompts else 0
        return {"image": s.image, "prompt": prompt}

    def step(self, action: np.ndarray):
        action = np.asarray(action)
        if action.shape != self.shape:
            raise ValueError(f"action has shape {action.shape}, expected {self.shape}")
        mask = action.astype(bool) if self.action_type == "mask" else action >= self.threshold
        return self._finish(self._score(mask))


class PromptSelectionEnv(_SingleStepEnv):
    """Observation: image features float32 [D]. Action: Discrete(len(prompt_bank)).

    The segmenter runs at most once per (image, prompt): outputs are cached, so an RL run over E epochs of
    the same images costs one segmentation per pair (``segmenter_calls`` counts real calls). ``outcomes``
    pre-fills that cache with rewards computed elsewhere, e.g. once on a driver for many RL workers, or
    scored by a learned reward net; the segmenter may then be None.
    """

    def __init__(
        self,
        samples: Sequence[VesselSample],
        segmenter: Segmenter | None,
        prompt_bank: Sequence[str],
        *,
        reward: MultiObjectiveReward | None = None,
        featurizer: Featurizer = image_features,
        outcomes: Mapping[tuple[int, int], RewardResult] | None = None,
    ) -> None:
        super().__init__(samples, reward)
        if len(prompt_bank) < 2:
            raise ValueError("PromptSelectionEnv needs a prompt bank of at least 2 prompts")
        self.segmenter = segmenter
        self.prompt_bank = list(prompt_bank)
        self.featurizer = featurizer
        self._features: dict[int, np.ndarray] = {}
        self._cache: dict[tuple[int, int], RewardResult] = dict(outcomes or {})
        self.segmenter_calls = 0
        dim = self.observe(0).shape[0]
        self.observation_space = spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.action_space = spaces.Discrete(len(self.prompt_bank))

    def observe(self, index: int) -> np.ndarray:
        if index not in self._features:
            self._features[index] = np.asarray(self.featurizer(self.samples[index]), np.float32)
        return self._features[index]

    def step(self, action: int):
        action = int(action)
        if not self.action_space.contains(action):
            raise ValueError(f"action {action} outside 0..{self.action_space.n - 1}")
        key = (self._index, action)
        if key not in self._cache:
            s = self.samples[self._index]
            if self.segmenter is None:
                raise KeyError(f"no outcome for image {s.id!r} and prompt {action}, and no segmenter to run")
            mask = np.asarray(self.segmenter(s.image, self.prompt_bank[action]), bool)
            self.segmenter_calls += 1
            if mask.shape != self.shape:
                raise ValueError(f"segmenter returned shape {mask.shape} for {s.id!r}, expected {self.shape}")
            self._cache[key] = self._score(mask)
        return self._finish(self._cache[key], prompt=self.prompt_bank[action])


class PostProcessEnv(_SingleStepEnv):
    """Observation: image features + a 16-bin histogram of the probability map in the FOV, float32 [D].

    Action: Box [threshold, closing radius, minimum component size] with bounds
    [0.05, 0, 0] .. [0.95, max_closing_radius, max_min_size]; the radius and size are rounded.
    """

    HIST_BINS = 16

    def __init__(
        self,
        samples: Sequence[VesselSample],
        probability_map: ProbabilityMap,
        *,
        reward: MultiObjectiveReward | None = None,
        featurizer: Featurizer = image_features,
        max_closing_radius: int = 3,
        max_min_size: int = 64,
    ) -> None:
        super().__init__(samples, reward)
        self.probability_map = probability_map
        self.featurizer = featurizer
        self._probs: dict[int, np.ndarray] = {}
        self._obs: dict[int, np.ndarray] = {}
        dim = self.observe(0).shape[0]
        self.observation_space = spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.action_space = spaces.Box(
            np.array([0.05, 0.0, 0.0], np.float32),
            np.array([0.95, float(max_closing_radius), float(max_min_size)], np.float32),
        )

    def _prob(self, index: int) -> np.ndarray:
        if index not in self._probs:
            s = self.samples[index]
            prob = np.asarray(self.probability_map(s), np.float32)
            if prob.shape != self.shape:
                raise ValueError(
                    f"probability map for {s.id!r} has shape {prob.shape}, expected {self.shape}"
                )
            self._probs[index] = prob
        return self._probs[index]

    def observe(self, index: int) -> np.ndarray:
        if index not in self._obs:
            s = self.samples[index]
            hist, _ = np.histogram(self._prob(index)[s.fov], bins=self.HIST_BINS, range=(0.0, 1.0))
            hist = hist / max(int(s.fov.sum()), 1)
            self._obs[index] = np.concatenate([self.featurizer(s), hist]).astype(np.float32)
        return self._obs[index]

    def step(self, action: np.ndarray):
        a = np.clip(np.asarray(action, np.float32), self.action_space.low, self.action_space.high)
        threshold, radius, min_size = float(a[0]), round(float(a[1])), round(float(a[2]))
        s = self.samples[self._index]
        mask = postprocess(
            self._prob(self._index), threshold=threshold, closing_radius=radius, min_size=min_size, fov=s.fov
        )
        return self._finish(self._score(mask), threshold=threshold, closing_radius=radius, min_size=min_size)
