"""`raysys tune`: Ray Tune sweeps of reward weights and hyperparameters over complete RL runs.

Each trial is one Tune function (the Train driver) that owns a whole run: its rollout and reward actors and
its own TorchTrainer. Train V2 forwards rank 0's per-iteration metrics to Tune with TuneReportCallback, so
ASHA can stop a trial after any validated iteration. PBT needs Tune checkpoints, which that callback does not
pass on, so under PBT the driver forwards metrics and Train checkpoints itself.

Outputs, in ``runs/<name>/tune/``:
    sweep/            Tune's experiment folder (``--resume`` restores it)
    trials/<id>/      each trial's run folder (config.yaml, metrics.jsonl, TensorBoard; Train checkpoints
                      too unless run.storage_path puts them elsewhere)
    results.parquet   one row per trial: swept values, best metric, iterations, status, error
    results.csv       the same table
    results.png       the metric against each swept parameter
    best_config.yaml  the base config with the best trial's values, ready for ``raysys train``
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysys import keys
from raysys.config import Config, ConfigError, parse_objective
from raysys.config_io import replace, save_config
from raysys.runtime import (
    ResourceError,
    init_ray,
    required_resources,
    resolve_reward_device,
    reward_actors,
    storage_exists,
    train_storage,
)

log = logging.getLogger(__name__)

EXPERIMENT = "sweep"
TRIAL_CPUS = 0.25
"""Logical CPUs of the Tune trial process itself (the Train driver; Tune refuses 0)."""
WEIGHTS_PREFIX = "reward.weights."
REWARD_DEVICE_KEYS = frozenset(
    {"reward.device", "reward.source", "reward.postprocess", "rollout.gpus_per_worker"}
)
"""Keys that decide whether the reward actors run (``raysys.runtime.reward_device``)."""


# ------------------------------------------------------------------------------------------- search space
def param_space(cfg: Config) -> dict[str, Any]:
    """``tune.search_space`` as Tune domains, keyed by dotted config key."""
    from ray import tune

    make = {
        "grid": lambda v: tune.grid_search(list(v)),
        "choice": lambda v: tune.choice(list(v)),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
    return {
        key: make[kind](values)
        for key, spec in cfg.tune.search_space.items()
        for kind, values in spec.items()
    }


def trial_config(base: Config, sampled: dict[str, Any], output_dir: str | Path, name: str) -> Config:
    """``base`` with the sampled values (reward weights normalised if asked) and the trial's run folder."""
    values = dict(sampled)
    if base.tune.normalize_reward_weights:
        values = normalized_weights(base, values)
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()]
    overrides += [f"run.output_dir={json.dumps(str(output_dir))}", f"run.name={json.dumps(name)}"]
    return replace(base, overrides)


def normalized_weights(base: Config, sampled: dict[str, Any]) -> dict[str, Any]:
    """All reward weights (sampled ones and the base config's others) rescaled to sum to 1."""
    weights = {**base.reward.weights.as_dict()}
    weights.update(
        {k[len(WEIGHTS_PREFIX) :]: float(v) for k, v in sampled.items() if k.startswith(WEIGHTS_PREFIX)}
    )
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError(f"tune.normalize_reward_weights: the sampled reward weights {weights} sum to 0")
    out = {k: v for k, v in sampled.items() if not k.startswith(WEIGHTS_PREFIX)}
    out.update({f"{WEIGHTS_PREFIX}{k}": v / total for k, v in weights.items()})
    return out


FIXED_KEYS = ("learner.iterations", "eval.every", "learner.checkpoint_every", "run.name", "run.output_dir")
"""Keys a sweep cannot vary: the schedulers' time axis, validation and checkpoint cadence, and the layout."""


