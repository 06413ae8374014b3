"""Folder datasets in the real formats and sizes, through the real CLI: `raysys data synth-folder` writes a
DRIVE folder (565x584 .tif/.gif) and a CHASE_DB1 folder (999x960 .jpg/.png); the whole `raysys pipeline`
runs on the DRIVE one with val_fraction (crops for training, sliding windows for every metric), interrupted
in its rl stage and continued from its checkpoints, and `raysys train` / `raysys eval` run on the CHASE one."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from raysys.evaluate import load_probs
from raysys.testing.rl_small import metric_rows, popen_interruptible

FAST = [
    "data.crop=128", "rollout.samples_per_image=4", "rollout.images_per_iteration=2",
    "learner.minibatch_size=2", "learner.epochs=1", "rollout.cpus_per_worker=0.25",
    "reward.cpus_per_actor=0.25", "learner.cpus_per_worker=0.25", "eval.thresholds=[0.3,0.5]", "rollout.num_workers=1",
]  # fmt: skip
"""128-px training crops (and windows), K=4, 2 crops per iteration, fractional CPUs, one rollout actor."""


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysys", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    drive = _run("data", "synth-folder", "--layout", "drive", "--out", str(root / "DRIVE"),
                 "--n-train", "5", "--n-test", "2")  # fmt: skip
    assert drive.returncode == 0, drive.stderr
    chase = _run("data", "synth-folder", "--layout", "chase_db1", "--out", str(root / "CHASE"),
                 "--n-train", "3", "--n-test", "1")  # fmt: skip
    assert chase.returncode == 0, chase.stderr
    return root / "DRIVE", root / "CHASE"


def test_whole_pipeline_on_a_drive_folder_interrupted_in_its_rl_stage(folders, tmp_path) -> None:
    # One pipeline for both checks (each costs a Ray and a Train start): Ctrl-C in the rl stage, then the
    # same command again continues rl from its checkpoints and runs every later stage.
    drive, _ = folders
    args = [sys.executable, "-m", "raysys", "pipeline", f"run.output_dir={tmp_path}", "run.name=drive",
            "data.kind=drive", f"data.root={drive}", "data.val_fraction=0.2", *FAST, "sft.steps=4",
            "sft.eval_every=2", "sft.batch_size=2", "reward_net.epochs=1", "reward_net.n_train=4",
            "reward_net.n_val=2", "reward_net.masks_per_image=2", "learner.iterations=8",
            "learner.checkpoint_every=1", "eval.every=4"]  # fmt: skip
    proc = popen_interruptible(args)
    ckpt = tmp_path / "drive" / "rl.tmp" / "ray" / "rl.tmp" / "iter_000002"
    deadline = time.time() + 600
    while time.time() < deadline and not ckpt.is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "interrupted" in err, err[-3000:]
    done = [r["iteration"] for r in metric_rows(tmp_path / "drive" / "rl.tmp" / "metrics.jsonl")]
    assert done and done == list(range(len(done))) and done[-1] < 7  # stopped mid-run

    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "continuing the interrupted run" in out.stderr
    run = tmp_path / "drive"
    # The checkpointed iterations were kept, not redone: each of the 8 appears exactly once.
    rows = metric_rows(run / "rl" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(8)) and "val/dice" in rows[-1]
    summary = json.loads((run / "data" / "summary.json").read_text())
    assert summary["counts"] == {"train": 4, "val": 1, "test": 2}  # val carved from train, test untouched
    assert summary["image_size_hw"] == [584, 565] and summary["train_crop"] == 128
    table = json.loads((run / "eval" / "comparison.json").read_text())
    assert set(table) == {"sft", "sft@val_best_t", "rl", "rl@val_best_t"}
    probs, ids = load_probs(run / "eval" / "rl" / "probs.npz")
    assert ids == ["01_test", "02_test"]
    assert all(p.shape == (584, 565) for p in probs)  # native resolution, whole image
    report = run / "report" / "report.html"
    for src in re.findall(r'src="([^"]+)"', report.read_text()):
        assert (report.parent / src).is_file(), src
    assert (run / "export" / "merged" / "model.safetensors").is_file()


def test_train_and_eval_on_a_chase_folder(folders, tmp_path) -> None:
    _, chase = folders
    data = ["data.kind=chase_db1", f"data.root={chase}", "data.val_fraction=0.34"]
    train = _run("train", f"run.output_dir={tmp_path}", "run.name=chase_rl", *data, *FAST,
                 "learner.iterations=1", "eval.every=1")  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert [r["iteration"] for r in metric_rows(tmp_path / "chase_rl" / "metrics.jsonl")] == [0]
    ev = _run("eval", f"run.output_dir={tmp_path}", "run.name=chase_rl", *data, *FAST,
              "--checkpoint", str(tmp_path / "chase_rl" / "checkpoints" / "best"),
              "--out", str(tmp_path / "ev"))  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-3000:]
    table = pq.read_table(tmp_path / "ev" / "per_image.parquet").to_pylist()
    assert [r["id"] for r in table] == ["Image_11L"]  # children 11-14 are the test split
    probs, _ = load_probs(tmp_path / "ev" / "probs.npz")
    assert probs[0].shape == (960, 999)
