"""`raysys prompt-rl` (GT reward, then the GT-free learned-reward variant) and `raysys postproc-rl` through
the CLI: 2 RLlib PPO iterations each on CPU, results JSON with the fixed baselines, metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raysys.testing.rl_small import metric_rows

pytest.importorskip("ray.rllib")

TINY = ["data.size=64", "data.n_train=6", "data.n_val=3", "data.n_test=3", "rllib.iterations=2",
        "rllib.train_batch_size=32", "rllib.minibatch_size=16", "rllib.segmenter_steps=100",
        "sft.batch_size=4", "run.num_cpus=4"]  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysys", *args], capture_output=True, text=True, timeout=600
    )


def test_prompt_rl_gt_then_learned_then_postproc_rl(tmp_path) -> None:
    common = [*TINY, f"run.output_dir={tmp_path}", "run.name=r"]
    gt = _run("prompt-rl", *common)
    assert gt.returncode == 0, gt.stderr[-3000:]
    res = json.loads((tmp_path / "r" / "prompt_rl" / "results.json").read_text())
    assert res["segmenter_runs"] == 12 * 8  # every (image, prompt) pair once
    base = res["baselines"]["test"]
    assert base["oracle_reward"] >= base["fixed_reward"] and base["oracle_reward"] >= base["random_reward"]
    seed = res["seeds"][0]
    assert seed["iterations_run"] == 2 and sum(seed["test"]["action_share"]) == pytest.approx(1.0)
    rows = metric_rows(tmp_path / "r" / "prompt_rl" / "seed_0" / "metrics.jsonl")
    assert len(rows) == 2 and {
        "rollout/ep_rew_mean",
        "policy/entropy",
        "val/reward",
        "policy/action_0_share",
    } <= set(rows[0])
    assert "best fixed prompt" in gt.stdout and "random prompt" in gt.stdout

    segmenter = res["segmenter"]
    net = _run("reward-net", *common, "reward_net.epochs=1", "reward_net.n_train=3", "reward_net.n_val=2",
               "reward_net.masks_per_image=2", "--out", str(tmp_path / "rn"))  # fmt: skip
    assert net.returncode == 0, net.stderr[-3000:]
    learned = _run("prompt-rl", *common, "rllib.reward=learned", f"policy.checkpoint={segmenter}",
                   f"reward.reward_net={tmp_path / 'rn' / 'best_reward_net.pth'}")  # fmt: skip
    assert learned.returncode == 0, learned.stderr[-3000:]
    lres = json.loads((tmp_path / "r" / "prompt_rl_learned" / "results.json").read_text())
    assert lres["reward"] == "learned" and -1 <= lres["learned_vs_gt_reward_on_test"]["spearman"] <= 1
    assert "learned_reward" in lres["seeds"][0]["test"] and "learned vs GT reward" in learned.stdout

    post = _run("postproc-rl", *common, f"policy.checkpoint={segmenter}")
    assert post.returncode == 0, post.stderr[-3000:]
    pres = json.loads((tmp_path / "r" / "postproc_rl" / "results.json").read_text())
    assert pres["baselines"]["grid_size"] == 7 * 4 * 5
    assert pres["seeds"][0]["iterations_run"] == 2 and 0 <= pres["seeds"][0]["test"]["dice"] <= 1
    assert "best global" in post.stdout


def test_postproc_rl_needs_a_trained_segmenter(tmp_path) -> None:
    proc = _run("postproc-rl", *TINY, f"run.output_dir={tmp_path}")
    assert proc.returncode == 2 and "needs a trained segmenter" in proc.stderr