def check_search_space(cfg: Config) -> None:
    """Every listed value (grid/choice) and range end (uniform/loguniform) must make a valid config, so a
    typo fails here, before any trial starts; the schedulers' time axis must fall on validated iterations."""
    tc = cfg.tune
    if not tc.search_space:
        raise ConfigError(
            "tune.search_space is empty: declare at least one key to sweep, e.g. "
            "tune.search_space.learner.lr={loguniform: [1e-4, 1e-2]}"
        )
    fixed = [k for k in tc.search_space if k in FIXED_KEYS]
    if fixed:
        raise ConfigError(f"tune.search_space: {fixed} cannot be swept (set them in the base config)")
    grace = tc.grace_iterations or cfg.eval.every
    if grace % cfg.eval.every:
        raise ConfigError(
            f"tune.grace_iterations ({grace}) must be a multiple of eval.every ({cfg.eval.every}): trials are "
            f"compared on validated iterations"
        )
    if tc.scheduler == "pbt" and grace % cfg.learner.checkpoint_every:
        raise ConfigError(
            f"tune.scheduler=pbt: the perturbation interval ({grace}) must be a multiple of "
            f"learner.checkpoint_every ({cfg.learner.checkpoint_every}) so an exploit clones a current checkpoint"
        )
    for key, spec in cfg.tune.search_space.items():
        for value in next(iter(spec.values())):
            try:
                trial_config(cfg, {key: value}, cfg.run.output_dir, cfg.run.name)
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space.{key}: value {value!r} is invalid: {exc}") from exc


# ------------------------------------------------------------------------------------------- trial
def _trial_dirname(trial) -> str:
    return trial.trial_id


def run_trial(params: dict[str, Any], base: Config, tune_dir: str) -> None:
    """One Tune trial: a complete RL run in ``<tune_dir>/trials/<trial id>/``."""
    from ray import tune

    from raysys.train import run_training

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, Path(tune_dir) / "trials", trial_id)
    objective = parse_objective(cfg.tune.metric)
    storage = train_storage(cfg)
    if cfg.tune.scheduler != "pbt":
        from ray.tune.integration.ray_train import TuneReportCallback

        # A restored trial reruns this function; Train resumes its run from the same (storage, name).
        run_training(
            cfg,
            resume=storage_exists(f"{storage}/{trial_id}"),
            progress=False,
            callbacks=[TuneReportCallback()],
            objective=objective,
        )
        return
    _run_pbt_trial(cfg, objective, storage)


def _run_pbt_trial(cfg: Config, objective: dict[str, float], storage: str) -> None:
    """PBT: start from the Tune checkpoint (own or a donor's) in a new Train run; forward every report with
    its Train checkpoint to Tune from this thread while the Train run goes on in another."""
    from ray import tune
    from ray.util.queue import Queue

    from raysys.train import run_training

    queue: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    start = tune.get_checkpoint()
    segment = 0
    while storage_exists(f"{storage}/segment_{segment:03d}"):
        segment += 1
    box: dict[str, Any] = {}

    def train() -> None:
        try:
            box["result"] = run_training(
                cfg,
                progress=False,
                callbacks=[_ForwardReports(queue)],
                objective=objective,
                initial_checkpoint=start,
                train_name=f"segment_{segment:03d}",
            )
        except BaseException as exc:  # re-raised in the trial's thread
            box["error"] = exc
        finally:
            queue.put(None)

    thread = threading.Thread(target=train, name="raysys-pbt-trial", daemon=True)
    thread.start()
    while (item := queue.get()) is not None:
        ckpt = item["checkpoint"]  # Train's Checkpoint class; Tune's report wants its own (same fields)
        if ckpt is not None:
            ckpt = tune.Checkpoint(path=ckpt.path, filesystem=ckpt.filesystem)
        tune.report(item["metrics"], checkpoint=ckpt)
    thread.join()
    if "error" in box:
        raise box["error"]


def _forward_callback_base():
    from ray.train.v2.api.callback import UserCallback

    return UserCallback


