"""Nothing lost: run names stay inside the output folder, a finished run is never overwritten, --resume keeps
the run's settings, and an interrupted resumable pipeline stage continues where it stopped (no Ray needed:
every check here happens before Ray starts, or uses stand-in stages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import raysys.pipeline as pipeline_mod
from raysys.config import ConfigError
from raysys.config_io import load_config, save_config
from raysys.pipeline import STAGES, Pipeline, Stage
from raysys.train import check_resumable_config, run_training


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "", ".hidden", "-x", "a b", "~"])
def test_run_names_must_be_plain_names(name) -> None:
    with pytest.raises(ConfigError, match=r"run\.name"):
        load_config(None, [f"run.name={name}"])


def test_plain_run_names_are_accepted() -> None:
    assert load_config(None, ["run.name=drive-2.v1_b"]).run_dir.name == "drive-2.v1_b"


def _finished_run(tmp_path: Path) -> tuple[list[str], Path]:
    overrides = [f"run.output_dir={tmp_path}", "run.name=done"]
    run = tmp_path / "done"
    (run / "checkpoints" / "best").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    save_config(load_config(None, overrides), run / "config.yaml")
    return overrides, run


def test_a_finished_run_is_never_overwritten_whatever_its_storage(tmp_path) -> None:
    overrides, run = _finished_run(tmp_path)  # its Ray storage folder is gone (or elsewhere)

    def files() -> dict:
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    for extra in ([], [f"run.storage_path={tmp_path / 'elsewhere'}"]):
        with pytest.raises(FileExistsError, match="already holds a run"):
            run_training(load_config(None, [*overrides, *extra]), progress=False)
    assert files() == before


def test_resume_refuses_a_changed_config_and_keeps_the_saved_one(tmp_path) -> None:
    overrides, run = _finished_run(tmp_path)
    saved = run / "config.yaml"
    text = saved.read_text()
    with pytest.raises(ConfigError, match=r"learner.lr: 0.0003 -> 0.001"):
        check_resumable_config(load_config(None, [*overrides, "learner.lr=1e-3"]), saved)
    check_resumable_config(load_config(None, [*overrides, "learner.iterations=500", "run.num_cpus=8"]), saved)
    (run / "ray" / "done").mkdir(parents=True)  # checkpoints exist: --resume gets past the storage check
    with pytest.raises(ConfigError, match="changed config"):
        run_training(load_config(None, [*overrides, "reward.weights.dice=0.9"]), resume=True, progress=False)
    assert saved.read_text() == text


REAL_STAGES = pipeline_mod._stages()


def _fake_stages(calls: list[str], interrupt: dict[str, bool]) -> dict[str, Stage]:
    def make(name: str):
        def run(cfg, inputs, out: Path):
            calls.append(name)
            progress = out / "progress.txt"
            done = progress.read_text() if progress.is_file() else ""
            progress.write_text(done + "x")
            if interrupt.pop(name, False):
                raise KeyboardInterrupt
            (out / "result.txt").write_text(progress.read_text())
            return {}

        return run

    real = REAL_STAGES
    return {
        n: Stage(n, real[n].inputs, make(n), ("result.txt",), resumable=real[n].resumable) for n in STAGES
    }


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A pipeline of stand-in stages whose rl stage was interrupted (Ctrl-C) after doing some work."""
    calls: list[str] = []
    interrupt = {"rl": True}
    monkeypatch.setattr(pipeline_mod, "_stages", lambda: _fake_stages(calls, interrupt))
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=p"])
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg, progress=False).run()
    return cfg, calls, interrupt


def test_an_interrupted_rl_stage_continues_and_other_stages_start_over(tmp_path, interrupted) -> None:
    cfg, calls, interrupt = interrupted
    assert (tmp_path / "p" / "rl.tmp" / "progress.txt").read_text() == "x"
    Pipeline(cfg, progress=False).run()
    assert (tmp_path / "p" / "rl" / "result.txt").read_text() == "xx"  # the kept partial work went on
    assert calls.count("rl") == 2 and calls.count("sft") == 1  # finished stages were skipped

    interrupt["eval"] = True  # not resumable: a rerun clears its partial output
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg, progress=False).run(force=("eval",))
    Pipeline(cfg, progress=False).run(force=("eval",))
    assert (tmp_path / "p" / "eval" / "result.txt").read_text() == "x"


