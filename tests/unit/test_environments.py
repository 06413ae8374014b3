"""Gymnasium environments: the env checker passes, rewards and caching behave."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs.environments import PostProcessEnv, PromptSelectionEnv, VesselSegEnv, image_features
from envs.postprocess import postprocess, remove_small_components
from envs.rewards import MultiObjectiveReward
from envs.types import VesselSample


def _sample(i: int, size: int = 48) -> VesselSample:
    """A vertical 3-px vessel and a horizontal 1-px vessel on a plain background, full FOV."""
    mask = np.zeros((size, size), bool)
    mask[4:-4, 10 + i : 13 + i] = True
    mask[20, 6:-6] = True
    img = np.full((size, size, 3), (180, 90, 40), np.uint8)
    img[mask] = (120, 40, 20)
    return VesselSample(img, mask, np.ones_like(mask), f"toy-{i}")


@pytest.fixture
def samples() -> list[VesselSample]:
    return [_sample(i) for i in range(3)]


@pytest.mark.parametrize("action_type", ["mask", "prob"])
def test_vessel_seg_env_passes_checker_and_rewards_gt_best(samples, action_type) -> None:
    env = VesselSegEnv(samples, action_type=action_type)
    check_env(env, skip_render_check=True)
    _, info = env.reset(seed=0, options={"index": 1})
    assert info["id"] == "toy-1"
    perfect = samples[1].mask.astype(np.int8 if action_type == "mask" else np.float32)
    _, r_gt, terminated, truncated, info = env.step(perfect)
    assert terminated and not truncated
    assert info["source"] == "gt" and "dice" in info["components"]
    assert r_gt == pytest.approx(MultiObjectiveReward()(samples[1].mask, samples[1].mask).total)
    env.reset(options={"index": 1})
    _, r_empty, *_ = env.step(np.zeros_like(perfect))
    assert r_gt > r_empty


def test_step_before_reset_and_bad_shapes_raise(samples) -> None:
    env = VesselSegEnv(samples)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(samples[0].mask.astype(np.int8))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((3, 3), np.int8))


def test_mixed_sizes_are_rejected_by_name(samples) -> None:
    with pytest.raises(ValueError, match="toy-9"):
        VesselSegEnv([*samples, _sample(9, size=40)])


def test_prompt_selection_caches_each_image_prompt_pair(samples) -> None:
    calls: list[str] = []

    def segmenter(image: np.ndarray, prompt: str) -> np.ndarray:
        calls.append(prompt)
        dark = image[..., 1] < 60
        # "thin" prompts find only the 1-px vessel, "all" prompts find everything.
        if "thin" in prompt:
            only_row = np.zeros_like(dark)
            only_row[20] = dark[20]
            return only_row
        return dark

    bank = ["segment the thin vessels", "segment all vessels"]
    check_env(PromptSelectionEnv(samples, segmenter, bank), skip_render_check=True)
    calls.clear()
    env = PromptSelectionEnv(samples, segmenter, bank)
    rewards = {}
    for _ in range(3):
        for action in (0, 1):
            env.reset(options={"index": 0})
            _, r, *_ = env.step(action)
            rewards.setdefault(action, set()).add(r)
    assert env.segmenter_calls == 2 and len(calls) == 2  # one call per (image, prompt), then the cache
    assert all(len(v) == 1 for v in rewards.values())
    assert rewards[1].pop() > rewards[0].pop()  # the prompt matters


def test_prompt_selection_needs_two_prompts(samples) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        PromptSelectionEnv(samples, lambda img, p: img[..., 0] > 0, ["only one"])


def test_postprocess_env_threshold_matters(samples) -> None:
    def prob_map(s: VesselSample) -> np.ndarray:
        rng = np.random.default_rng(0)
        return np.clip(0.6 * s.mask + 0.35 * rng.random(s.mask.shape), 0, 1).astype(np.float32)

    env = PostProcessEnv(samples, prob_map)
    check_env(env, skip_render_check=True)
    env.reset(options={"index": 0})
    _, r_good, _, _, info = env.step(np.array([0.5, 0, 0], np.float32))
    assert info["threshold"] == pytest.approx(0.5)
    env.reset(options={"index": 0})
    _, r_low, *_ = env.step(np.array([0.1, 0, 0], np.float32))  # everything is foreground
    assert r_good > r_low
    assert env.observation_space.shape == (image_features(samples[0]).shape[0] + PostProcessEnv.HIST_BINS,)


def test_postprocess_closing_bridges_gaps_and_min_size_removes_specks() -> None:
    prob = np.zeros((20, 20), np.float32)
    prob[9:12, 2:9] = 0.9
    prob[9:12, 10:18] = 0.9  # a 3-px vessel with a one-pixel gap at x = 9
    prob[2, 2] = 0.9  # a single-pixel speck
    plain = postprocess(prob, threshold=0.5)
    assert not plain[10, 9] and plain[2, 2]
    closed = postprocess(prob, threshold=0.5, closing_radius=1, min_size=3)
    assert closed[10, 9] and not closed[2, 2]
    assert closed[10, 2] and closed[10, 17]  # closing does not erode the ends at the border pad
    fov = np.zeros((20, 20), bool)
    fov[:, :10] = True
    assert not postprocess(prob, threshold=0.5, fov=fov)[:, 10:].any()


def test_remove_small_components_uses_8_connectivity() -> None:
    m = np.zeros((6, 6), bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True  # a diagonal: one 8-connected component of 3 pixels
    m[5, 5] = True
    out = remove_small_components(m, min_size=2)
    assert out[0, 0] and out[2, 2] and not out[5, 5]
