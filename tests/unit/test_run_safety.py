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
        ValueError, match=r"reward\.reward_net: reward net checkpoint .*evil\.pth could not be read"
    ):
        run_training(cfg, progress=False)
    missing = load_config(
        None, [f"run.output_dir={tmp_path}", "run.name=b", f"policy.checkpoint={tmp_path}/no"]
    )
    with pytest.raises(ValueError, match=r"policy\.checkpoint: .*config\.json does not exist"):
        run_training(missing, progress=False)
    assert not (tmp_path / "a" / "config.yaml").exists()  # nothing written for a run that cannot start
