"""`raysys train`: rollout actors + reward actors + a Ray Train learner (TorchTrainer).

The driver starts (or attaches to) Ray, launches the actors, and runs a TorchTrainer whose train loop gets
the actor handles through ``train_loop_config``. Each iteration reads as timed stages:

    collect (rollout -> reward) | update (advantages, E epochs) | sync (rank 0 -> ray.put -> workers)
    | validate (every eval.every) | report (metrics every iteration, a checkpoint every N)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysys import keys
from raysys.config import Config, ConfigError
from raysys.config_io import save_config
from raysys.runtime import (
    Terminated,
    absolute_paths,
    check_resources,
    check_storage,
    holds_results,
    init_ray,
    latest_iteration,
    resolve_reward_device,
    reward_actors,
    run_lock,
    storage_exists,
    train_storage,
)

log = logging.getLogger(__name__)


def iteration_indices(cfg: Config, iteration: int, n_train: int) -> list[int]:
    """The training images of ``iteration`` (seeded, so resumed runs see the same images)."""
    rng = np.random.default_rng([cfg.run.seed, iteration])
    n = min(cfg.rollout.images_per_iteration, n_train)
    return sorted(rng.choice(n_train, size=n, replace=False).tolist())


# ------------------------------------------------------------------------------------------- train loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. Rank 0 syncs weights, validates, checkpoints and logs."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from raysys.coordinator import ActorTimeoutError, RayCoordinator, get_within
    from raysys.learner import Learner

    cfg: Config = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=cfg.run.log_level)
    _quiet_train_reports()
    device = torch.device("cpu")
    if cfg.learner.use_gpu and torch.cuda.is_available():
        device = ray.train.torch.get_device()
    elif cfg.learner.use_gpu:  # e.g. fake GPUs from run.num_gpus on a CPU machine
        log.warning("learner.use_gpu is set but torch sees no CUDA device here; the learner runs on the CPU")
    learner = Learner(cfg, device=device, rank=rank, world_size=world)
    if cfg.learner.strategy == "deepspeed":
        learner.use_deepspeed()
    elif world > 1:
        learner.use_ddp(lambda module: ray.train.torch.prepare_model(module, move_to_device=False))
    rc = cfg.rollout
    sink = config["sink"]

    def sink_get(ref, what: str):
        return get_within(ref, rc.timeout_s, f"the metrics sink ({what})")

    # Rank 0 pushes the weights and publishes each push through the sink; any rank that finds a rollout actor
    # restarted (its node lost, say) re-syncs it from there rather than waiting for rank 0, which may be
    # waiting for this rank in the update's all-reduce.
    coordinator = RayCoordinator(
        config["rollout"],
        config["reward"],
        timeout_s=rc.timeout_s,
        max_staleness=rc.max_staleness,
        weights_source=(lambda: sink_get(sink.weights_ref.remote(), "latest weights")) if rank > 0 else None,
        on_push=(lambda ref, v: sink_get(sink.set_weights_ref.remote([ref], v), "publishing weights"))
        if rank == 0
        else None,
    )

    _record_learner_placement(sink, rank, world, sink_get, device)
    t_wait = time.monotonic()
    while (started := sink_get(sink.actors_started.remote(), "actors started?")) is None:
        if time.monotonic() - t_wait > rc.timeout_s + 60:  # the driver names a late actor before this
            raise ActorTimeoutError("the driver did not confirm that the rollout and reward actors started")
        time.sleep(0.2)
    if not started:
        return  # the driver raises the actor's error
    objective: dict[str, float] | None = config.get("objective")
    last_val: dict[str, float] = {}
    start = 0
    checkpoint = ray.train.get_checkpoint()
    # A PBT donor's Train checkpoint (any storage filesystem) starts a fresh Train run.
    initial = checkpoint if checkpoint is not None else config.get("initial_checkpoint")
    if initial is not None:
        with initial.as_directory() as d:
            start = learner.load(d)
        log.info("resumed at iteration %d (policy version %d)", start, learner.version)
    if rank == 0:
        # Also after Train restarted a failed learner (learner.max_failures): the rollout actors may hold
        # newer weights than the checkpoint, and the sink rows of the iterations about to be redone go.
        coordinator.push_weights(learner.behaviour_state_dict(), learner.version)
        sink_get(sink.rewind.remote(start), "rewind")
    if world > 1:  # no rank samples before rank 0 has pushed the loaded weights
        torch.distributed.barrier()
    if start >= cfg.learner.iterations:
        # Nothing left of this Train run, e.g. a Tune trial stopped after Train kept its last checkpoint but
        # before Tune had the report: its last row again, so the resumed trial ends with its final metrics. (A
        # PBT clone of a finished donor starts a new Train run and ends without a report of its own.)
        final = sink_get(sink.progress.remote(), "last metrics row") if checkpoint is not None else None
        if final:
            ray.train.report(final)
        return
    n_train = len(learner.train)
    pending: dict[int, Any] = {}  # iteration -> its dispatched collection
    for it in range(start, cfg.learner.iterations):
        stop_at = sink_get(sink.stop_iteration.remote(), "stop requested?")
        if stop_at is not None and it >= stop_at:
            log.info("stopping before iteration %d (Ctrl-C on the driver)", it)
            break
        t_iter = time.perf_counter()
        startup = time.time() - config["started_at"] if it == start else None
        last = it + 1 == cfg.learner.iterations
        # 1. collect: rollout actors sample, reward actors score (this rank's share of the images). With
        # rollout.max_staleness N the next N iterations are dispatched too: the actors sample them while this
        # rank updates, with the weights they hold (each actor runs its tasks in submission order).
        for j in range(it, min(it + rc.max_staleness, cfg.learner.iterations - 1) + 1):
            if j not in pending:
                pending[j] = coordinator.dispatch(
                    iteration_indices(cfg, j, n_train)[rank::world], iteration=j
                )
        scored, cstats = coordinator.gather(pending.pop(it), version=learner.version)
        _record_restarts(coordinator, sink, it, sink_get)
        # 2. update: advantages and E epochs of minibatch steps (DDP/DeepSpeed across ranks)
        metrics = learner.update(scored, iteration=it)
        metrics.update(cstats.as_metrics())
        ckpt = None
        if rank == 0:
            # 3. sync the new trainable weights to every rollout actor. Asynchronously with one rank it is
            # confirmed when the next batch is gathered; other ranks dispatch after the report barrier, and
            # Ray orders an actor's tasks per caller only, so with several ranks the load is confirmed first.
            metrics.update(_sync(coordinator, learner, wait=rc.max_staleness == 0 or world > 1))
            _record_restarts(coordinator, sink, it, sink_get)
            # 4. validate (and keep the best weights), 5. checkpoint
            if (it + 1) % cfg.eval.every == 0 or last:
                val = _validate(learner, sink, cfg, it, sink_get)
                metrics.update(val)
                last_val.update(val)
            if (it + 1) % cfg.learner.checkpoint_every == 0 or last:
                ckpt = _checkpoint(learner, it)
        metrics.update({"iteration": it, keys.VERSION: learner.version})
        if objective:  # Tune compares trials on the latest validation (NaN until the first one)
            metrics[keys.OBJECTIVE] = objective_value(objective, last_val)
            metrics[keys.ITERATIONS_DONE] = it + 1  # survives resumes, unlike Tune's training_iteration
        metrics[keys.TIME_ITERATION] = time.perf_counter() - t_iter
        if startup is not None:
            metrics[keys.TIME_STARTUP] = startup
        _report(metrics, ckpt, sink if rank == 0 else None, it, sink_get)


def _record_restarts(coordinator, sink, iteration: int, sink_get) -> None:
    for entry in coordinator.restarted:
        sink_get(sink.record_restart.remote(entry, iteration), "recording an actor restart")
    coordinator.restarted.clear()


def _record_learner_placement(sink, rank: int, world: int, sink_get, device) -> None:
    """This rank's placement into placement.json (every rank reports its own; the sink sorts by rank)."""
    from raysys.placement import placement

    sink_get(
        sink.record_placement.remote(
            "learner", [{**placement(), "rank": rank, "world_size": world, "device": str(device)}], add=True
        ),
        "placement",
    )