class _ForwardReports(_forward_callback_base()):  # type: ignore[misc]
    """Train callback (on the Train controller): rank 0's metrics and the persisted checkpoint path."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.queue.put(
            {"metrics": dict(metrics[0]), "checkpoint": checkpoint}
        )  # keeps its filesystem (s3://...)


# ------------------------------------------------------------------------------------------- sweep
@dataclass
class SweepResult:
    tune_dir: Path
    table: Any  # pandas.DataFrame
    best: dict[str, Any] | None
    best_config: Path | None
    failed: list[dict[str, Any]]
    unfinished: list[str]
    seconds: float


def max_concurrent_trials(cfg: Config, have: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, or as many whole trials as the cluster's CPUs and GPUs hold (each
    trial's actors and Train workers are created by the trial; partial trials would wait forever)."""
    need = required_resources(cfg)
    fits = [math.floor((have.get("CPU", 0.0) + 1e-9) / (need["CPU"] + TRIAL_CPUS))]
    if need["GPU"] > 0:
        fits.append(math.floor((have.get("GPU", 0.0) + 1e-9) / need["GPU"]))
    n = min(fits)
    if n < 1:
        raise ResourceError(
            f"one trial needs {need['CPU'] + TRIAL_CPUS:g} CPU and {need['GPU']:g} GPU (its rollout, reward "
            f"and learner workers plus the trial itself) but the cluster has {have.get('CPU', 0):g} CPU and "
            f"{have.get('GPU', 0):g} GPU"
        )
    return cfg.tune.max_concurrent_trials or n


def sweep_reward_device(cfg: Config, *, private: bool) -> Config:
    """``reward.device`` decided once for every trial (``raysys.runtime.resolve_reward_device``), so that each
    trial's placement group holds the actors it launches; ``cpu`` when the search space sweeps a key that decides
    it (REWARD_DEVICE_KEYS): the reward actors' bundles are then reserved for every trial."""
    if REWARD_DEVICE_KEYS & set(cfg.tune.search_space):
        cfg = replace(cfg, ["reward.device=cpu"])
    return resolve_reward_device(cfg, private=private)


def trial_resources(cfg: Config):
    """The trial's placement group: the driver, then one bundle per rollout and reward actor (created inside
    the trial, so Tune places them in these bundles), with the roles' node-label selectors and, when a role
    asks to spread, the SPREAD strategy. Train workers get their own group from Ray Train."""
    from ray import tune

    r, rw = cfg.rollout, cfg.reward
    rollout = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    reward, n_reward = {"CPU": rw.cpus_per_actor}, reward_actors(cfg)
    selectors = [{}] + [dict(r.label_selector)] * r.num_workers + [dict(rw.label_selector)] * n_reward
    return tune.PlacementGroupFactory(
        [{"CPU": TRIAL_CPUS}] + [rollout] * r.num_workers + [reward] * n_reward,
        strategy="SPREAD" if "spread" in (r.scheduling, rw.scheduling) else "PACK",
        **({"bundle_label_selector": selectors} if any(selectors) else {}),
    )


def _scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    tc = cfg.tune
    grace = tc.grace_iterations or cfg.eval.every
    if tc.scheduler == "fifo":
        return FIFOScheduler()
    if tc.scheduler == "asha":
        # Milestones grace * 2^k stay on validated iterations when grace is a multiple of eval.every.
        return ASHAScheduler(
            time_attr=keys.ITERATIONS_DONE,
            max_t=cfg.learner.iterations,
            grace_period=min(grace, cfg.learner.iterations),
            reduction_factor=2,
        )
    mutations = {k: v for k, v in param_space(cfg).items() if not _is_grid(cfg, k)}
    if not mutations:
        raise ConfigError(
            "tune.scheduler=pbt mutates choice/uniform/loguniform keys; the search space has none"
        )

    class RaysysPBT(PopulationBasedTraining):
        """Lets a trial's last report end it: a perturbation there would pause (stop and restart from the
        checkpoint) every trial only for it to finish at once, a whole Train start-up per trial."""

        def on_trial_result(self, tune_controller, trial, result):
            if result.get(keys.ITERATIONS_DONE, 0) >= cfg.learner.iterations:
                return self.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    # Synchronous: every trial reaches the perturbation point (with a checkpoint) before any is cloned, so
    # exploits do not depend on which trial happened to start first.
    return RaysysPBT(
        time_attr=keys.ITERATIONS_DONE,
        perturbation_interval=grace,
        hyperparam_mutations=mutations,
        synch=True,
    )


def _is_grid(cfg: Config, key: str) -> bool:
    return "grid" in cfg.tune.search_space[key]


