"""reward.device=cuda on a GPU: the rollout worker scores its samples on CUDA, from the mask tensors it sampled
there, and gives the learner the ScoredRollout the CPU reward actor gives, bit for bit (tests/unit checks the
same scorer on the CPU)."""

from __future__ import annotations

import pytest

from raysys.config_io import load_config
from raysys.reward import RewardWorker
from raysys.rollout import RolloutWorker
from raysys.testing.rl_small import ONE_GPU, SMALL_RL
from raysys.testing.scored import SCORING_CALLS, SCORING_CASES, differences


@pytest.mark.parametrize("case", sorted(SCORING_CASES))
def test_cuda_rollout_scoring_equals_the_cpu_reward_actor(case: str) -> None:
    cfg = load_config(None, [*SMALL_RL, *ONE_GPU, "reward.device=cuda", *SCORING_CASES[case]])
    rollout, reward = RolloutWorker(cfg, 0), RewardWorker(cfg)
    assert rollout.ready()["reward_device"].startswith("cuda")
    for iteration, indices in SCORING_CALLS:
        scored = rollout.sample_scored(indices, iteration=iteration)
        assert not differences(scored, reward.score(rollout.sample(indices, iteration=iteration)))
        assert scored.valid.all()