def objective_value(terms: dict[str, float], metrics: dict[str, float]) -> float:
    """Weighted sum of validation metrics; NaN while any of them is missing."""
    if not all(k in metrics for k in terms):
        return math.nan
    return float(sum(w * metrics[k] for k, w in terms.items()))


def _sync(coordinator, learner, *, wait: bool = True) -> dict[str, float]:
    t = time.perf_counter()
    nbytes = coordinator.push_weights(learner.behaviour_state_dict(), learner.version, wait=wait)
    return {keys.SYNC_BYTES: float(nbytes), keys.TIME_SYNC: time.perf_counter() - t}


def _validate(learner, sink, cfg: Config, iteration: int, sink_get) -> dict[str, float]:
    """Validation metrics; the weights go to checkpoints/best when eval.select_metric improves."""
    from policies.checkpoint import trainable_files, trainable_meta

    t = time.perf_counter()
    val = learner.validator.run()
    if learner.validator.improved(val):
        key = cfg.eval.select_metric
        meta = trainable_meta(
            learner.policy, {"iteration": iteration, "version": learner.version, key: val[key]}
        )
        files = trainable_files(learner.trainable_state_dict(), meta)
        sink_get(sink.save_best.remote(files), "saving the best weights")
    return {**val, keys.TIME_VALIDATE: time.perf_counter() - t}


