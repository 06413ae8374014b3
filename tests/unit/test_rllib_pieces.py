"""Pieces of the RLlib experiments that need no Ray: SFT targets per prompt, the (image, prompt) table that
runs the segmenter once per pair, and the environments built from pre-filled outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from envs.morphology import target_mask
from envs.rewards import MultiObjectiveReward
from envs.synthetic import SyntheticFundus
from raysys.config import PROMPT_TARGETS, ConfigError
from raysys.config_io import load_config
from raysys.rllib.prompt import RLlibPromptEnv, prompt_table


@pytest.fixture(scope="module")
def samples():
    return list(SyntheticFundus(n=4, size=64, seed=3))


def test_prompt_targets_differ_and_nest(samples) -> None:
    m = samples[0].mask
    t = {k: target_mask(m, k) for k in PROMPT_TARGETS}
    assert (t["vessels"] == m).all()
    assert t["dilated"].sum() > m.sum() and (t["dilated"] >= m).all() and t["wide"].sum() > t["dilated"].sum()
    assert (t["thick"] <= m).all() and (t["thin"] <= m).all() and not (t["thick"] & t["thin"]).any()
    assert (t["thick"] | t["thin"] == m).all()
    assert 0 < t["centerline"].sum() < m.sum() and (t["core"] <= m).all()
    with pytest.raises(ValueError, match="unknown prompt target"):
        target_mask(m, "arteries")


def test_bank_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="at least 8 prompts"):
        load_config(None, ["rllib.prompt_bank=[a, b]", "rllib.prompt_targets=[vessels, thin]"])
    with pytest.raises(ConfigError, match=r"rllib\.prompt_targets"):
        load_config(None, ["rllib.prompt_targets=[vessels]"])


class _PromptLength:
    """A stand-in segmenter whose threshold depends on the prompt, counting its mask computations."""

    calls = 0

    def frozen_features(self, images):
        import torch

        return torch.as_tensor(np.asarray(images), dtype=torch.float32).mean(-1).flatten(1)[:, :, None]

    def mask_logits(self, images, prompts, features=None):
        import torch

        _PromptLength.calls += len(prompts)
        green = torch.as_tensor(np.asarray(images)[..., 1], dtype=torch.float32) / 255
        level = torch.tensor([0.2 + 0.05 * len(p) % 0.6 for p in prompts])[:, None, None]
        return (level - green) * 10


def test_prompt_table_runs_each_pair_once_and_scores_it(samples) -> None:
    bank = ["a", "bb", "ccc"]
    reward = MultiObjectiveReward()
    _PromptLength.calls = 0
    table = prompt_table(_PromptLength(), samples, bank, reward, batch=3)
    assert _PromptLength.calls == len(samples) * len(bank)
    assert table.gt.shape == table.dice.shape == (4, 3) and table.embedding.shape[0] == 4
    assert table.learned is None and len(table.outcomes_gt) == 12
    assert table.gt[0, 1] == table.outcomes_gt[(0, 1)].total
    assert np.ptp(table.gt.mean(0)) > 0  # the prompt matters here

    env = RLlibPromptEnv(
        {"samples": samples, "bank": bank, "outcomes": table.outcomes_gt,
         "features": {s.id: table.embedding[i] for i, s in enumerate(samples)}}
    )  # fmt: skip
    obs, _ = env.reset(seed=0)
    i = env._index
    assert np.allclose(obs, table.embedding[i])
    _, r, terminated, _, _ = env.step(2)
    assert terminated and r == pytest.approx(table.gt[i, 2]) and env.segmenter_calls == 0
