"""`raysys eval` and `raysys export` on a tiny checkpoint: outputs, round trips, identical logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from policies.checkpoint import load_base_model, save_base_model, save_trainable
from policies.config import PolicyConfig
from policies.factory import load_policy
from policies.tiny import TinySa2VA
from raysys.evaluate import load_probs


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysys", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    save_base_model(TinySa2VA(), root / "base")
    policy = load_policy(PolicyConfig(checkpoint=str(root / "base")))
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_trainable(policy, root / "rl")
    return root, policy


def test_eval_writes_per_image_parquet_summary_and_probs(checkpoints, tmp_path) -> None:
    root, _ = checkpoints
    out = _run("eval", "data.size=64", "data.n_test=3", f"policy.checkpoint={root / 'base'}", "eval.postprocess=true",
               "--checkpoint", str(root / "rl"), "--out", str(tmp_path / "ev"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    table = pq.read_table(tmp_path / "ev" / "per_image.parquet").to_pylist()
    assert len(table) == 3 and {"id", "dice", "cldice", "betti0_err", "post_dice"} <= set(table[0])
    summary = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert summary["n_images"] == 3 and summary["mean"]["dice"] == pytest.approx(
        np.mean([r["dice"] for r in table])
    )
    assert len(summary["sweep"]["dice"]) == len(summary["sweep"]["thresholds"])
    assert "postprocessed" in summary
    probs, ids = load_probs(tmp_path / "ev" / "probs.npz")
    assert len(ids) == 3 and all(p.shape == (64, 64) and p.min() >= 0 and p.max() <= 1 for p in probs)


def test_export_round_trips_adapter_and_merged_model(checkpoints, tmp_path) -> None:
    root, policy = checkpoints
    out = _run("export", "data.size=64", "data.n_val=2", f"policy.checkpoint={root / 'base'}",
               "--checkpoint", str(root / "rl"), "--out", str(tmp_path / "ex"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    prompts = ["segment the vessels"] * 2
    with torch.no_grad():
        expected = policy.mask_logits(images, prompts)
        merged = load_base_model(tmp_path / "ex" / "merged")(images, prompts)
        fresh = load_policy(PolicyConfig(checkpoint=str(root / "base")))
        fresh.load_adapter(str(tmp_path / "ex" / "adapter"))
        from_adapter = fresh.mask_logits(images, prompts)
    torch.testing.assert_close(from_adapter, expected)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