def test_a_changed_config_does_not_continue_a_stale_partial_stage(tmp_path, interrupted) -> None:
    changed = load_config(None, [f"run.output_dir={tmp_path}", "run.name=p", "learner.lr=1e-3"])
    Pipeline(changed, progress=False).run()
    assert (tmp_path / "p" / "rl" / "result.txt").read_text() == "x"  # started over with the new settings
    started = json.loads((tmp_path / "p" / "rl" / ".started.json").read_text())
    assert started == Pipeline(changed, progress=False).expected("rl")


def test_a_second_process_on_the_same_run_is_refused_at_once(tmp_path) -> None:
    import subprocess
    import sys

    from raysys.runtime import run_lock

    run = tmp_path / "busy"
    with run_lock(run):
        probe = (
            "from pathlib import Path; from raysys.runtime import run_lock\n"
            f"with run_lock(Path({str(run)!r})): pass"
        )
        other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "in use by another raysys process (pid" in other.stderr
    with run_lock(run):  # released when the first run ends
        pass


def test_resume_drops_a_metrics_row_torn_by_a_killed_process(tmp_path) -> None:
    from raysys.sink import MetricsSink

    rows = "".join(f'{{"iteration": {i}, "x": 1}}\n' for i in range(4))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"iteration": 4, "x"')  # killed mid-write
    MetricsSink(str(tmp_path), start_iteration=3)
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in kept] == [0, 1, 2]


def test_ctrl_c_stops_every_learner_rank_at_the_same_iteration(tmp_path) -> None:
    from raysys.sink import MetricsSink

    sink = MetricsSink(str(tmp_path / "a"), start_iteration=3)
    assert sink.stop_iteration() is None
    assert sink.request_stop() == 4  # nothing logged yet: iteration 3 may already run, 4 has not started
    sink = MetricsSink(str(tmp_path / "b"))
    for i in range(3):
        sink.log({"iteration": i})
    assert sink.request_stop() == 4 and sink.stop_iteration() == 4
    sink.log({"iteration": 3})
    assert sink.request_stop() == 4  # a second Ctrl-C does not move it


