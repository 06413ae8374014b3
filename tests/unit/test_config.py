"""The typed config tree: defaults, YAML overrides, dotted CLI overrides, errors, round trip."""

from __future__ import annotations

import dataclasses

import pytest

from envs.rewards import RewardConfig
from policies.config import PolicyConfig
from raysys.config import Config, ConfigError, LearnerConfig
from raysys.config_io import config_hash, load_config, replace, save_config


def test_defaults_are_the_design_starting_point() -> None:
    cfg = load_config()
    assert cfg == Config()
    # The documented defaults: lr 3e-4, K = 8, 16x16 tiles, KL 0.05, clip 0.2, 2 epochs; reward weights 0.5/0.2/0.2/0.1.
    assert (cfg.learner.lr, cfg.rollout.samples_per_image, cfg.reward.tile_sizes) == (3e-4, 8, (16,))
    assert (cfg.learner.kl_coef, cfg.learner.clip, cfg.learner.epochs) == (0.05, 0.2, 2)
    w = cfg.reward.weights
    assert (w.dice, w.recall, w.topology, w.length) == (0.5, 0.2, 0.2, 0.1)


def test_tree_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learner.lr = 1.0  # type: ignore[misc]


def test_yaml_holds_only_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  lr: 1.0e-4\nreward:\n  weights:\n    dice: 0.7\n")
    cfg = load_config(path)
    assert cfg.learner.lr == 1e-4
    assert cfg.reward.weights.dice == 0.7
    assert cfg.reward.weights.recall == 0.2  # untouched siblings keep their defaults
    assert cfg.learner.epochs == 2


def test_dotted_overrides_parse_types() -> None:
    cfg = load_config(
        None,
        [
            "learner.lr=1e-5",
            "rollout.num_workers=3",
            "learner.use_gpu=true",
            "policy.trainable=[mask_decoder]",
            "run.name=abc",
            "reward.weights.dice=1",
        ],
    )
    assert cfg.learner.lr == 1e-5 and isinstance(cfg.learner.lr, float)  # "1e-5" is a string in YAML 1.1
    assert cfg.rollout.num_workers == 3
    assert cfg.learner.use_gpu is True
    assert cfg.policy.trainable == ("mask_decoder",)
    assert cfg.run.name == "abc"
    assert cfg.reward.weights.dice == 1.0


def test_overrides_apply_after_the_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  lr: 0.01\n")
    assert load_config(path, ["learner.lr=0.02"]).learner.lr == 0.02


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("learner.lrr=1", "unknown config key 'learner.lrr'; did you mean 'learner.lr'"),
        ("lerner.lr=1", "unknown config key 'lerner'"),
        ("learner.algorithm=sac", "allowed: 'grpo', 'ppo', 'rce_grpo'"),
        ("learner.lr=fast", "invalid value for 'learner.lr'"),
        ("learner.epochs=1.5", "invalid value for 'learner.epochs'"),
        ("learner.use_gpu=maybe", "invalid value for 'learner.use_gpu'"),
        ("learner.clip=2", "learner.clip"),
        ("policy.trainable=[llm_lora, vision]", "unknown part(s) ['vision']"),
        ("rollout.samples_per_image=1", "rollout.samples_per_image"),
        ("learner.lr", "must look like 'section.key=value'"),
        ("learner.lr.x=1", "'learner.lr' has no sub-keys"),
        ("data.root=/tmp", "must be null for kind 'synthetic'"),
        ("data.domain=mars", "allowed: 'source', 'shifted'"),
        ("rollout.max_staleness=-1", "rollout.max_staleness"),
        ("rollout.timeout_s=0", "rollout.timeout_s"),
        ("learner.is_cap=0.5", "learner.is_cap"),
        ("learner.gpus_per_worker=2", "learner.gpus_per_worker"),
        ("learner.gpus_per_worker=0", "learner.gpus_per_worker"),
        (["learner.use_gpu=true", "learner.gpus_per_worker=0.5", "learner.num_workers=2"], "NCCL refuses"),
        ("reward.source=learned", "reward.reward_net"),
        ("reward.weights.dice=-1", "dice"),
        ("rollout.batch_size=0", "rollout.batch_size"),
        ("learner.micro_batch_size=5", "must be in 1..learner.minibatch_size"),
        (
            ["learner.strategy=deepspeed", "learner.micro_batch_size=2"],
            "not supported with strategy deepspeed",
        ),
    ],
)
def test_bad_values_name_the_key(override: str | list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override] if isinstance(override, str) else override)
    assert needle in str(info.value)


def test_every_tree_checks_values_alike() -> None:
    # One check (envs.config_checks) for the reward objective, the policies' nodes and raysys' own: a node owned by
    # a package names its field by class, and the loader turns that into the key the user wrote.
    for build, key in [
        (lambda: RewardConfig(dice_scale=0), "RewardConfig.dice_scale"),
        (lambda: PolicyConfig(lora_r=0), "policy.lora_r"),
        (lambda: LearnerConfig(lr=0), "learner.lr"),
    ]:
        with pytest.raises(ConfigError, match=rf"^invalid value for '{key}': "):
            build()
    with pytest.raises(
        ConfigError, match=r"^invalid value for 'reward\.dice_scale': 0\.0; it must be a finite"
    ):
        load_config(None, ["reward.dice_scale=0"])


