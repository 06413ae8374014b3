"""reward.device: the rollout actor that scores its own samples with the torch GT reward gives the learner the
ScoredRollout a CPU reward actor gives, bit for bit (here on the CPU; tests/gpu repeats it on CUDA), and the
driver decides where the reward runs from the config and the machine."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from raysys.config import ConfigError
from raysys.config_io import load_config
from raysys.coordinator import LocalCoordinator
from raysys.reward import RewardWorker, TargetCache, TorchGTScorer
from raysys.rollout import RolloutWorker
from raysys.runtime import (
    required_resources,
    resolve_reward_device,
    reward_actors,
    reward_device,
    rollout_cuda,
)
from raysys.testing.rl_small import SMALL_RL as SMALL
from raysys.testing.scored import SCORING_CALLS, SCORING_CASES, differences
from raysys.tune import sweep_reward_device

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def workers(overrides: list[str]) -> tuple[RolloutWorker, RewardWorker]:
    """A rollout worker that scores its samples with the torch reward on the CPU (the class reward.device=cuda
    uses, on another device), and the CPU reward actor of the same config."""
    cfg = load_config(None, [*SMALL, *overrides])
    rollout = RolloutWorker(cfg, 0)
    rollout.scorer = TorchGTScorer(cfg, rollout.train, device="cpu")
    return rollout, RewardWorker(cfg)


@pytest.mark.parametrize("case", sorted(SCORING_CASES))
def test_rollout_side_scoring_equals_the_reward_actor(case: str) -> None:
    rollout, reward = workers(SCORING_CASES[case])
    for iteration, indices in SCORING_CALLS:
        scored = rollout.sample_scored(indices, iteration=iteration)
        assert not differences(scored, reward.score(rollout.sample(indices, iteration=iteration)))
        assert scored.valid.all() and scored.seconds > 0 and scored.batch.seconds > 0
    if case == "multi_scale_self_critical":
        assert scored.greedy_rewards.shape == (1,) and sorted(scored.scales) == [8, 32]
    keys = {rollout.train.get(i, it)[0] for it, indices in SCORING_CALLS for i in indices}
    assert len(rollout.scorer._targets) == len(keys) == (8 if case == "crops_all_terms" else 4)


def test_an_invalid_image_is_reported_alike_and_the_others_scored() -> None:
    rollout, reward = workers(SCORING_CASES["multi_scale_self_critical"])
    batch, masks, greedy = rollout._sample([0, 2, 4], iteration=3)
    batch.ids[1] = "synthetic_999"  # a crop or image the reward side does not derive
    scored = rollout.scorer.score(batch, masks, greedy)
    assert not differences(scored, reward.score(batch))
    assert scored.valid.tolist() == [True, False, True] and np.isnan(scored.rewards[1]).all()
    assert scored.errors == [
        f"synthetic_999: rollout sampled synthetic_999 but the reward actor derives {rollout.train[2].id}"
    ]


def test_a_non_finite_reward_invalidates_only_its_image(monkeypatch) -> None:
    """One image's NaN fails the batched call; the scorer finds it image by image, as the reward actor would."""
    rollout, _ = workers([])
    real, calls = rollout.scorer.reward.score, []

    def nan_for_second_image(masks, targets, **kw):
        calls.append(len(targets))
        if len(calls) in (1, 3):  # the batch of two, then the second image alone
            raise FloatingPointError(
                "reward is not finite (non-finite components: ['dice']); please report this"
            )
        return real(masks, targets, **kw)

    monkeypatch.setattr(rollout.scorer.reward, "score", nan_for_second_image)
    scored = rollout.sample_scored([0, 2], iteration=0)
    assert calls == [2, 1, 1] and scored.valid.tolist() == [True, False]
    assert "non-finite components" in scored.errors[0] and scored.errors[0].startswith(scored.batch.ids[1])


def test_local_collection_without_reward_workers_scores_on_the_rollout_workers() -> None:
    rollout, reward = workers([])
    on_rollout, stats = LocalCoordinator([rollout], []).collect([0, 1, 2, 3], iteration=2)
    on_actors, _ = LocalCoordinator([rollout], [reward]).collect([0, 1, 2, 3], iteration=2)
    assert not differences(on_rollout, on_actors)
    # time/sample_s is the sampling alone, time/reward_s the scoring inside the rollout worker
    assert stats.sample_s == on_rollout[0].batch.seconds and stats.reward_s == on_rollout[0].seconds > 0


def test_a_rollout_actor_without_cuda_scores_on_its_cpu(caplog) -> None:
    """reward.device=cuda where the Ray GPUs are logical only (rehearsing on a CPU box): the same rewards."""
    cfg = load_config(None, [*SMALL, "rollout.gpus_per_worker=0.25", "reward.device=cuda"])
    with caplog.at_level(logging.WARNING, logger="raysys.rollout"):
        rollout = RolloutWorker(cfg, 1)
    assert "no CUDA device" in caplog.text and rollout.ready()["reward_device"] == "cpu"
    assert not differences(
        rollout.sample_scored([1], iteration=0), RewardWorker(cfg).score(rollout.sample([1], iteration=0))
    )
    with pytest.raises(RuntimeError, match=r"reward\.device=cuda"):
        RolloutWorker(load_config(None, SMALL), 0).sample_scored([1], iteration=0)


