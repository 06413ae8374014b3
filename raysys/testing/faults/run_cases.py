"""Run faults: a finished run under the same name, ``--resume`` with a changed config or nothing to resume, a
run held by another process, bad pipeline and tune arguments, Ctrl-C and failures mid-command."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from raysys.testing.faults.builders import RUN_NAME, patched
from raysys.testing.faults.harness import Case, World


def _held_lock(w: World) -> list[str]:
    """A second process holds the run's lock (the first run is still going)."""
    import fcntl

    run = w.out / "busy"
    run.mkdir(parents=True)
    fd = os.open(run / ".lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    w.held_fd = fd  # type: ignore[attr-defined]  # released by the other process (fcntl locks are per open)
    return ["train", *w.run("run.name=busy")]


def _over_finished_run(*, other_storage: bool = False, keep_checkpoints: bool = True) -> Callable:
    """``raysys train`` under the name of a finished run (no --resume)."""

    def argv(w: World) -> list[str]:
        run = w.finished_run()
        if not keep_checkpoints:
            shutil.rmtree(run / "checkpoints")
        storage = [f"run.storage_path={w.root / 'elsewhere'}"] if other_storage else []
        return ["train", *w.run("run.name=done", *storage)]

    return argv


def _resume_changed(w: World) -> list[str]:
    run = w.finished_run()
    (run / "ray" / "done").mkdir(parents=True)  # its Ray Train checkpoints
    return ["train", "--resume", *w.run("run.name=done", "learner.lr=1e-3")]


def _failed_with_checkpoints(w: World) -> list[str]:
    argv = patched("raysys.train.run_training", RuntimeError("boom"), ["train"])(w)
    (w.out / "tiny" / "ray" / "tiny").mkdir(parents=True)  # Ray Train checkpoints of the failed run
    return argv


# runs: nothing finished is overwritten, nothing outside the run is touched
CASES: list[Case] = [
    Case("run-finished-not-overwritten", "run", _over_finished_run(), 2, r"already holds a run.*--resume"),
    Case(
        "run-finished-other-storage",
        "run",
        _over_finished_run(other_storage=True),
        2,
        r"already holds a run",
    ),
    Case(
        "run-finished-metrics-only",  # its checkpoints (and Ray storage) are gone: metrics alone are kept
        "run",
        _over_finished_run(keep_checkpoints=False),
        2,
        r"already holds a run",
    ),
    Case("run-resume-changed-config", "run", lambda w: _resume_changed(w), 2, r"changed config.*learner\.lr"),
    Case(
        "run-resume-nothing",
        "run",
        lambda w: ["train", "--resume", *w.run("run.name=fresh")],
        2,
        r"nothing to resume",
    ),
    Case("run-second-process", "run", _held_lock, 2, r"busy.*(in use|running|another)"),
    Case(
        "run-output-dir-is-a-file",
        "run",
        lambda w: ["train", *w.run(f"run.output_dir={w.file('o.txt', 'x')}")],
        2,
        r"o\.txt",
    ),
    Case("run-pipeline-dotdot", "run", lambda w: ["pipeline", *w.run("run.name=..")], 2, RUN_NAME),
    Case("run-pipeline-unknown-stage", "run", lambda w: ["pipeline", *w.run(), "--force", "rll"], 2, r"rll"),
    Case(
        "run-pipeline-from-unknown",
        "run",
        lambda w: ["pipeline", *w.run(), "--from", "evaluate"],
        2,
        r"evaluate",
    ),
    Case(
        "run-pipeline-until-before-from",
        "run",
        lambda w: ["pipeline", *w.run(), "--from", "eval", "--until", "sft"],
        2,
        r"until|from",
    ),
    Case(
        "run-tune-resume-nothing",
        "run",
        lambda w: [
            "tune",
            "--resume",
            *w.run("run.name=sw", "tune.search_space={learner.lr: {grid: [1e-4, 1e-3]}}"),
        ],
        2,
        r"nothing to resume|no sweep",
    ),
    Case("run-tune-empty-space", "run", lambda w: ["tune", *w.run("run.name=sw")], 2, r"tune\.search_space"),
    Case(
        "run-sft-sa2va",
        "run",
        lambda w: [
            "sft",
            *w.run(
                "policy.kind=sa2va", "policy.checkpoint=OpenGVLab/Sa2VA-4B", "policy.trust_remote_code=true"
            ),
        ],
        2,
        r"tiny policy",
    ),
    Case("run-unknown-command", "run", lambda w: ["trian"], 2, r"invalid choice"),
    Case("run-eval-bad-split", "run", lambda w: ["eval", "--split", "dev", *w.run()], 2, r"invalid choice"),
    Case(
        "run-ctrl-c",
        "run",
        patched("raysys.stages.run_sft", KeyboardInterrupt(), ["sft"]),
        130,
        r"interrupted; finished outputs .* are kept",
    ),
    Case(
        "run-failure-nothing-to-resume",
        "run",
        patched("raysys.train.run_training", RuntimeError("boom"), ["train"]),
        1,
        r"failed: RuntimeError: boom.*no checkpoint was written",
    ),
    Case(
        "run-failure-resumable", "run", _failed_with_checkpoints, 1, r"failed: RuntimeError: boom.*--resume"
    ),
    Case(
        "run-pipeline-ctrl-c",
        "run",
        patched("raysys.stages.run_sft", KeyboardInterrupt(), ["pipeline"]),
        130,
        r"raysys pipeline skips finished stages",
    ),
]
