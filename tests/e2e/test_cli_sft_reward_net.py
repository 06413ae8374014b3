"""`raysys sft` and `raysys reward-net` end to end on tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from policies.checkpoint import load_base_model
from policies.reward_net import load_reward_net
from raysys.config_io import load_config


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysys", *args], capture_output=True, text=True, timeout=600
    )


def test_sft_then_reward_net_with_policy_masks(tmp_path) -> None:
    common = [f"run.output_dir={tmp_path}", "run.name=e2e", "data.size=64"]
    out = _run(
        "sft",
        *common,
        "data.n_train=4",
        "data.n_val=2",
        "sft.steps=4",
        "sft.eval_every=2",
        "sft.batch_size=2",
    )
    assert out.returncode == 0, out.stderr
    sft_dir = tmp_path / "e2e" / "sft"
    metrics = json.loads((sft_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["history"]) == 2
    assert set(metrics["val"]) >= {"dice", "recall", "precision", "cldice"}
    assert load_config(sft_dir / "config.yaml").sft.steps == 4
    model = load_base_model(sft_dir / "model")
    assert model(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), ["v"]).shape == (1, 64, 64)
    assert "checkpoint:" in out.stdout and "dice" in out.stdout

    out = _run(
        "reward-net",
        *common,
        "reward_net.n_train=3",
        "reward_net.n_val=2",
        "reward_net.epochs=1",
        "reward_net.masks_per_image=2",
        "--policy-checkpoint",
        str(sft_dir / "model"),
    )
    assert out.returncode == 0, out.stderr
    rn_dir = tmp_path / "e2e" / "reward_net"
    for name in ("best_reward_net.pth", "final_reward_net.pth", "metrics.json", "calibration.png"):
        assert (rn_dir / name).is_file(), name
    report = json.loads((rn_dir / "metrics.json").read_text())
    assert report["n_train"] == 3 * (2 + 3)  # 2 perturbed + 3 policy masks (greedy + 2 samples) per image
    net = load_reward_net(rn_dir / "best_reward_net.pth")
    assert sum(p.numel() for p in net.parameters()) == 140_193
    assert "val_pearson" in out.stdout


def test_sft_rejects_a_sa2va_policy(tmp_path) -> None:
    out = _run(
        "sft",
        f"run.output_dir={tmp_path}",
        "policy.kind=sa2va",
        "policy.checkpoint=/nowhere",
        "policy.trust_remote_code=true",
    )
    assert out.returncode == 2 and "tiny policy" in out.stderr