def _checkpoint(learner, iteration: int):
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix="raysys-ckpt-"))
    learner.save(tmp, iteration=iteration)
    return ray.train.Checkpoint.from_directory(str(tmp))


def _report(metrics: dict[str, Any], ckpt, sink, iteration: int, sink_get) -> None:
    """Metrics to the sink (rank 0) and to Ray Train (every rank: report is a barrier)."""
    import ray.train

    if sink is not None:
        sink_get(sink.log.remote(metrics), "logging metrics")
    name = f"iter_{iteration:06d}" if ckpt is not None else None
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
    if ckpt is not None:  # Train has copied it into the run's storage
        shutil.rmtree(ckpt.path, ignore_errors=True)


def _quiet_train_reports() -> None:
    """Ray Train logs every report's full metrics at INFO (from a logger named by its file path)."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------- driver
@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    checkpoint: str | None
    seconds: float


def _launch_actors(cfg: Config):
    import ray

    from raysys.reward import RewardWorker
    from raysys.rollout import RolloutWorker
    from raysys.sink import MetricsSink

    r, rw = cfg.rollout, cfg.reward
    rollout_cls = ray.remote(
        num_cpus=r.cpus_per_worker,
        num_gpus=r.gpus_per_worker,
        max_restarts=r.max_restarts,
        max_task_retries=0,
        **_node_options(r.label_selector, r.scheduling),
    )(RolloutWorker)
    reward_cls = ray.remote(
        num_cpus=rw.cpus_per_actor,
        max_restarts=r.max_restarts,
        **_node_options(rw.label_selector, rw.scheduling),
    )(RewardWorker)
    rollout = [rollout_cls.remote(cfg, i) for i in range(r.num_workers)]
    # none when the rollout actors score the reward themselves (reward.device: cuda)
    reward = [reward_cls.remote(cfg) for _ in range(reward_actors(cfg))]
    return rollout, reward, ray.remote(num_cpus=0)(MetricsSink)


def _node_options(label_selector: dict[str, str], scheduling: str) -> dict[str, Any]:
    """Ray actor options that place an actor (and its restarts) on the nodes of a label selector. None inside
    a Tune trial: its actors take the bundles of the trial's placement group, which carry the selectors
    (``raysys.tune.trial_resources``), and any explicit strategy would take them out of it."""
    from ray.util import get_current_placement_group

    if get_current_placement_group() is not None:
        return {}
    options: dict[str, Any] = {"scheduling_strategy": "SPREAD"} if scheduling == "spread" else {}
    if label_selector:
        options["label_selector"] = dict(label_selector)
    return options


def _without_dataset_manager(trainer_cls):
    """``trainer_cls`` without Train's Ray Datasets callback when no dataset is given (never here: the rollout
    actors feed the learner). The callback starts a dataset-manager actor whatever the datasets, one more process
    (~2.5 CPU-s of start-up on a small machine) per run and per restart."""

    class Trainer(trainer_cls):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "DatasetsCallback"]

    return Trainer


def run_training(
    cfg: Config,
    *,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    objective: dict[str, float] | None = None,
    initial_checkpoint: Any | None = None,
    train_name: str | None = None,
) -> TrainResult:
    """Train with the Ray system; outputs in ``runs/<name>/`` (config, metrics, TensorBoard, checkpoints).

    A Tune trial adds Train ``callbacks`` (TuneReportCallback), the ``objective`` to report every iteration,
    and for PBT a donor's ``initial_checkpoint`` started under a new Train run name (``train_name``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t0, started_at = time.perf_counter(), time.time()
    cfg = absolute_paths(cfg)
    run_dir = cfg.run_dir.resolve()
    storage = train_storage(cfg)
    name = train_name or cfg.run.name
    with run_lock(run_dir):  # a second process on the same run stops here, before touching anything
        check_storage(cfg)
        # A PBT clone starts a new Train run in its trial directory, next to the earlier segments.
        fresh_segment = initial_checkpoint is not None or train_name is not None
        if (
            not resume
            and not fresh_segment
            and (storage_exists(f"{storage}/{name}") or holds_results(run_dir))
        ):
            raise FileExistsError(
                f"run directory {run_dir} already holds a run (metrics or checkpoints); pass --resume to continue "
                f"it, or choose another run.name (nothing there is overwritten)"
            )
        if resume and not storage_exists(f"{storage}/{name}"):
            raise FileNotFoundError(
                f"nothing to resume in {storage}/{name}: no checkpoints from an earlier run"
            )
        preflight(cfg)
        if resume:
            check_resumable_config(cfg, run_dir / "config.yaml")
            if not fresh_segment:
                check_metrics_rows(run_dir / "metrics.jsonl", latest_iteration(f"{storage}/{name}") + 1)
        else:
            save_config(cfg, run_dir / "config.yaml")
        started = init_ray(cfg)
        try:
            cfg = resolve_reward_device(cfg, private=started)  # config.yaml keeps the user's value (auto)
            check_resources(cfg)
            rollout, reward, sink_cls = _launch_actors(cfg)
            start_iteration = latest_iteration(f"{storage}/{name}") + 1 if resume else 0
            if resume:  # said here, on the driver: a Train worker's log lines reach a job's log best-effort
                log.info("resuming run '%s' at iteration %d from %s/%s", name, start_iteration, storage, name)
            if initial_checkpoint is not None and not resume:
                with initial_checkpoint.as_directory() as d:
                    start_iteration = _checkpoint_iteration(Path(d)) + 1
            sink = sink_cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    ray.get_runtime_context().get_node_id(), soft=False
                )
            ).remote(str(run_dir), start_iteration=start_iteration)
            # The actors load their models while Train starts its learners; see _fit_with_progress.
            actors = {"rollout": [h.ready.remote() for h in rollout]}
            if reward:
                actors["reward"] = [h.ready.remote() for h in reward]
            lc = cfg.learner
            resources = {"CPU": lc.cpus_per_worker, **({"GPU": lc.gpus_per_worker} if lc.use_gpu else {})}
            backend = None if lc.dist_backend == "auto" else TorchConfig(backend=lc.dist_backend)
            trainer = _without_dataset_manager(TorchTrainer)(
                train_loop_per_worker,
                train_loop_config={
                    "cfg": cfg,
                    "started_at": started_at,
                    "rollout": rollout,
                    "reward": reward,
                    "sink": sink,
                    "objective": objective,
                    "initial_checkpoint": initial_checkpoint,
                },
                scaling_config=ScalingConfig(
                    num_workers=lc.num_workers,
                    use_gpu=lc.use_gpu,
                    resources_per_worker=resources,
                    placement_strategy=lc.placement.upper(),
                    label_selector=dict(lc.label_selector) or None,
                ),
                torch_config=backend,
                run_config=RunConfig(
                    name=name,
                    storage_path=storage,
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                    failure_config=FailureConfig(max_failures=lc.max_failures),
                    callbacks=list(callbacks),
                ),
            )
            result = _fit_with_progress(trainer, sink, cfg, start_iteration, progress, actors)
            metrics = ray.get(sink.progress.remote())
            ray.get(sink.close.remote())
            ckpt = result.checkpoint.path if result.checkpoint is not None else None
            if ckpt:
                _export_latest(result.checkpoint, run_dir / "checkpoints" / "latest")
            return TrainResult(
                run_dir=run_dir, metrics=metrics, checkpoint=ckpt, seconds=time.perf_counter() - t0
            )
        finally:
            if started:
                ray.shutdown()


