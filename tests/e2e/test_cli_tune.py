"""`raysys tune` through the CLI, each call with its own private Ray: a failing trial reported as failed; a 2-trial
sweep over a reward weight interrupted, resumed and finished (table, plot, best YAML); a PBT exploit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from raysys.config_io import load_config
from raysys.testing.rl_small import SMALL_RL, metric_rows, popen_interruptible

pytest.importorskip("ray")

TINY = [*SMALL_RL, "eval.every=1", "learner.iterations=2", "rollout.num_workers=1"]
"""One rollout actor per trial: every trial is a Train run, and each actor costs a process start."""


def _cmd(tmp_path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "raysys",
        "tune",
        f"run.output_dir={tmp_path}",
        f"run.name={name}",
        *TINY,
        *extra,
    ]


def test_a_failing_trial_is_reported_as_failed(tmp_path) -> None:
    proc = subprocess.run(
        _cmd(tmp_path, "f", f"tune.search_space.policy.checkpoint={{grid: [{tmp_path / 'missing'}]}}"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "1 of 1 trials FAILED" in proc.stderr and "missing does not exist" in proc.stderr
    table = pd.read_parquet(tmp_path / "f" / "tune" / "results.parquet")
    assert list(table["status"]) == ["ERROR"] and "CheckpointError" in table["error"][0]
    assert not (tmp_path / "f" / "tune" / "best_config.yaml").exists()


def test_interrupted_sweep_resumes_and_writes_table_plot_and_best_yaml(tmp_path) -> None:
    # Asynchronous rollouts (rollout.max_staleness=1): trials of either mode run, stop and resume.
    extra = ["tune.search_space.reward.weights.dice={grid: [0.4, 0.8]}", "tune.scheduler=fifo",
             "tune.max_concurrent_trials=1", "learner.iterations=3", "learner.checkpoint_every=1",
             "rollout.max_staleness=1"]  # fmt: skip
    trials = tmp_path / "r" / "tune" / "trials"
    proc = popen_interruptible(_cmd(tmp_path, "r", *extra))
    deadline = time.time() + 300
    while time.time() < deadline and sum(len(metric_rows(p)) for p in trials.glob("*/metrics.jsonl")) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "the sweep was interrupted" in err, err[-3000:]
    assert "UNFINISHED" in set(pd.read_parquet(tmp_path / "r" / "tune" / "results.parquet")["status"])

    again = subprocess.run(_cmd(tmp_path, "r", *extra), capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--resume" in again.stderr  # a second sweep never overwrites the first

    resumed = subprocess.run(
        [*_cmd(tmp_path, "r", *extra), "--resume"], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = tmp_path / "r" / "tune"
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 2 and set(table["status"]) == {"COMPLETED"}
    assert sorted(table["reward.weights.dice"]) == [0.4, 0.8]
    assert (table["iterations"] == 3).all() and table["best val/dice"].between(0, 1).all()
    assert len(pd.read_csv(out / "results.csv")) == 2
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    # Every trial is a complete run with its own folder and per-iteration metrics; resumed trials continue
    # from their checkpoint, so no iteration appears twice.
    for trial_id in table["trial_id"]:
        rows = metric_rows(trials / trial_id / "metrics.jsonl")
        assert [r["iteration"] for r in rows] == [0, 1, 2] and all("tune/objective" in r for r in rows)
        # One version behind, but for the first iteration of a run and of a resumed one.
        assert any(r.get("async/staleness_1") == 4 for r in rows[1:])
    best = table.loc[table["best val/dice"].idxmax()]
    best_cfg = load_config(out / "best_config.yaml")
    assert best_cfg.reward.weights.dice == best["reward.weights.dice"]
    assert best_cfg.run.name == "r-best" and best_cfg.tune.search_space == {}
    assert f"best trial {best['trial_id']}" in resumed.stdout and "raysys train" in resumed.stdout


def test_pbt_exploit_restarts_a_trial_from_its_donor(tmp_path) -> None:
    proc = subprocess.run(
        _cmd(tmp_path, "p", "tune.scheduler=pbt", "tune.num_samples=2", "tune.max_concurrent_trials=2",
             "learner.iterations=2", "learner.checkpoint_every=1",
             "tune.search_space.learner.lr={loguniform: [1.0e-4, 1.0e-2]}"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[Exploit] Cloning trial" in proc.stdout + proc.stderr
    table = pd.read_parquet(tmp_path / "p" / "tune" / "results.parquet")
    assert len(table) == 2 and set(table["status"]) == {"COMPLETED"}
    trials = tmp_path / "p" / "tune" / "trials"
    # The exploiting trial went on in a new Train run that loaded the donor's forwarded checkpoint, and
    # its metrics log has no iteration twice (2 iterations keep CI short: the clone may have none left).
    restarted = [t for t in table["trial_id"] if (trials / t / "ray" / "segment_001").is_dir()]
    assert restarted
    its = [r["iteration"] for r in metric_rows(trials / restarted[0] / "metrics.jsonl")]
    assert its == list(range(len(its))) and its
