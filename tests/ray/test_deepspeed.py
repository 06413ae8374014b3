"""The DeepSpeed ZeRO learner path (learner.strategy=deepspeed) through Ray Train, on CPU with gloo.

`make test` installs the `deepspeed` extra, so CI runs it; skipped only where DeepSpeed is not installed.
"""

from __future__ import annotations

import json

import pytest

from raysys.config import ConfigError
from raysys.config_io import load_config
from raysys.testing.rl_small import SMALL_RL as SMALL
from raysys.train import run_training

pytest.importorskip("deepspeed")


def test_zero2_run_trains_and_syncs(ray_local, tmp_path) -> None:
    cfg = load_config(None, [*SMALL, f"run.output_dir={tmp_path}", "run.name=ds", "learner.iterations=2",
                             "learner.strategy=deepspeed", "learner.zero_stage=2", "eval.every=2",
                             "rollout.num_workers=1"])  # fmt: skip
    res = run_training(cfg, progress=False)
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy/version"] for r in rows] == [1, 2]
    assert all(r["update/nonfinite_steps"] == 0 for r in rows)
    assert rows[-1]["policy/kl_old_new"] > 0  # the engine really updated the weights
    assert (res.run_dir / "checkpoints/latest/trainable.safetensors").is_file()


def test_deepspeed_with_ppo_is_rejected() -> None:
    with pytest.raises(ConfigError, match="value head"):
        load_config(None, ["learner.strategy=deepspeed", "learner.algorithm=ppo"])