def test_the_metrics_sink_writes_tensorboard_scalars_and_the_best_weights_without_torch(tmp_path) -> None:
    # The sink is a process of every run: it writes what the learner serialised and never imports torch.
    import subprocess
    import sys

    import torch
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    from policies.checkpoint import load_trainable, trainable_files
    from policies.factory import build_policy
    from raysys.config_io import load_config

    policy = build_policy(load_config(None).policy, seed=3)
    blob = tmp_path / "files.json"
    files = trainable_files(policy.trainable_state_dict(), {"iteration": 1})
    blob.write_text(json.dumps({k: v.hex() for k, v in files.items()}))
    code = f"""
import json, sys
from raysys.sink import MetricsSink
sink = MetricsSink({str(tmp_path / "run")!r})
sink.log({{"iteration": 0, "val/dice": 0.25, "reward/mean": float("nan"), "note": "x"}})
sink.log({{"iteration": 1, "val/dice": 0.5}})
files = {{k: bytes.fromhex(v) for k, v in json.loads(open({str(blob)!r}).read()).items()}}
print(sink.save_best(files))
sink.close()
print(sorted(m for m in ("torch", "tensorflow") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best, imported = proc.stdout.split("\n")[:2]
    assert imported == "[]"
    other = build_policy(load_config(None).policy, seed=4)
    assert load_trainable(other, best)["iteration"] == 1
    for k, v in policy.trainable_state_dict().items():
        assert torch.equal(other.trainable_state_dict()[k], v), k
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    read = [Event.FromString(r) for r in RawEventFileLoader(str(events)).Load()]
    scalars = [(e.step, v.tag, v.simple_value) for e in read for v in e.summary.value]
    assert scalars == [(0, "val/dice", 0.25), (1, "val/dice", 0.5)]  # NaN and non-numbers are not scalars


def test_an_edited_dataset_file_reruns_the_data_stage(tmp_path) -> None:
    from raysys.pipeline import dataset_fingerprint, stage_keys

    root = tmp_path / "ds"
    root.mkdir()
    (root / "annotations.json").write_text("[]")
    cfg = load_config(None, ["data.kind=polygon_json", f"data.root={root}"])
    before = stage_keys(cfg, "data")
    assert before["files"] == dataset_fingerprint(str(root)) is not None
    (root / "annotations.json").write_text('[{"image": "a.png"}]')  # edited
    edited = stage_keys(cfg, "data")
    assert edited != before
    (root / "b.png").write_bytes(b"x")  # added
    assert stage_keys(cfg, "data") != edited
    assert stage_keys(load_config(None, []), "data")["files"] is None  # synthetic: no files


def test_a_malicious_or_missing_checkpoint_stops_before_ray_naming_the_key(tmp_path) -> None:
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model_state_dict": Boom()}))
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=a", f"reward.reward_net={evil}"])
    with pytest.raises(
        ValueError, match=r"reward\.reward_net: reward net checkpoint .*evil\.pth cannot be loaded as plain"
    ):
        run_training(cfg, progress=False)
    missing = load_config(
        None, [f"run.output_dir={tmp_path}", "run.name=b", f"policy.checkpoint={tmp_path}/no"]
    )
    with pytest.raises(ValueError, match=r"policy\.checkpoint: checkpoint folder .*/no does not exist"):
        run_training(missing, progress=False)
    assert not (tmp_path / "a" / "config.yaml").exists()  # nothing written for a run that cannot start


def test_a_command_output_is_replaced_only_when_asked_and_only_by_a_finished_result(tmp_path) -> None:
    from raysys.runtime import command_output

    run = tmp_path / "run"
    out = run / "sft"
    with pytest.raises(OSError), command_output(out, run, overwrite=False, what="SFT") as o:
        (o / "model").mkdir(parents=True)
        raise OSError(28, "No space left on device")
    assert not out.exists()  # nothing half-written for a later stage to take for a result

    with command_output(out, run, overwrite=False, what="SFT") as o:
        (o / "v1.txt").write_text("first")
    refused = pytest.raises(FileExistsError, match=r"already holds a SFT result.*--overwrite")
    with refused, command_output(out, run, overwrite=False, what="SFT"):
        pass
    with pytest.raises(KeyboardInterrupt), command_output(out, run, overwrite=True, what="SFT") as o:
        (o / "v2.txt").write_text("partial")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["v1.txt"]  # the earlier result is back, untouched
    with command_output(out, run, overwrite=True, what="SFT") as o:
        (o / "v2.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["v2.txt"] and not (run / ".sft.replaced").exists()

    (run / ".sft.replaced").mkdir()  # what a crash in the middle of a replacement leaves
    refused = pytest.raises(FileExistsError, match=r"\.sft\.replaced.*interrupted --overwrite")
    with refused, command_output(out, run, overwrite=True, what="SFT"):
        pass
    assert (out / "v2.txt").read_text() == "second"


def test_a_command_writing_into_a_run_holds_its_lock(tmp_path) -> None:
    from raysys.runtime import command_output, run_lock

    run = tmp_path / "run"
    busy = pytest.raises(FileExistsError, match="in use by another raysys process")
    with command_output(run / "eval", run, overwrite=False, what="evaluation"), busy, run_lock(run):
        pass
    with command_output(tmp_path / "elsewhere", run, overwrite=False, what="evaluation"), run_lock(run):
        pass  # an output outside the run does not hold the run


def test_a_finished_stage_whose_outputs_changed_or_vanished_runs_again(tmp_path, monkeypatch, caplog) -> None:
    calls: list[str] = []
    monkeypatch.setattr(pipeline_mod, "_stages", lambda: _fake_stages(calls, {}))
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=p"])
    Pipeline(cfg, progress=False).run()
    assert calls == list(STAGES)
    (tmp_path / "p" / "sft" / "result.txt").write_text("swapped by another process")
    (tmp_path / "p" / "export" / "result.txt").unlink()
    calls.clear()
    with caplog.at_level("WARNING", logger="raysys.pipeline"):
        rows = Pipeline(cfg, progress=False).run()
    assert "sft/result.txt changed or vanished" in caplog.text and "export/result.txt" in caplog.text
    # sft reruns; the stages fed by it rerun only if its new output differs (the stand-in writes the same)
    assert calls == ["sft", "export"]
    assert [r["status"] for r in rows if r["stage"] == "data"] == ["skipped (up to date)"]
    assert (tmp_path / "p" / "sft" / "result.txt").read_text() == "x"


def test_sigterm_stops_a_command_as_ctrl_c_does_and_leaves_no_half_written_output(tmp_path) -> None:
    """`ray job stop`, a scheduler or `kill` send SIGTERM: exit 143 with the resume advice, not a traceback."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "raysys", "sft", f"run.output_dir={tmp_path}", "run.name=t", "data.size=64",
           "data.n_train=4", "data.n_val=2", "sft.steps=100000", "sft.eval_every=100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "t" / "sft" / "config.yaml").is_file():  # training has started
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert "raysys: terminated (SIGTERM); finished outputs and checkpoints are kept" in out
    assert "Traceback" not in out
    assert not (tmp_path / "t" / "sft").exists()  # the unfinished SFT folder is not left for a later stage