# ----------------------------------------------------------------------------------------- where it runs


def test_reward_device_resolution() -> None:
    def where(*overrides: str, cuda: bool = True) -> str:
        return reward_device(load_config(None, [*SMALL, *overrides]), cuda=cuda)[0]

    gpu = "rollout.gpus_per_worker=0.5"
    assert where() == "cpu"  # the default without rollout GPUs: today's reward actors
    assert where(gpu) == "cuda" and where(gpu, cuda=False) == "cpu"  # auto
    assert where(gpu, "reward.device=cpu") == "cpu" and where(gpu, "reward.device=cuda") == "cuda"
    # The learned reward net and post-processing stay with the reward actors, with the reason.
    learned = load_config(
        None, [*SMALL, gpu, "reward.device=cuda", "reward.source=auto", "reward.reward_net=x.pth"]
    )
    assert reward_device(learned) == (
        "cpu",
        "reward.source=auto is scored by the reward actors (the learned reward net runs there)",
    )
    assert where(gpu, "reward.postprocess=true") == "cpu"
    with pytest.raises(ConfigError, match=r"reward\.device.*rollout\.gpus_per_worker=0"):
        load_config(None, [*SMALL, "reward.device=cuda"])


def test_the_driver_resolves_auto_and_reserves_no_idle_reward_actors(monkeypatch, caplog) -> None:
    import ray
    import torch

    gpu = [*SMALL, "rollout.gpus_per_worker=0.5", "run.num_gpus=1"]
    # A private Ray on this machine: CUDA is what torch sees here.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # run.num_gpus on a CPU machine
    with caplog.at_level(logging.INFO, logger="raysys.runtime"):
        assert resolve_reward_device(load_config(None, gpu), private=True).reward.device == "cpu"
    assert "not CUDA devices" in caplog.text
    with pytest.raises(ConfigError, match=r"reward\.device.*not CUDA devices"):
        resolve_reward_device(load_config(None, [*gpu, "reward.device=cuda"]), private=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = resolve_reward_device(load_config(None, gpu), private=True)
    assert on_gpu.reward.device == "cuda" and reward_actors(on_gpu) == 0
    cpu = load_config(None, [*gpu, "reward.device=cpu"])
    # Reward CPUs are reserved only for reward actors that run (SMALL: 0.25 each).
    assert required_resources(cpu)["CPU"] - required_resources(on_gpu)["CPU"] == pytest.approx(0.25)

    # A cluster: GPUs of a type Ray detected on a node the rollout actors may use.
    def node(labels: dict[str, str], gpus: float = 2.0) -> dict:
        return {"Alive": True, "Resources": {"CPU": 8.0, "GPU": gpus}, "Labels": labels}

    rehearsal = [node({"role": "rollout"})]  # `ray start --num-gpus=2` on a CPU machine
    real = [node({"role": "learner", "ray.io/accelerator-type": "H200"}), *rehearsal]
    placed = load_config(None, [*gpu, "rollout.label_selector.role=rollout"])
    for nodes, want in ((rehearsal, False), (real, True)):
        monkeypatch.setattr(ray, "nodes", lambda nodes=nodes: nodes)
        assert rollout_cuda(load_config(None, gpu), private=False) is want
        assert rollout_cuda(placed, private=False) is False  # the H200 node is a learner node
    swept = load_config(None, [*gpu, "tune.search_space.reward.postprocess={grid: [false, true]}"])
    assert sweep_reward_device(swept, private=False).reward.device == "cpu"  # every trial's bundles hold them
    assert sweep_reward_device(load_config(None, gpu), private=False).reward.device == "cuda"


def test_target_cache_keeps_the_current_keys_and_evicts_the_least_recent() -> None:
    prepared = []
    cache = TargetCache(lambda samples: prepared.extend(samples) or [s * 10 for s in samples], max_items=3)
    assert cache.get([("a", 1), ("b", 2), ("a", 1)]) == [10, 20, 10] and prepared == [
        1,
        2,
    ]  # misses in one call
    cache.get([("b", 2)])
    cache.get([("c", 3), ("d", 4)])  # a, the least recently used, goes
    assert cache.get([("b", 2), ("d", 4)]) == [20, 40] and prepared == [1, 2, 3, 4] and len(cache) == 3
    assert cache.get([("a", 1)]) == [10] and prepared[-1] == 1
    sized = TargetCache(lambda s: s, max_bytes=5, nbytes=lambda t: t)
    sized.get([("x", 4), ("y", 4)])  # both stay while they are asked for
    assert len(sized) == 2 and sized.get([("z", 1)]) == [1] and len(sized) == 2 and sized.nbytes == 5