def preflight(cfg: Config) -> None:
    """Load, once and here, the checkpoints every actor will load: a missing, corrupt or malicious file (refused
    by ``weights_only``/safetensors) stops with its name and key instead of an ActorDiedError from Ray."""
    checks = []
    if cfg.reward.reward_net:
        from policies.reward_net import load_reward_net

        checks.append(("reward.reward_net", lambda: load_reward_net(cfg.reward.reward_net)))
    if cfg.policy.kind == "tiny" and cfg.policy.checkpoint:
        from policies.checkpoint import load_base_model

        checks.append(("policy.checkpoint", lambda: load_base_model(cfg.policy.checkpoint)))
    for key, load in checks:
        try:
            load()
        except (ValueError, OSError) as exc:  # same type (callers match on it), the key in front
            raise type(exc)(f"{key}: {exc}") from exc


RESUME_MAY_CHANGE = frozenset(
    {
        "run.ray_address",
        "run.num_cpus",
        "run.num_gpus",
        "run.log_level",
        "learner.iterations",
        "learner.max_failures",
        "rollout.timeout_s",
    }
)
"""Keys a resumed run may change: where it runs, how it logs, and how long it goes on."""


def check_resumable_config(cfg: Config, saved: Path) -> None:
    """Refuse to resume with settings other than the run's own (``config.yaml`` stays as the run began)."""
    from raysys.config_io import changed_settings, load_config

    if not saved.is_file():
        raise FileNotFoundError(f"nothing to resume: {saved} does not exist")
    shown = changed_settings(load_config(saved), cfg, ignore=RESUME_MAY_CHANGE)
    if shown:
        raise ConfigError(
            f"--resume with a changed config ({shown}); a resumed run "
            f"keeps the settings it started with ({saved}). Start a new run.name for new settings; only "
            f"{', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume"
        )


