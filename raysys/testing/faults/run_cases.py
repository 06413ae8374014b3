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


def _resume_with_metrics(edit: Callable[[list[str]], list[str]]) -> Callable:
    """A finished 6-iteration run whose Train snapshot registers iteration 5, its metrics.jsonl edited."""

    def argv(w: World) -> list[str]:
        import json

        run = w.finished_run()
        storage = run / "ray" / "done"
        storage.mkdir(parents=True)
        snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "iter_000005"}]}
        (storage / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
        metrics = run / "metrics.jsonl"
        metrics.write_text("".join(f"{line}\n" for line in edit(metrics.read_text().splitlines())))
        return ["train", "--resume", *w.run("run.name=done")]

    return argv


# a run's records that disagree with its checkpoints
CASES += [
    Case(
        "run-resume-torn-metrics-row",
        "run",
        _resume_with_metrics(lambda rows: [*rows[:3], rows[3][: len(rows[3]) // 2], *rows[4:]]),
        2,
        r"metrics\.jsonl has no intact row for iteration\(s\) 3; line\(s\) 4 are not intact.*nothing was changed",
    ),
    Case(
        "run-resume-deleted-metrics-rows",
        "run",
        _resume_with_metrics(lambda rows: rows[:2]),
        2,
        r"no intact row for iteration\(s\) 2, 3, 4, 5",
    ),
]

# Train's checkpoint storage that cannot hold checkpoints: stopped on the driver, before Ray
CASES += [
    Case(
        "run-storage-path-is-a-file",
        "run",
        lambda w: ["train", *w.run(f"run.storage_path={w.file('store.txt', 'x')}")],
        2,
        r"run\.storage_path=.*store\.txt: Ray Train's checkpoint storage .*cannot be created",
    ),
    Case(
        "run-storage-path-under-proc",
        "run",
        lambda w: ["train", *w.run("run.storage_path=/proc/raysys-ckpts")],
        2,
        r"run\.storage_path=/proc/raysys-ckpts: .*cannot be created or written",
    ),
    Case(
        "run-storage-uri-unknown-scheme",
        "run",
        lambda w: ["train", *w.run("run.storage_path=nosuchfs://bucket/raysys")],
        2,
        r"run\.storage_path=nosuchfs://bucket/raysys: .*cannot be created",
    ),
]


def _worker_failure(text: str, *, with_checkpoints: bool) -> Callable:
    """Ray Train ends the run with a worker's error wrapped in its own (the root cause only in the text)."""

    class WorkerGroupError(RuntimeError):
        pass

    def argv(w: World) -> list[str]:
        args = patched(
            "raysys.train.run_training",
            WorkerGroupError(f"Training failed due to worker errors:\n{text}"),
            ["train"],
        )(w)
        if with_checkpoints:
            (w.out / "tiny" / "ray" / "tiny").mkdir(parents=True)
        return args

    return argv


_TRACE = 'Traceback (most recent call last):\n  File "learner.py", line 1, in save\n'

# failures raised inside Ray, named by their root cause; --resume advised only when it can work
CASES += [
    Case(
        "run-worker-disk-full",
        "run",
        _worker_failure(_TRACE + "OSError: [Errno 28] No space left on device", with_checkpoints=True),
        1,
        r"failed: the disk is full; free space where the run writes .*tiny.*--resume",
    ),
    Case(
        "run-worker-out-of-memory",
        "run",
        _worker_failure(_TRACE + "torch.OutOfMemoryError: CUDA out of memory.", with_checkpoints=True),
        1,
        r"ran out of memory; lower rollout\.images_per_iteration.*--resume",
    ),
    Case(
        "run-worker-refused-pickle",
        "security",
        _worker_failure(
            _TRACE + "CheckpointError: learner state x/learner_state.pt cannot be loaded as plain tensors",
            with_checkpoints=True,
        ),
        1,
        r"^(?!.*raysys train \.\.\. --resume).*checkpoint file was refused.*--resume would load the same refused file",
    ),
    Case(
        "run-worker-permission",
        "run",
        _worker_failure(
            _TRACE + "PermissionError: [Errno 13] Permission denied: 'x'", with_checkpoints=False
        ),
        1,
        r"permission denied\); make .*tiny writable.*no checkpoint was written",
    ),
]
