"""The Ray RL system on one shared local Ray: a short run, weight versions, an actor killed by PID, resume."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from rl_small import SMALL_RL as SMALL
from safetensors.torch import load_file

from raysys.config import load_config
from raysys.coordinator import LocalCoordinator, RayCoordinator
from raysys.learner import iteration_indices
from raysys.reward import RewardWorker
from raysys.rollout import RolloutWorker
from raysys.runtime import ResourceError, check_resources
from raysys.train import run_training


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rows_or_none(run_dir) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def test_two_iteration_run_writes_metrics_checkpoints_and_events(ray_local, tmp_path) -> None:
    cfg = load_config(
        None,
        [
            *SMALL,
            f"run.output_dir={tmp_path}",
            "run.name=two",
            "learner.iterations=2",
            "eval.every=2",
            "learner.checkpoint_every=1",
        ],
    )
    res = run_training(cfg, progress=False)
    rows = _rows(res.run_dir)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert [r["policy/version"] for r in rows] == [1, 2]
    for key in (
        "rollout/reward_mean",
        "rollout/ep_rew_mean",
        "custom/gt_dice",
        "custom/best_reward",
        "loss/policy",
        "loss/kl",
        "policy/entropy",
        "policy/clipfrac",
        "policy/approx_kl",
        "time/rollout_s",
        "time/reward_s",
        "time/update_s",
        "time/sync_s",
        "sync/bytes",
    ):
        assert key in rows[0], key
    assert "val/dice" in rows[1] and "val/cldice" in rows[1] and "val/betti0_err" in rows[1]
    assert rows[0]["sync/bytes"] < 1e6  # only trainable tensors cross the wire
    assert (res.run_dir / "config.yaml").is_file()
    assert list((res.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    best = json.loads((res.run_dir / "checkpoints" / "best" / "meta.json").read_text())
    assert best["iteration"] == 1 and best["val/dice"] == rows[1]["val/dice"]  # the only validation
    latest = res.run_dir / "checkpoints" / "latest"
    assert (latest / "trainable.safetensors").is_file() and (
        latest / "adapter" / "adapter_config.json"
    ).is_file()
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(cfg, progress=False)


def test_weight_versions_reach_every_rollout_actor(ray_local) -> None:
    cfg = load_config(None, SMALL)
    cls = ray_local.remote(num_cpus=0.25)(RolloutWorker)
    workers = [cls.remote(cfg, i) for i in range(2)]
    co = RayCoordinator(workers, [ray_local.remote(num_cpus=0.25)(RewardWorker).remote(cfg)])
    local = RolloutWorker(cfg, 9)
    sd = {k: v + 0.1 for k, v in local.policy.trainable_state_dict().items()}
    nbytes = co.push_weights(sd, 3)
    assert nbytes == sum(t.numel() * t.element_size() for t in sd.values())
    assert [ray_local.get(w.ready.remote())["version"] for w in workers] == [3, 3]
    scored, _ = co.collect([0, 1, 2, 3], iteration=0)
    assert all(s.batch.version == 3 for s in scored)
    local.set_weights(sd, 3)  # the actors sample exactly what an in-process copy with those weights samples
    np.testing.assert_array_equal(
        scored[0].batch.unpack(), local.sample(scored[0].batch.indices, iteration=0).unpack()
    )


def test_killed_rollout_actor_is_restarted_and_nothing_is_lost(ray_local) -> None:
    cfg = load_config(None, SMALL)
    cls = ray_local.remote(num_cpus=0.25, max_restarts=2, max_task_retries=0)(RolloutWorker)
    workers = [cls.remote(cfg, i) for i in range(2)]
    reward = [ray_local.remote(num_cpus=0.25)(RewardWorker).remote(cfg)]
    co = RayCoordinator(workers, reward)
    sd = {k: v + 0.1 for k, v in RolloutWorker(cfg, 9).policy.trainable_state_dict().items()}
    co.push_weights(sd, 1)
    indices = iteration_indices(cfg, 4, 6)
    pid = ray_local.get(workers[0].ready.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    scored, stats = co.collect(indices, iteration=4)
    assert stats.retries >= 1
    assert sorted(i for s in scored for i in s.batch.indices) == indices  # none lost, none duplicated
    assert all(s.batch.version == 1 for s in scored)
    after = ray_local.get(workers[0].ready.remote())
    assert after["pid"] != pid and after["version"] == 1  # restarted and re-synced
    os.kill(after["pid"], signal.SIGKILL)  # dies before the next weights arrive
    co.push_weights(sd, 2)
    assert ray_local.get(workers[0].ready.remote())["version"] == 2
    # The retried shard holds the same masks an uninterrupted worker would have drawn.
    local_worker = RolloutWorker(cfg, 0)
    local_worker.set_weights(sd, 1)
    ref, _ = LocalCoordinator([local_worker, local_worker], [RewardWorker(cfg)]).collect(indices, iteration=4)
    for a, b in zip(scored, ref, strict=True):
        np.testing.assert_array_equal(a.batch.unpack(), b.batch.unpack())
        np.testing.assert_allclose(a.rewards, b.rewards)


def _run_killing_the_learner(cfg, after_rows: int):
    """``run_training(cfg)`` while a thread SIGKILLs the learner (rank 0's Train worker) once ``after_rows``
    iterations are logged; returns the result and the killed PIDs."""
    done, kills = threading.Event(), []

    def kill() -> None:
        while not done.is_set():
            if len(_rows_or_none(cfg.run_dir)) >= after_rows:
                pid = json.loads((cfg.run_dir / "placement.json").read_text())["learner"][0]["pid"]
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill)
    thread.start()
    try:
        return run_training(cfg, progress=False), kills
    finally:
        done.set()
        thread.join()


def test_a_restarted_learner_and_a_resumed_run_both_match_one_run(ray_local, tmp_path) -> None:
    common = [*SMALL, f"run.output_dir={tmp_path}", "eval.every=100", "learner.checkpoint_every=2"]
    # 1. The learner is killed once iteration 1 is logged: Ray Train restarts it from its latest checkpoint
    # within the run (learner.max_failures) and the iterations after it are redone, each logged once.
    full, kills = _run_killing_the_learner(
        load_config(None, [*common, "run.name=full", "learner.iterations=4"]), after_rows=2
    )
    assert kills, "the run ended before the learner could be killed"
    # 2. A run stopped after 2 iterations and resumed to 4.
    part = load_config(None, [*common, "run.name=part", "learner.iterations=2"])
    run_training(part, progress=False)
    resumed = run_training(
        load_config(None, [*common, "run.name=part", "learner.iterations=4"]), resume=True, progress=False
    )
    # Both are the same deterministic run: same weights, same reward curve, every iteration once.
    a = load_file(str(full.run_dir / "checkpoints/latest/trainable.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints/latest/trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    rows_full, rows_resumed = _rows(full.run_dir), _rows(resumed.run_dir)
    assert [r["iteration"] for r in rows_full] == [r["iteration"] for r in rows_resumed] == [0, 1, 2, 3]
    for rf, rr in zip(rows_full, rows_resumed, strict=True):
        assert rf["rollout/reward_mean"] == pytest.approx(rr["rollout/reward_mean"], rel=1e-5)


def test_asking_for_more_gpus_than_the_cluster_has_fails_fast(ray_local) -> None:
    cfg = load_config(None, [*SMALL, "rollout.gpus_per_worker=1"])
    with pytest.raises(ResourceError, match="needs 2 GPU"):
        check_resources(cfg)


def test_learners_start_beside_the_actors_and_wait_for_them(ray_local, tmp_path) -> None:
    from raysys.sink import MetricsSink
    from raysys.train import _fit_with_progress

    sink = ray_local.remote(num_cpus=0.1)(MetricsSink).remote(str(tmp_path))
    cfg = load_config(None, SMALL)

    class Trainer:  # stands in for Train: its learner polls the sink as train_loop_per_worker does
        seen = None

        def fit(self):
            while (seen := ray_local.get(sink.actors_started.remote())) is None:
                time.sleep(0.05)
            Trainer.seen = seen
            return "fitted"

    @ray_local.remote(num_cpus=0.1)
    def ready(ok: bool) -> dict:
        if not ok:
            raise OSError("rollout actor: data.root/21_training.tif is not an image")
        return {"pid": os.getpid()}

    actors = {"rollout": [ready.remote(True)], "reward": [ready.remote(True)]}
    assert _fit_with_progress(Trainer(), sink, cfg, 0, False, actors) == "fitted" and Trainer.seen is True
    placement = json.loads((tmp_path / "placement.json").read_text())
    assert set(placement) == {"rollout", "reward"} and placement["rollout"][0]["pid"] > 0

    # An actor that fails while it starts: the learner is told to return without touching any actor, and
    # the run ends with the actor's own error once Train has ended.
    sink = ray_local.remote(num_cpus=0.1)(MetricsSink).remote(str(tmp_path / "b"))
    actors = {"rollout": [ready.remote(False)], "reward": [ready.remote(True)]}
    with pytest.raises(Exception, match=r"21_training\.tif is not an image"):
        _fit_with_progress(Trainer(), sink, cfg, 0, False, actors)
    assert Trainer.seen is False