def test_resume_checks_that_no_iteration_before_the_checkpoint_lost_its_metrics_row(tmp_path) -> None:
    from raysys.train import RunStateError, check_metrics_rows

    metrics = tmp_path / "metrics.jsonl"
    rows = [f'{{"iteration": {i}}}' for i in range(5)]
    metrics.write_text("\n".join([*rows, '{"iteration": 5, "x"']) + "\n")  # a crash tore the row of 5
    check_metrics_rows(metrics, 5)  # 5 is redone from the checkpoint of 4: nothing is lost
    before = metrics.read_text()
    with pytest.raises(RunStateError, match=r"iteration\(s\) 5; line\(s\) 6 .*nothing was changed"):
        check_metrics_rows(metrics, 6)  # the checkpoint holds 5: its row could never be written again
    assert metrics.read_text() == before
    with pytest.raises(RunStateError, match=r"iteration\(s\) 0, 1, 2"):
        check_metrics_rows(tmp_path / "gone.jsonl", 3)
    check_metrics_rows(tmp_path / "gone.jsonl", 0)


def test_the_snapshot_fix_waits_for_trains_import_in_a_worker_that_has_not_made_it() -> None:
    # A fresh process, as a Ray worker at its set-up hook: rollout, reward and metrics actors never import
    # Train (about 1 CPU-s each), and Train's controller, which does, gets the atomic writes all the same.
    import subprocess
    import sys

    pytest.importorskip("ray")
    code = """
import sys
from raysys.worker_setup import atomic_train_snapshots
print(sorted(m for m in ("numpy", "scipy", "torch", "ray") if m in sys.modules))
atomic_train_snapshots()
atomic_train_snapshots()
print(sorted(m for m in ("ray.train", "pandas", "ray.data") if m in sys.modules))
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
print(getattr(CheckpointManager._write_state_to_storage, "atomic", False))
print(sum(type(f).__name__ == "_AfterImport" for f in sys.meta_path))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The hook module itself is standard library only: every worker of a run imports it first.
    assert proc.stdout.split("\n")[:4] == ["[]", "[]", "True", "0"]


def test_trains_record_of_checkpoints_survives_a_full_disk_and_a_torn_one_is_named(
    tmp_path, monkeypatch
) -> None:
    import errno
    from types import SimpleNamespace

    pytest.importorskip("ray")
    import pyarrow.fs as pafs
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager

    from raysys.runtime import latest_iteration
    from raysys.worker_setup import atomic_train_snapshots

    monkeypatch.setattr(
        CheckpointManager, "_write_state_to_storage", CheckpointManager._write_state_to_storage
    )
    atomic_train_snapshots()
    atomic_train_snapshots()  # a second worker set-up in the same process wraps nothing twice
    write = CheckpointManager._write_state_to_storage
    assert write.atomic

    class HalfWritten:
        """An output stream on a disk that fills up halfway through the write."""

        def __init__(self, stream):
            self.stream = stream

        def write(self, data):
            self.stream.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    class FullDisk(pafs.LocalFileSystem):
        def open_output_stream(self, path, *a, **k):
            return HalfWritten(super().open_output_stream(path, *a, **k))

    snapshot = tmp_path / "exp" / "checkpoint_manager_snapshot.json"
    snapshot.parent.mkdir()
    state = {"checkpoint_results": [{"checkpoint_dir_name": "iter_000003"}]}
    manager = SimpleNamespace(
        _storage_context=SimpleNamespace(
            storage_filesystem=pafs.LocalFileSystem(), checkpoint_manager_snapshot_path=str(snapshot)
        ),
        _save_state=lambda: json.dumps(state),
    )
    write(manager)
    assert latest_iteration(snapshot.parent) == 3
    state["checkpoint_results"].append({"checkpoint_dir_name": "iter_000007"})
    manager._storage_context.storage_filesystem = FullDisk()
    with pytest.raises(OSError, match="No space left"):
        write(manager)
    assert latest_iteration(snapshot.parent) == 3  # the previous record, whole
    assert sorted(p.name for p in snapshot.parent.iterdir()) == [snapshot.name]

    snapshot.write_text(json.dumps(state)[:40])  # as Ray's in-place write leaves it on a full disk
    with pytest.raises(
        ValueError, match=r"checkpoint_manager_snapshot\.json, Ray Train's record.*not intact.*new run\.name"
    ):
        latest_iteration(snapshot.parent)
