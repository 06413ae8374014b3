"""`raysys tune` pieces that need no running sweep: objective parsing, search-space validation and mapping,
weight normalisation, trial configs and resources, concurrency, the resume point, the plot."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from raysys.config import ConfigError, parse_objective
from raysys.config_io import load_config
from raysys.runtime import latest_iteration
from raysys.train import objective_value

tune_mod = pytest.importorskip("raysys.tune")


def test_objective_single_and_weighted() -> None:
    assert parse_objective("val/cldice") == {"val/cldice": 1.0}
    terms = parse_objective("0.7*val/dice + 0.3 * val/cldice")
    assert terms == {"val/dice": 0.7, "val/cldice": 0.3}
    assert objective_value(terms, {"val/dice": 0.8, "val/cldice": 0.6}) == pytest.approx(0.74)
    assert math.isnan(objective_value(terms, {"val/dice": 0.8}))  # not validated yet


@pytest.mark.parametrize("metric", ["dice", "rollout/reward_mean", "a*val/dice", "val/dice + 2*val/dice"])
def test_bad_metric_names_tune_metric(metric: str) -> None:
    with pytest.raises(ConfigError, match=r"tune\.metric"):
        load_config(None, [f"tune.metric={metric}"])


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("{uniform: [0.1, 0.01]}", "low < high"),
        ("{loguniform: [0, 1]}", "low > 0"),
        ("{grid: []}", "list of values"),
        ("{grid: 3}", "list of values"),
        ("{normal: [0, 1]}", "kind in"),
    ],
)
def test_bad_search_space_names_the_key(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        load_config(None, [f"tune.search_space.learner.lr={spec}"])
    assert "tune.search_space.learner.lr" in str(info.value)


def test_yaml_exponent_strings_become_numbers() -> None:
    cfg = load_config(None, ["tune.search_space.learner.lr={loguniform: [1e-5, 1e-3]}"])
    assert cfg.tune.search_space["learner.lr"] == {"loguniform": [1e-5, 1e-3]}


def test_param_space_maps_each_kind() -> None:
    from ray.tune.search.sample import Categorical, Float

    cfg = load_config(
        None,
        [
            "tune.search_space.reward.weights.dice={grid: [0.4, 0.8]}",
            "tune.search_space.learner.kl_coef={choice: [0.01, 0.1]}",
            "tune.search_space.learner.clip={uniform: [0.1, 0.3]}",
            "tune.search_space.learner.lr={loguniform: [1.0e-5, 1.0e-3]}",
        ],
    )
    space = tune_mod.param_space(cfg)
    assert space["reward.weights.dice"] == {"grid_search": [0.4, 0.8]}
    assert isinstance(space["learner.kl_coef"], Categorical)
    assert isinstance(space["learner.clip"], Float) and (
        space["learner.clip"].lower,
        space["learner.clip"].upper,
    ) == (0.1, 0.3)
    assert isinstance(space["learner.lr"].sampler, Float._LogUniform)  # fmt: skip


def test_invalid_listed_value_fails_before_any_trial() -> None:
    cfg = load_config(None, ["tune.search_space.reward.weights.dice={grid: [0.5, -1]}"])
    with pytest.raises(ConfigError, match=r"tune.search_space.reward.weights.dice: value -1 is invalid"):
        tune_mod.check_search_space(cfg)
    with pytest.raises(ConfigError, match="search_space is empty"):
        tune_mod.check_search_space(load_config())


def test_trial_config_applies_values_and_normalises_weights(tmp_path) -> None:
    base = load_config(None, ["tune.normalize_reward_weights=true", "reward.weights.recall=0.5"])
    cfg = tune_mod.trial_config(base, {"reward.weights.dice": 1.0, "learner.lr": 1e-3}, tmp_path, "t1")
    w = cfg.reward.weights.as_dict()
    assert sum(w.values()) == pytest.approx(1.0)
    # dice 1.0, recall 0.5, topology 0.2, length 0.1 (defaults) rescaled together
    assert w["dice"] == pytest.approx(1.0 / 1.8) and w["recall"] == pytest.approx(0.5 / 1.8)
    assert cfg.learner.lr == 1e-3 and cfg.run_dir == tmp_path / "t1"
    plain = tune_mod.trial_config(load_config(), {"reward.weights.dice": 1.0}, tmp_path, "t2")
    assert plain.reward.weights.dice == 1.0 and plain.reward.weights.recall == 0.2


def test_concurrency_from_resources_and_fail_fast() -> None:
    from raysys.runtime import ResourceError

    cfg = load_config()  # 2 rollout x 0.5 + 0.5 reward + 0.5 learner + 0.25 trial = 2.25 CPU
    assert tune_mod.max_concurrent_trials(cfg, {"CPU": 8.0}) == 3
    gpu = ["rollout.gpus_per_worker=1", "learner.use_gpu=true", "learner.num_workers=2", "reward.device=cpu"]
    assert (
        tune_mod.max_concurrent_trials(load_config(None, gpu), {"CPU": 64.0, "GPU": 8.0}) == 2
    )  # 4 GPUs a trial
    with pytest.raises(ResourceError, match=r"one trial needs 2\.75 CPU and 4 GPU"):
        tune_mod.max_concurrent_trials(load_config(None, gpu), {"CPU": 64.0, "GPU": 2.0})
    # The rollout actors score the reward on their GPUs (reward.device auto or cuda): no reward actor's CPU.
    with pytest.raises(ResourceError, match=r"one trial needs 2\.25 CPU and 4 GPU"):
        tune_mod.max_concurrent_trials(load_config(None, gpu[:-1]), {"CPU": 64.0, "GPU": 2.0})
    assert (
        tune_mod.max_concurrent_trials(load_config(None, ["tune.max_concurrent_trials=5"]), {"CPU": 64.0})
        == 5
    )


def test_trial_placement_group_holds_the_trials_actors() -> None:
    overrides = ["rollout.num_workers=3", "rollout.gpus_per_worker=0.5", "reward.num_actors=2"]
    cfg = load_config(None, [*overrides, "reward.device=cpu"])
    bundles = tune_mod.trial_resources(cfg).bundles
    assert bundles[0] == {"CPU": tune_mod.TRIAL_CPUS}
    assert bundles[1:4] == [{"CPU": 0.5, "GPU": 0.5}] * 3 and bundles[4:] == [{"CPU": 0.5}] * 2
    assert tune_mod.trial_resources(cfg).strategy == "PACK"
    on_rollout = tune_mod.trial_resources(load_config(None, [*overrides, "reward.device=cuda"])).bundles
    assert on_rollout == bundles[:4]  # no idle reward actors
    placed = load_config(
        None,
        ["rollout.num_workers=2", "rollout.label_selector.role=rollout", "rollout.scheduling=spread"],
    )
    request = tune_mod.trial_resources(placed)
    assert request.strategy == "SPREAD"
    assert request._bound.arguments["bundle_label_selector"] == [
        {},
        {"role": "rollout"},
        {"role": "rollout"},
        {},
    ]


def test_resume_point_is_the_registered_checkpoint(tmp_path) -> None:
    assert latest_iteration(tmp_path) == -1
    (tmp_path / "iter_000004").mkdir()  # written, but the run stopped before Train registered it
    names = [{"checkpoint_dir_name": "iter_000001"}, {"checkpoint_dir_name": "iter_000003"}]
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": names}))
    assert latest_iteration(tmp_path) == 3


def test_sweep_plot_marks_failed_trials(tmp_path) -> None:
    from raysys.viz import sweep_plot

    table = pd.DataFrame(
        {
            "reward.weights.dice": [0.4, 0.8, 0.6],
            "policy.checkpoint": [None, "a", "b"],
            "best val/dice": [0.70, 0.74, math.nan],
            "status": ["COMPLETED", "STOPPED_EARLY", "ERROR"],
        }
    )
    out = sweep_plot(table, ["reward.weights.dice", "policy.checkpoint"], "best val/dice", tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_saved_trial_states_and_expected_count(tmp_path) -> None:
    assert tune_mod.saved_trial_states(tmp_path) == {}
    trial_data = [[json.dumps({"trial_id": "a_00000", "status": "RUNNING"}), "{}"],
                  [json.dumps({"trial_id": "a_00001", "status": "TERMINATED"}), "{}"]]  # fmt: skip
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": trial_data})
    )
    assert tune_mod.saved_trial_states(tmp_path) == {"a_00000": "RUNNING", "a_00001": "TERMINATED"}
    cfg = load_config(
        None,
        [
            "tune.num_samples=2",
            "tune.search_space.reward.weights.dice={grid: [0.4, 0.6, 0.8]}",
            "tune.search_space.learner.lr={loguniform: [1.0e-5, 1.0e-3]}",
        ],
    )
    assert tune_mod.expected_trials(cfg) == 6


def test_sweep_cannot_vary_the_time_axis_and_stays_on_validated_iterations() -> None:
    space = "tune.search_space.reward.weights.dice={grid: [0.4, 0.8]}"
    with pytest.raises(ConfigError, match="cannot be swept"):
        tune_mod.check_search_space(
            load_config(None, [space, "tune.search_space.learner.iterations={grid: [5, 9]}"])
        )
    with pytest.raises(ConfigError, match=r"multiple of eval\.every"):
        tune_mod.check_search_space(load_config(None, [space, "eval.every=10", "tune.grace_iterations=15"]))
    pbt = [
        space.replace("grid", "choice"),
        "tune.scheduler=pbt",
        "eval.every=5",
        "learner.checkpoint_every=25",
    ]
    with pytest.raises(ConfigError, match=r"multiple of learner\.checkpoint_every"):
        tune_mod.check_search_space(load_config(None, pbt))
    tune_mod.check_search_space(load_config(None, [*pbt, "tune.grace_iterations=25"]))


def test_explicit_concurrency_still_needs_one_trial_to_fit() -> None:
    from raysys.runtime import ResourceError

    with pytest.raises(ResourceError, match="one trial needs"):
        tune_mod.max_concurrent_trials(load_config(None, ["tune.max_concurrent_trials=2"]), {"CPU": 1.0})


def test_relative_paths_resolve_against_the_submitters_repo(tmp_path) -> None:
    from raysys.runtime import absolute_paths

    cfg = load_config(None, ["policy.checkpoint=runs/tiny/sft/model", "run.storage_path=s3://b/raysys"])
    out = absolute_paths(cfg, tmp_path)
    assert out.policy.checkpoint == str(tmp_path / "runs/tiny/sft/model")
    assert out.run.output_dir == str(tmp_path / "runs") and out.run.storage_path == "s3://b/raysys"


def test_pbt_pauses_at_a_perturbation_point_but_lets_the_last_report_end_the_trial() -> None:
    from ray.tune.experiment import Trial

    from raysys import keys

    cfg = load_config(
        None,
        ["tune.search_space.learner.lr={loguniform: [1.0e-4, 1.0e-2]}", "tune.scheduler=pbt", "eval.every=1",
         "learner.checkpoint_every=1", "learner.iterations=2"],
    )  # fmt: skip
    scheduler = tune_mod._scheduler(cfg)
    scheduler.set_search_properties(keys.OBJECTIVE, "max")
    trials = [Trial("__fake", config={"learner.lr": 1e-3}, stub=True) for _ in range(2)]

    class Controller:
        search_alg = None

        def get_live_trials(self):
            return trials

        get_trials = get_live_trials

    for trial in trials:
        scheduler.on_trial_add(Controller(), trial)
    # Iteration 1 of 2: synchronous PBT pauses the trial until the other one gets there.
    assert (
        scheduler.on_trial_result(Controller(), trials[0], {keys.ITERATIONS_DONE: 1, keys.OBJECTIVE: 0.5})
        == "PAUSE"
    )
    # Iteration 2 of 2 is the last: a pause would restart the trial just to end it.
    assert (
        scheduler.on_trial_result(Controller(), trials[0], {keys.ITERATIONS_DONE: 2, keys.OBJECTIVE: 0.5})
        == "CONTINUE"
    )
