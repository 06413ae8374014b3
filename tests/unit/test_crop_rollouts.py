"""RL on training crops of a DRIVE-layout folder, in-process: the rollout worker, reward worker and learner
derive the same crop from (image, iteration), a crop the others do not derive is refused, PPO's value head
works on crops, and the feature cache stays within its bounds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from envs.folders import write_dataset_folder
from raysys import keys
from raysys.config_io import load_config
from raysys.features import FeatureCache
from raysys.learner import Learner
from raysys.reward import RewardWorker
from raysys.rollout import RolloutWorker


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, one_torch_thread):
    root = write_dataset_folder("drive", tmp_path_factory.mktemp("f") / "DRIVE", n_train=3, n_test=1)
    return load_config(None, [
        "data.kind=drive", f"data.root={root}", "data.crop=64", "rollout.samples_per_image=2",
        "rollout.images_per_iteration=2", "learner.minibatch_size=2", "learner.epochs=1",
        "learner.algorithm=ppo",
    ])  # fmt: skip


def test_actors_agree_on_crops_and_ppo_updates_on_them(cfg) -> None:
    rollout, reward, learner = RolloutWorker(cfg, 0), RewardWorker(cfg), Learner(cfg)
    batch = rollout.sample([0, 2], iteration=7)
    assert batch.unpack().shape == (2, 2, 64, 64)
    assert all("@" in i for i in batch.ids)  # crop ids name their box
    scored = reward.score(batch)
    assert scored.valid.all(), scored.errors
    assert [learner.train.get(i, 7)[1].id for i in batch.indices] == batch.ids
    assert batch.ids != rollout.sample([0, 2], iteration=8).ids  # a new crop every iteration
    m = learner.update([scored], iteration=7)
    assert m["batch/images"] == 2 and np.isfinite(m["loss/value"]) and np.isfinite(m["loss/policy"])


def test_a_crop_the_others_do_not_derive_is_refused(cfg) -> None:
    rollout, reward, learner = RolloutWorker(cfg, 0), RewardWorker(cfg), Learner(cfg)
    batch = rollout.sample([1], iteration=3)
    moved = dataclasses.replace(batch, iteration=4)  # masks of iteration 3's crop, labelled iteration 4
    scored = reward.score(moved)
    assert not scored.valid.any() and "derives" in scored.errors[0]
    ok = reward.score(batch)
    m = learner.update([dataclasses.replace(ok, batch=moved)], iteration=4)
    assert m["batch/invalid"] == 1 and m["batch/images"] == 0


def test_jittered_crops_reach_the_learner_as_the_rollout_sampled_them(cfg) -> None:
    # rollout.max_staleness=1 ships the rollout's logits, so the learner reports how far its own log-probs of
    # the same masks are from the rollout's (measured: 1.5e-5 on the same pixels, 3.8e-3 on unjittered ones).
    run = {"jitter": 0.4, "max_staleness": 1}
    jit = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, **run))
    rollout, reward = RolloutWorker(jit, 0), RewardWorker(jit)
    scored = reward.score(rollout.sample([0, 2], iteration=7))
    assert scored.valid.all(), scored.errors
    same = Learner(jit).update([scored], iteration=7)[keys.LOGPROB_MISMATCH]
    plain = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_staleness=1))
    other = Learner(plain).update([scored], iteration=7)[keys.LOGPROB_MISMATCH]  # sees unjittered pixels
    assert same < 1e-4 and other > 20 * same


class _CountingPolicy:
    def __init__(self) -> None:
        self.calls = 0

    def frozen_features(self, images: np.ndarray):
        from policies.tiny import TinyFeatures

        self.calls += 1
        t = torch.zeros(len(images), 4, 8, 8)  # 1 KiB per image
        return TinyFeatures(t, t, t, t.flatten(2), (8, 8))


def test_feature_cache_reuses_and_stays_within_its_bounds() -> None:
    policy = _CountingPolicy()
    cache = FeatureCache(policy, max_bytes=3 * 4 * 1024)  # three images' worth (4 tensors of 1 KiB each)
    image = np.zeros((8, 8, 3), np.uint8)
    cache.get([0, 1], [image] * 2)
    cache.get([0, 1], [image] * 2)
    assert policy.calls == 1 and len(cache) == 2
    cache.get([2, 3, 4], [image] * 3)
    assert len(cache) == 3 and cache.nbytes <= 3 * 4 * 1024  # the oldest went first
    by_items = FeatureCache(policy, max_items=2)
    feats = by_items.get([5, 6, 7], [image] * 3)
    assert len(feats) == 3 and len(by_items) == 3  # the keys of the current call always stay
    by_items.get([8], [image])
    assert len(by_items) == 2