def check_metrics_rows(path: Path, start: int) -> None:
    """Before a resume at iteration ``start``: every earlier iteration has an intact row in ``metrics.jsonl``.
    A row torn by a crash belongs to an iteration the checkpoint does not hold (rank 0 logs before it
    checkpoints), and is redone; a row missing before the checkpoint could never be redone, so the resume
    stops with nothing changed instead of dropping it for good."""
    if start <= 0:
        return
    have: set[int] = set()
    torn: list[int] = []
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            have.add(int(row["iteration"]))
        except (ValueError, TypeError, KeyError):
            torn.append(number)
    missing = sorted(set(range(start)) - have)
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        lines_note = f"; line(s) {', '.join(map(str, torn[:5]))} are not intact JSON rows" if torn else ""
        raise RunStateError(
            f"{path} has no intact row for iteration(s) {shown}{lines_note}, but the checkpoint this run resumes "
            f"from is past them (next iteration {start}): resuming would lose their metrics for good, so "
            "nothing was changed. Restore the file (e.g. from a backup), or start a new run.name"
        )


class RunStateError(ValueError):
    """A run's own records disagree with its checkpoints (a torn or edited file)."""


def _checkpoint_iteration(directory: Path) -> int:
    from policies.checkpoint import load_torch_file

    state = load_torch_file(directory / "learner_state.pt", what="learner state")
    return int(state["iteration"])