def run_sweep(cfg: Config, *, resume: bool = False) -> SweepResult:
    """Run (or with ``resume`` restore) the sweep declared in ``cfg.tune``; write the table, plot and YAML."""
    import time

    import ray
    from ray import tune

    from raysys.runtime import absolute_paths

    t0 = time.perf_counter()
    cfg = absolute_paths(cfg)
    check_search_space(cfg)
    tune_dir = (cfg.run_dir / "tune").resolve()
    experiment = tune_dir / EXPERIMENT
    if experiment.exists() and not resume:
        raise FileExistsError(
            f"{experiment} already holds a sweep; pass --resume to continue it, or choose another run.name"
        )
    if resume and not tune.Tuner.can_restore(str(experiment)):
        raise FileNotFoundError(f"nothing to resume in {experiment}: no Tune experiment state there")
    if resume and (tune_dir / "config.yaml").is_file():
        from raysys.config_io import config_hash, load_config

        if config_hash(load_config(tune_dir / "config.yaml")) != config_hash(cfg):
            raise ConfigError(
                f"--resume with a config that differs from the one the sweep started with "
                f"({tune_dir / 'config.yaml'}); pass the same config file and overrides"
            )
    save_config(cfg, tune_dir / "config.yaml")
    started = init_ray(cfg, copies=cfg.tune.max_concurrent_trials or 1, extra_cpus=TRIAL_CPUS)
    try:
        cfg = sweep_reward_device(cfg, private=started)
        concurrent = max_concurrent_trials(cfg, ray.cluster_resources())
        log.info("sweep %s: up to %d trial(s) at once", cfg.run.name, concurrent)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=cfg, tune_dir=str(tune_dir)), trial_resources(cfg)
        )
        if resume:
            # Tune's experiment state is a pickle written by this project's own earlier run (trusted path).
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(cfg),
                tune_config=tune.TuneConfig(
                    metric=keys.OBJECTIVE,
                    mode=cfg.tune.mode,
                    scheduler=_scheduler(cfg),
                    num_samples=cfg.tune.num_samples,
                    max_concurrent_trials=concurrent,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=str(tune_dir),
                    failure_config=tune.FailureConfig(max_failures=0),
                    # PBT's forwarded checkpoints are all kept: an exploiting trial restores its donor's
                    # checkpoint after the donor has moved on, so pruning would delete it first.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                    verbose=1,
                ),
            )
        grid = tuner.fit()
        table = results_table(cfg, grid)
        return _write_outputs(cfg, tune_dir, table, time.perf_counter() - t0)
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------- outputs
def results_table(cfg: Config, grid) -> Any:
    """One row per trial: swept values, best and last objective, iterations, status, error."""
    import pandas as pd

    searched = list(cfg.tune.search_space)
    if cfg.tune.normalize_reward_weights:
        searched += [  # the effective weights; terms switched off in the base config stay out
            f"{WEIGHTS_PREFIX}{k}"
            for k, v in cfg.reward.weights.as_dict().items()
            if f"{WEIGHTS_PREFIX}{k}" not in searched and v > 0
        ]
    sign = 1.0 if cfg.tune.mode == "max" else -1.0
    # The experiment state Tune saved (what --resume acts on) tells an interrupted trial (RUNNING, PENDING,
    # PAUSED) from a finished one; after Ctrl+C the in-memory trials all read TERMINATED.
    states = {t.trial_id: t.status for t in grid._experiment_analysis.trials}
    states.update(saved_trial_states(cfg.run_dir.resolve() / "tune" / EXPERIMENT))
    rows = []
    for result in grid:
        params = _trial_params(result)
        if cfg.tune.normalize_reward_weights:
            with contextlib.suppress(ConfigError):  # such a trial failed; its row keeps the sampled values
                params = normalized_weights(cfg, params)
        df = result.metrics_dataframe
        history = (
            df[keys.OBJECTIVE].astype(float)
            if df is not None and keys.OBJECTIVE in df
            else pd.Series(dtype=float)
        )
        valid = history.dropna()
        iterations = (
            int(df[keys.ITERATIONS_DONE].max()) if df is not None and keys.ITERATIONS_DONE in df else 0
        )
        state = states.get(Path(result.path).name, "TERMINATED")
        if result.error is not None or state == "ERROR":
            status = "ERROR"
        elif state != "TERMINATED":
            status = "UNFINISHED"
        elif iterations >= cfg.learner.iterations or cfg.tune.scheduler == "pbt":
            # PBT stops no trial early; a clone of a finished donor ends without reporting again.
            status = "COMPLETED"
        else:
            status = "STOPPED_EARLY"
        best_pos = (sign * valid).idxmax() if len(valid) else None
        rows.append(
            {
                "trial_id": Path(result.path).name,
                "status": status,
                **{k: params.get(k) for k in searched},
                f"best {cfg.tune.metric}": float(valid[best_pos]) if best_pos is not None else math.nan,
                "best_iteration": int(df[keys.ITERATIONS_DONE][best_pos]) if best_pos is not None else None,
                f"last {cfg.tune.metric}": float(valid.iloc[-1]) if len(valid) else math.nan,
                "iterations": iterations,
                "seconds": float(df["time_total_s"].max()) if df is not None and len(df) else 0.0,
                "error": _first_line(result.error),
                "path": str(cfg.run_dir.resolve() / "tune" / "trials" / Path(result.path).name),
            }
        )
    return pd.DataFrame(rows)