def test_unknown_key_in_file_names_file_and_key(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "rollout.temprature" in msg and "did you mean 'rollout.temperature'" in msg


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(top)


def test_resolved_config_round_trips(tmp_path) -> None:
    cfg = load_config(
        None,
        [
            "learner.lr=1e-5",
            "eval.thresholds=[0.25, 0.5]",
            "run.num_cpus=8",
            "tune.search_space.learner.lr={loguniform: [1.0e-5, 1.0e-3]}",
        ],
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert again.tune.search_space == {"learner.lr": {"loguniform": [1e-5, 1e-3]}}


def test_search_space_keys_must_be_config_keys() -> None:
    with pytest.raises(ConfigError, match=r"'learner\.lrr' is not a config key"):
        load_config(None, ["tune.search_space.learner.lrr={choice: [1, 2]}"])
    with pytest.raises(ConfigError, match="kind in"):
        load_config(None, ["tune.search_space.learner.lr={normal: [0, 1]}"])


def test_replace_and_hash_change() -> None:
    cfg = Config()
    other = replace(cfg, ["reward.weights.dice=0.9"])
    assert other.reward.weights.dice == 0.9 and cfg.reward.weights.dice == 0.5
    assert config_hash(other.reward) != config_hash(cfg.reward)
    assert config_hash(other.data) == config_hash(cfg.data)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sft.lr=inf", "'sft.lr'.*finite"),
        ("learner.kl_coef=inf", "'learner.kl_coef'.*finite"),
        ("learner.lr=nan", "'learner.lr'.*finite"),
        ("rollout.temperature=inf", "'rollout.temperature'.*finite"),
        ("run.num_cpus=inf", "'run.num_cpus'.*finite"),
        ("policy.lora_alpha=0", "'policy.lora_alpha'"),
        ("sft.bce_weight=-1", "sft.bce_weight/dice_weight"),
        ("reward.weights={dice: 0, recall: 0, topology: 0, length: 0}", "'reward.weights'.*all 0"),
        ("reward.tile_sizes=[512]", "tile 512 is larger than the 256-px images"),
    ],
)
def test_non_finite_and_degenerate_values_are_refused(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("learner:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(path)


def test_only_synthetic_data_has_domains() -> None:
    assert load_config(None, ["data.domain=shifted"]).data.domain == "shifted"
    with pytest.raises(ConfigError, match=r"data\.domain.*only synthetic data has domains"):
        load_config(None, ["data.kind=drive", "data.root=/data/DRIVE", "data.domain=shifted"])


def test_skipping_unlabelled_images_is_an_hrf_option() -> None:
    assert load_config(
        None, ["data.kind=hrf", "data.root=/data/HRF", "data.skip_unlabelled=true"]
    ).data.skip_unlabelled
    with pytest.raises(ConfigError, match=r"data\.skip_unlabelled.*only applies to data\.kind=hrf"):
        load_config(None, ["data.kind=stare", "data.root=/data/STARE", "data.skip_unlabelled=true"])


def test_node_label_selectors_round_trip_and_bad_ones_name_the_key(tmp_path) -> None:
    cfg = load_config(
        None,
        [
            "rollout.label_selector.role=rollout",
            "learner.label_selector.zone=in(a,b)",
            "learner.placement=spread",
        ],
    )
    assert cfg.rollout.label_selector == {"role": "rollout"} and cfg.learner.placement == "spread"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    with pytest.raises(ConfigError, match=r"'reward.label_selector'.*-spot"):
        load_config(None, ["reward.label_selector.role=-spot"])
    with pytest.raises(ConfigError, match=r"'rollout.scheduling'.*allowed: 'default', 'spread'"):
        load_config(None, ["rollout.scheduling=pack"])


@pytest.mark.parametrize(
    ("selector", "labels", "match"),
    [
        ({"role": "rollout"}, {"role": "rollout", "zone": "a"}, True),
        ({"role": "rollout"}, {"role": "learner"}, False),
        ({"role": "rollout"}, {}, False),
        ({"role": "!learner"}, {"role": "rollout"}, True),
        ({"role": "!learner"}, {}, True),
        ({"role": "!learner"}, {"role": "learner"}, False),
        ({"zone": "in(a, b)"}, {"zone": "b"}, True),
        ({"zone": "in(a,b)"}, {"zone": "c"}, False),
        ({"zone": "!in(a,b)"}, {"zone": "c"}, True),
        ({"role": "rollout", "zone": "a"}, {"role": "rollout", "zone": "b"}, False),
    ],
)
def test_label_selectors_match_as_ray_places(selector, labels, match) -> None:
    from raysys.runtime import labels_match

    assert labels_match(selector, labels) is match


def test_demo_trains_the_recipe_of_the_tiny_example() -> None:
    # `raysys demo` states its recipe in code (it must run without the examples folder); it must stay the
    # recipe examples/tiny_synthetic.yaml chose on validation, differing only in run size.
    from pathlib import Path

    from raysys.cli import DEMO_OVERRIDES

    example = load_config(Path(__file__).resolve().parents[2] / "examples/tiny_synthetic.yaml")
    demo = load_config(None, list(DEMO_OVERRIDES))
    assert demo.reward == example.reward
    assert demo.rollout == example.rollout
    assert (demo.learner.algorithm, demo.learner.advantage) == (
        example.learner.algorithm,
        example.learner.advantage,
    )
    assert demo.eval.select_metric == example.eval.select_metric == "val/best_threshold_dice"
