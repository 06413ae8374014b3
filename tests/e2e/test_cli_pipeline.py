"""`raysys pipeline` through the CLI, stopped after the SFT stage (no Ray needed): status table, manifests,
skip on the second call, --force."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysys", *args], capture_output=True, text=True, timeout=600
    )


def test_pipeline_until_sft_then_skip_then_force(tmp_path) -> None:
    common = [f"run.output_dir={tmp_path}", "run.name=p", "data.size=64", "data.n_train=4", "data.n_val=2",
              "data.n_test=2", "sft.steps=2", "sft.eval_every=1", "sft.batch_size=2", "--until", "sft"]  # fmt: skip
    first = _run("pipeline", *common)
    assert first.returncode == 0, first.stderr
    assert "data        ran" in first.stdout and "sft         ran" in first.stdout
    manifest = json.loads((tmp_path / "p" / "sft" / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and "model/model.safetensors" in manifest["outputs"]
    assert "rl" not in first.stdout  # --until stops after sft

    second = _run("pipeline", *common)
    assert second.returncode == 0 and second.stdout.count("skipped (up to date)") == 2

    forced = _run("pipeline", *common, "--force", "sft")
    assert "data        skipped" in forced.stdout and "sft         ran" in forced.stdout

    bad = _run("pipeline", *common, "--force", "nope")
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stderr


def test_an_interrupted_rl_stage_continues_from_its_checkpoints(tmp_path) -> None:
    import signal
    import time

    from raysys.testing.rl_small import SMALL_RL, metric_rows, popen_interruptible

    args = [sys.executable, "-m", "raysys", "pipeline", f"run.output_dir={tmp_path}", "run.name=i", *SMALL_RL,
            "data.n_test=2", "sft.steps=2", "sft.eval_every=2", "sft.batch_size=2", "reward_net.epochs=1",
            "reward_net.n_train=2", "reward_net.n_val=2", "reward_net.masks_per_image=2",
            "learner.iterations=8", "learner.checkpoint_every=1", "eval.every=4", "rollout.num_workers=1",
            "--until", "rl"]  # fmt: skip
    proc = popen_interruptible(args)
    ckpt = tmp_path / "i" / "rl.tmp" / "ray" / "rl.tmp" / "iter_000002"
    deadline = time.time() + 400
    while time.time() < deadline and not ckpt.is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "interrupted" in err, err[-3000:]
    done = [r["iteration"] for r in metric_rows(tmp_path / "i" / "rl.tmp" / "metrics.jsonl")]
    assert done and done == list(range(len(done))) and done[-1] < 7  # stopped mid-run

    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the interrupted run" in again.stderr
    # The checkpointed iterations were kept, not redone: each of the 8 appears exactly once.
    assert [r["iteration"] for r in metric_rows(tmp_path / "i" / "rl" / "metrics.jsonl")] == list(range(8))