def saved_trial_states(experiment: Path) -> dict[str, str]:
    """Trial id -> status from Tune's latest ``experiment_state-*.json`` (plain JSON; no unpickling)."""
    files = sorted(experiment.glob("experiment_state-*.json"))
    if not files:
        return {}
    data = json.loads(files[-1].read_text())
    states = {}
    for trial_json, _ in data.get("trial_data", []):
        trial = json.loads(trial_json)
        states[trial["trial_id"]] = trial["status"]
    return states


def expected_trials(cfg: Config) -> int:
    """Trials the sweep creates: num_samples x the product of the grid axes."""
    n = cfg.tune.num_samples
    for spec in cfg.tune.search_space.values():
        n *= len(spec["grid"]) if "grid" in spec else 1
    return n


def _trial_params(result) -> dict[str, Any]:
    """The trial's sampled values from Tune's params.json (also there for trials that failed early)."""
    path = Path(result.path) / "params.json"
    if path.is_file():
        return json.loads(path.read_text())
    return dict(result.config or {})


def _first_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    cause = next(
        (ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else ""
    )
    return f"{type(error).__name__}: {cause.strip()}"[:500]


def _write_outputs(cfg: Config, tune_dir: Path, table, seconds: float) -> SweepResult:
    from raysys.viz import sweep_plot

    tune_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(tune_dir / "results.parquet", index=False)
    table.to_csv(tune_dir / "results.csv", index=False)
    metric_col = f"best {cfg.tune.metric}"
    sweep_plot(table, [c for c in table.columns if c in cfg.tune.search_space or c.startswith(WEIGHTS_PREFIX)],
               metric_col, tune_dir / "results.png")  # fmt: skip
    ok = table[table["status"] != "ERROR"].dropna(subset=[metric_col])
    best = best_config = None
    if len(ok):
        row = ok.loc[ok[metric_col].idxmax() if cfg.tune.mode == "max" else ok[metric_col].idxmin()]
        best = row.to_dict()
        swept = {
            k: _plain(row[k])
            for k in table.columns
            if k in cfg.tune.search_space or k.startswith(WEIGHTS_PREFIX)
        }
        best_cfg = trial_config(
            replace(cfg, ["tune.search_space={}"]), swept, cfg.run.output_dir, f"{cfg.run.name}-best"
        )
        best_config = save_config(best_cfg, tune_dir / "best_config.yaml")
    failed = table[table["status"] == "ERROR"][["trial_id", "error", "path"]].to_dict("records")
    unfinished = table[table["status"] == "UNFINISHED"]["trial_id"].tolist()
    unfinished += ["(not started)"] * max(0, expected_trials(cfg) - len(table))
    return SweepResult(
        tune_dir=tune_dir,
        table=table,
        best=best,
        best_config=best_config,
        failed=failed,
        unfinished=unfinished,
        seconds=seconds,
    )


def _plain(value: Any) -> Any:
    """numpy scalars -> Python for YAML/JSON."""
    return value.item() if hasattr(value, "item") else value