def _export_latest(checkpoint, dst: Path) -> None:
    """The last checkpoint's trainable weights and PEFT adapter, under runs/<name>/checkpoints/latest
    (copied from Train's storage, local or remote)."""
    if dst.exists():
        shutil.rmtree(dst)
    checkpoint.to_directory(str(dst))


def _ready(role: str, refs: list, timeout_s: float) -> list:
    """The actors' ``ready`` answers, or an error naming the first that did not answer within ``timeout_s``."""
    import ray

    from raysys.coordinator import ActorTimeoutError

    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if len(done) < len(refs):
        late = next(i for i, ref in enumerate(refs) if ref not in done)
        raise ActorTimeoutError(
            f"{role} actor {late} (loading its model) did not answer within rollout.timeout_s={timeout_s:g}s"
        )
    return ray.get(refs)


def _fit_with_progress(trainer, sink, cfg: Config, start: int, progress: bool, actors: dict[str, list]):
    """``trainer.fit()`` in a thread while the main thread waits for the rollout and reward ``actors`` (their
    ``ready`` refs per role) and then shows a progress bar from the sink. The learners start meanwhile and
    wait for the sink's word before they touch an actor: an actor that fails in its constructor stops the
    run with its own error, not with a learner failure (and its restarts) over a dead actor."""
    import ray

    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=fit, name="raysys-fit", daemon=True)
    thread.start()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.learner.iterations, initial=start, desc=f"train {cfg.run.name}", unit="it")
    done = start
    try:
        try:
            for role, refs in actors.items():
                ray.get(sink.record_placement.remote(role, _ready(role, refs, cfg.rollout.timeout_s)))
        except BaseException:  # also Ctrl-C while the actors load: the learners must not wait forever
            ray.get(sink.set_actors_started.remote(False))
            thread.join()
            raise
        ray.get(sink.set_actors_started.remote(True))
        while thread.is_alive():
            thread.join(timeout=1.0)
            if bar is not None:
                last = ray.get(sink.progress.remote())
                if last and last["iteration"] + 1 > done:
                    bar.update(last["iteration"] + 1 - done)
                    done = last["iteration"] + 1
                    post = {
                        k.split("/")[-1]: f"{last[k]:.3f}"
                        for k in (keys.REWARD_MEAN, keys.VAL_DICE)
                        if k in last
                    }
                    bar.set_postfix(post)
    except KeyboardInterrupt as exc:
        # Let the learner finish its iteration and Train end before Ray shuts down: shutting Ray down under a
        # running fit() can crash the process. A second Ctrl-C (or SIGTERM) stops at once.
        stop_at = ray.get(sink.request_stop.remote())
        log.warning(
            "%s: stopping before iteration %d; checkpoints are kept (Ctrl-C again to stop at once)",
            "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C",
            stop_at,
        )
        thread.join()
        raise
    finally:
        if bar is not None:
            bar.close()
    if "error" in box:
        raise box["error"]
    return box["result"]
