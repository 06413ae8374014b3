"""`raysys pipeline` through the CLI, stopped after the SFT stage (no Ray needed): status table, manifests,
skip on the second call, --force. The whole pipeline, interrupted in its rl stage and continued, runs in
test_cli_real_layouts.py."""

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
