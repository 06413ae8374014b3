"""The Ray RL system on one shared local Ray: a short run, weight versions, an actor killed by PID, timeouts,
an asynchronous run (a learner lost and restarted, and resuming, are in tests/cluster)."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from raysys.config_io import load_config
from raysys.coordinator import LocalCoordinator, RayCoordinator
from raysys.reward import RewardWorker
from raysys.rollout import RolloutWorker
from raysys.runtime import ResourceError, check_resources
from raysys.testing.rl_small import SMALL_RL as SMALL
from raysys.train import iteration_indices, run_training


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
    objective = {"val/dice": 1.0}  # as a Tune trial reports it
    res = run_training(cfg, progress=False, objective=objective)
    rows = _rows(res.run_dir)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert [r["tune/iterations"] for r in rows] == [1, 2] and rows[1]["tune/objective"] == rows[1]["val/dice"]
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
    # Start-up (Ray's actors and Train's worker) is timed once, before the first iteration, within the run.
    assert 0 < rows[0]["time/startup_s"] < res.seconds - rows[0]["time/iteration_s"]
    assert "time/startup_s" not in rows[1]
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
    from ray.util.state import list_actors

    # Train starts no actor a run here has no use for: no preemption watcher and no autoscaling coordinator on
    # a private local Ray (runtime.LOCAL_RAY_ENV: one machine, no node to pre-empt, no autoscaler), no dataset
    # manager without Ray Datasets.
    address = ray_local.get_runtime_context().gcs_address
    started = {a.class_name for a in list_actors(address=address, limit=10000)}
    unused = {"PreemptionWatcher", "DatasetManager", "_AutoscalingCoordinatorActor"}
    assert "TrainController" in started and not unused & started

    # Resuming a finished run (a Tune trial stopped between Train keeping its last checkpoint and Tune getting
    # the report) trains no more and reports the last row again.
    from ray.train.v2.api.callback import UserCallback

    reported = tmp_path / "reported.json"

    class Recorder(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            reported.write_text(json.dumps(metrics[0]))

    again = run_training(cfg, resume=True, progress=False, objective=objective, callbacks=[Recorder()])
    assert _rows(res.run_dir) == rows
    assert json.loads(reported.read_text()) == rows[1] == again.metrics


def test_weight_versions_reach_every_rollout_actor(ray_local) -> None:
    from raysys.testing.scored import differences

    cfg = load_config(None, SMALL)
    # Rollout actors that can also score their own samples (reward.device=cuda; without a GPU here they warn and
    # score on their CPU): they sample what plain ones sample.
    scoring = load_config(None, [*SMALL, "rollout.gpus_per_worker=0.25", "reward.device=cuda"])
    cls = ray_local.remote(num_cpus=0.25)(RolloutWorker)
    workers = [cls.remote(scoring, i) for i in range(2)]
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
    # Without reward actors the rollout actors score their shards: the same ScoredRollouts, the scoring timed.
    self_scored, stats = RayCoordinator(workers, []).collect([0, 1, 2, 3], iteration=0, version=3)
    assert not differences(self_scored, scored) and stats.reward_s == sum(s.seconds for s in self_scored) > 0
    assert [ray_local.get(w.ready.remote())["reward_device"] for w in workers] == ["cpu", "cpu"]


def _biased(sd: dict[str, torch.Tensor], bias: float) -> dict[str, torch.Tensor]:
    """Weights whose every mask logit is ~``bias``: +100 samples the whole FOV, -100 samples nothing."""
    return {k: torch.full_like(v, bias) if k.endswith("local_head.bias") else v for k, v in sd.items()}


def test_masks_sampled_after_a_sync_come_from_the_new_weights(ray_local) -> None:
    cfg = load_config(None, [*SMALL, "rollout.max_staleness=1"])
    cls = ray_local.remote(num_cpus=0.25)(RolloutWorker)
    workers = [cls.remote(cfg, i) for i in range(2)]
    reward = [ray_local.remote(num_cpus=0.25)(RewardWorker).remote(cfg)]
    local = RolloutWorker(cfg, 9)
    sd = local.policy.trainable_state_dict()
    full, empty = _biased(sd, 100.0), _biased(sd, -100.0)
    fov = {i: local.train[i].fov for i in range(4)}

    def masks_are(scored, what: str) -> bool:
        return all(
            (m == (fov[i] if what == "full" else False)).all()
            for s in scored
            for i, m in zip(s.batch.indices, s.batch.unpack(), strict=True)
        )

    # Lock step: each push is loaded before the next batch is sampled.
    co = RayCoordinator(workers, reward)
    co.push_weights(full, 1)
    assert masks_are(co.collect([0, 1, 2, 3], iteration=0)[0], "full")
    co.push_weights(empty, 2)
    assert masks_are(co.collect([0, 1, 2, 3], iteration=1)[0], "empty")
    # Asynchronous: the push returns at once; a batch dispatched before it keeps the old weights, one
    # dispatched after it has the new ones.
    co = RayCoordinator(workers, reward, max_staleness=1)
    co.push_weights(full, 3, wait=False)
    before = co.dispatch([0, 1, 2, 3], iteration=2)
    co.push_weights(empty, 4, wait=False)
    after = co.dispatch([0, 1, 2, 3], iteration=3)
    old, _ = co.gather(before, version=4)
    new, _ = co.gather(after, version=4)
    assert masks_are(old, "full") and {s.batch.version for s in old} == {3}
    assert masks_are(new, "empty") and {s.batch.version for s in new} == {4}


def _hanging(hang: str) -> type:
    """A rollout worker class whose ``sample`` or ``set_weights`` never returns in time (defined in a function
    so that Ray ships it by value: the actor processes cannot import this test module's helpers)."""

    class Hanging(RolloutWorker):
        def sample(self, indices, *, iteration: int):
            if hang == "sample":
                time.sleep(60)
            return super().sample(indices, iteration=iteration)

        def set_weights(self, state_dict, version: int) -> int:
            if hang == "set_weights" and version > 0:
                time.sleep(60)
            return super().set_weights(state_dict, version)

    return Hanging


def test_an_actor_that_does_not_answer_fails_the_call_with_its_name(ray_local) -> None:
    from raysys.coordinator import ActorTimeoutError

    cfg = load_config(None, SMALL)
    reward = [ray_local.remote(num_cpus=0.25)(RewardWorker).remote(cfg)]
    slow_sample = ray_local.remote(num_cpus=0.25)(_hanging("sample")).remote(cfg, 0)
    slow_load = ray_local.remote(num_cpus=0.25)(_hanging("set_weights")).remote(cfg, 0)
    ray_local.get([slow_sample.ready.remote(), slow_load.ready.remote(), reward[0].ready.remote()])
    t0 = time.monotonic()
    with pytest.raises(
        ActorTimeoutError,
        match=r"rollout actor 0 \(sampling 2 images of iteration 0\) did not answer within rollout.timeout_s=2s",
    ):
        RayCoordinator([slow_sample], reward, timeout_s=2.0).collect([0, 1], iteration=0)
    with pytest.raises(
        ActorTimeoutError, match=r"rollout actor 0 \(loading weights version 3\) did not answer within"
    ):
        RayCoordinator([slow_load], reward, timeout_s=2.0).push_weights(
            RolloutWorker(cfg, 9).policy.trainable_state_dict(), 3
        )
    assert time.monotonic() - t0 < 30
    for handle in (slow_sample, slow_load, *reward):
        ray_local.kill(handle)


def test_killed_rollout_actor_is_restarted_and_nothing_is_lost(ray_local, tmp_path) -> None:
    from raysys.sink import MetricsSink

    cfg = load_config(None, SMALL)
    cls = ray_local.remote(num_cpus=0.25, max_restarts=3, max_task_retries=0)(RolloutWorker)
    workers = [cls.remote(cfg, i) for i in range(2)]
    reward = [ray_local.remote(num_cpus=0.25)(RewardWorker).remote(cfg)]
    sink = ray_local.remote(num_cpus=0)(MetricsSink).remote(str(tmp_path))
    # Learner rank 0 pushes and publishes each push through the metrics sink; rank 1 reads it from there.
    co = RayCoordinator(
        workers, reward, on_push=lambda ref, v: ray_local.get(sink.set_weights_ref.remote([ref], v))
    )
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

    # Rank 1 finds actor 0 restarted without weights. It must not wait for rank 0 (which waits for rank 1 in
    # the update's all-reduce): it re-syncs the actor from the push rank 0 published.
    rank1 = RayCoordinator(workers, reward, weights_source=lambda: ray_local.get(sink.weights_ref.remote()))
    pid = ray_local.get(workers[0].ready.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    scored, stats = rank1.collect([1, 3], iteration=5, version=2)
    assert stats.retries >= 1 and all(s.batch.version == 2 for s in scored)
    assert [e["index"] for e in rank1.restarted] == [0] and rank1.restarted[0]["pid"] != pid


def test_more_reward_actors_than_rollout_actors_score_each_shard_in_parts(ray_local) -> None:
    cfg = load_config(None, SMALL)
    worker = ray_local.remote(num_cpus=0.25)(RolloutWorker).remote(cfg, 0)
    cls = ray_local.remote(num_cpus=0.25, max_restarts=2, max_task_retries=0)(RewardWorker)
    reward = [cls.remote(cfg) for _ in range(2)]
    co = RayCoordinator([worker], reward)
    co.push_weights(RolloutWorker(cfg, 9).policy.trainable_state_dict(), 1)
    indices = iteration_indices(cfg, 4, 6)
    ref, _ = LocalCoordinator([RolloutWorker(cfg, 0)], [RewardWorker(cfg)]).collect(indices, iteration=4)
    pids = [ray_local.get(r.ready.remote())["pid"] for r in reward]
    os.kill(pids[1], signal.SIGKILL)  # the second part's actor dies: the shard is redone, nothing lost
    scored, stats = co.collect(indices, iteration=4)
    assert stats.retries >= 1 and ray_local.get(reward[1].ready.remote())["pid"] != pids[1]
    assert [s.batch.indices for s in scored] == [indices[:2], indices[2:]]  # two actors, one part each
    np.testing.assert_array_equal(np.concatenate([s.rewards for s in scored]), ref[0].rewards)
    np.testing.assert_array_equal(np.concatenate([s.batch.unpack() for s in scored]), ref[0].batch.unpack())
    assert stats.sample_s == pytest.approx(scored[0].batch.seconds)  # one sampling, counted once


def test_an_asynchronous_run_trains_on_one_step_old_batches(ray_local, tmp_path) -> None:
    # Resume, Tune trials and `ray job submit` of asynchronous runs: tests/e2e (job stop and resume, the
    # interrupted sweep) run with rollout.max_staleness=1.
    cfg = load_config(
        None,
        [*SMALL, f"run.output_dir={tmp_path}", "run.name=async", "rollout.max_staleness=1", "eval.every=100",
         "learner.iterations=3", "rollout.num_workers=1"],
    )  # fmt: skip
    rows = _rows(run_training(cfg, progress=False).run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and [r["policy/version"] for r in rows] == [1, 2, 3]
    # The first batch is sampled by the weights it is trained from; every later one while the previous
    # update ran, one version behind, and importance-weighted.
    assert rows[0]["async/staleness_0"] == 4 and rows[0]["batch/stale"] == 0
    assert 0 <= rows[0]["async/logprob_mismatch"] < 2e-3  # the same weights on both sides
    for r in rows[1:]:
        assert r["async/staleness_1"] == 4 and r["batch/stale"] == 0 and np.isfinite(r["loss/total"])
        assert r["async/is_ratio_mean"] > 0 and r["async/is_ratio_max"] >= 1.0
        assert r["time/rollout_wait_s"] <= r["time/rollout_s"]


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
