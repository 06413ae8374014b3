"""Config and command-line faults: every value checked once, at load, naming the key; config files that are
not YAML mappings or hold unknown or duplicate keys (YAML Python tags are in security_cases)."""

from __future__ import annotations

import re

from raysys.testing.faults.builders import RUN_NAME, cfg, yaml_cfg
from raysys.testing.faults.harness import Case

FINITE = r"finite"


# config: every value checked once, at load, naming the key
CASES: list[Case] = [
    *(
        Case(f"config-run-name-{i}", "config", cfg(f"run.name={v}"), 2, RUN_NAME)
        for i, v in enumerate(["..", "../x", "a/b", "''", ".hidden", "-x", "a b", "'~'", "/etc"])
    ),
    *(
        Case(f"config-nonfinite-{k}={v}", "config", cfg(f"{k}={v}"), 2, rf"{re.escape(k)}.*{FINITE}")
        for k, v in [
            ("sft.lr", "inf"),
            ("sft.lr", "nan"),
            ("learner.lr", "inf"),
            ("learner.kl_coef", "inf"),
            ("rollout.temperature", "inf"),
            ("reward.weights.dice", "nan"),
            ("learner.clip", "-inf"),
            ("eval.threshold", "nan"),
        ]
    ),
    Case("config-num-cpus-inf", "config", cfg("run.num_cpus=inf"), 2, r"run\.num_cpus"),
    Case("config-lr-negative", "config", cfg("learner.lr=-1e-3"), 2, r"learner\.lr"),
    Case("config-sft-lr-zero", "config", cfg("sft.lr=0"), 2, r"sft\.lr"),
    Case("config-kl-negative", "config", cfg("learner.kl_coef=-0.1"), 2, r"learner\.kl_coef"),
    Case("config-temperature-zero", "config", cfg("rollout.temperature=0"), 2, r"rollout\.temperature"),
    Case("config-lora-alpha-zero", "config", cfg("policy.lora_alpha=0"), 2, r"policy\.lora_alpha"),
    Case("config-lora-alpha-negative", "config", cfg("policy.lora_alpha=-16"), 2, r"policy\.lora_alpha"),
    Case("config-lora-r-zero", "config", cfg("policy.lora_r=0"), 2, r"policy\.lora_r"),
    Case("config-sft-bce-negative", "config", cfg("sft.bce_weight=-1"), 2, r"sft\.bce_weight"),
    Case("config-sft-weights-zero", "config", cfg("sft.bce_weight=0", "sft.dice_weight=0"), 2, r"sft\."),
    Case(
        "config-reward-weights-all-zero",
        "config",
        cfg(*(f"reward.weights.{k}=0" for k in ("dice", "recall", "topology", "length"))),
        2,
        r"reward\.weights",
    ),
    Case("config-reward-weight-negative", "config", cfg("reward.weights.dice=-1"), 2, r"reward\.weights"),
    Case("config-tile-larger-than-image", "config", cfg("reward.tile_sizes=[128]"), 2, r"tile"),
    Case(
        "config-reward-cuda-no-rollout-gpu",
        "config",
        cfg("reward.device=cuda"),
        2,
        r"reward\.device.*rollout\.gpus_per_worker=0",
    ),
    Case(
        "config-reward-device-unknown",
        "config",
        cfg("reward.device=gpu"),
        2,
        r"reward\.device.*'auto', 'cpu', 'cuda'",
    ),
    Case("config-tile-zero", "config", cfg("reward.tile_sizes=[0]"), 2, r"reward\.tile_sizes"),
    Case("config-thresholds-empty", "config", cfg("eval.thresholds=[]"), 2, r"eval\.thresholds"),
    Case("config-threshold-above-one", "config", cfg("eval.threshold=1.5"), 2, r"eval\.threshold"),
    Case(
        "config-select-metric-typo", "config", cfg("eval.select_metric=val/dcie"), 2, r"eval\.select_metric"
    ),
    Case("config-iterations-zero", "config", cfg("learner.iterations=0"), 2, r"learner\.iterations"),
    Case("config-iterations-float", "config", cfg("learner.iterations=1.5"), 2, r"learner\.iterations"),
    Case("config-lr-not-a-number", "config", cfg("learner.lr=fast"), 2, r"learner\.lr"),
    Case("config-workers-zero", "config", cfg("rollout.num_workers=0"), 2, r"rollout\.num_workers"),
    Case("config-group-of-one", "config", cfg("rollout.samples_per_image=1"), 2, r"samples_per_image"),
    Case("config-minibatch-zero", "config", cfg("learner.minibatch_size=0"), 2, r"learner\.minibatch_size"),
    Case("config-algorithm-unknown", "config", cfg("learner.algorithm=reinforce"), 2, r"learner\.algorithm"),
    Case("config-policy-kind-unknown", "config", cfg("policy.kind=unet"), 2, r"policy\.kind"),
    Case("config-data-kind-unknown", "config", cfg("data.kind=kaggle"), 2, r"data\.kind"),
    Case("config-crop-negative", "config", cfg("data.crop=-5"), 2, r"data\.crop"),
    Case("config-scale-zero", "config", cfg("data.scale=0"), 2, r"data\.scale"),
    Case("config-window-overlap-one", "config", cfg("eval.window_overlap=1.0"), 2, r"eval\.window_overlap"),
    Case("config-val-fraction-one", "config", cfg("data.val_fraction=1.0"), 2, r"data\.val_fraction"),
    Case(
        "config-unknown-key-typo",
        "config",
        cfg("learner.lrr=1"),
        2,
        r"unknown config key 'learner\.lrr'.*did you mean",
    ),
    Case("config-unknown-section", "config", cfg("optimizer.lr=1"), 2, r"unknown config key 'optimizer'"),
    Case("config-no-equals", "config", lambda w: ["config", "learner.lr"], 2, r"learner\.lr=VALUE"),
    Case("config-file-missing", "config", lambda w: ["config", str(w.root / "nope.yaml")], 2, r"nope\.yaml"),
    Case("config-file-is-a-list", "config", yaml_cfg("- 1\n- 2\n"), 2, r"cfg\.yaml.*mapping"),
    Case("config-file-bad-yaml", "config", yaml_cfg("learner: {lr: [\n"), 2, r"cfg\.yaml"),
    Case(
        "config-file-duplicate-key",
        "config",
        yaml_cfg("learner:\n  lr: 1e-3\n  lr: 1e-4\n"),
        2,
        r"duplicate.*lr",
    ),
    Case("config-file-unknown-key", "config", yaml_cfg("learner:\n  lrr: 1e-3\n"), 2, r"learner\.lrr"),
    Case(
        "config-file-not-utf8",
        "config",
        lambda w: ["config", str(w.file("cfg.yaml", b"\xff\xfe\x00bad"))],
        2,
        r"cfg\.yaml",
    ),
    Case(
        "config-file-wrong-type",
        "config",
        yaml_cfg("learner:\n  iterations: many\n"),
        2,
        r"learner\.iterations",
    ),
    Case("config-section-not-mapping", "config", yaml_cfg("learner: 3\n"), 2, r"learner"),
    Case(
        "config-learned-reward-without-net", "config", cfg("reward.source=learned"), 2, r"reward\.reward_net"
    ),
    Case("config-reward-source-unknown", "config", cfg("reward.source=oracle"), 2, r"reward\.source"),
    Case("config-tune-mode", "config", cfg("tune.mode=maximize"), 2, r"tune\.mode"),
    Case(
        "config-tune-search-key-unknown",
        "config",
        cfg("tune.search_space={learner.lrr: [1, 2]}"),
        2,
        r"learner\.lrr",
    ),
    Case("config-max-failures", "config", cfg("learner.max_failures=-2"), 2, r"learner\.max_failures"),
    Case("config-sft-steps-negative", "config", cfg("sft.steps=-1"), 2, r"sft\.steps"),
    Case("config-valid-prints", "config", cfg("learner.lr=1e-3"), 0, r"lr: 0\.001"),
]

_ALIAS_BOMB = (
    "["
    + ", ".join(
        ["&a [x, x, x, x, x, x, x, x, x]"]
        + [f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcd", "bcde", strict=True)]
        + [f"[{', '.join(['*e'] * 9)}]"]
    )
    + "]"
)
"""A YAML list of 9**6 strings written in a few hundred bytes: a message quoting it whole would be MBs."""

# values whose error named a cause but not the key, or quoted too much; machines a config would swamp
CASES += [
    Case(
        "config-run-name-too-long", "config", cfg(f"run.name={'a' * 300}", cmd="sft"), 2, r"run\.name.*longer"
    ),
    Case("config-run-seed-negative", "config", cfg("run.seed=-1", cmd="sft"), 2, r"run\.seed.*>= 0"),
    Case("config-data-seed-negative", "config", cfg("data.seed=-3", cmd="sft"), 2, r"data\.seed.*>= 0"),
    Case("config-n-train-1e7", "config", cfg("data.n_train=1e7", cmd="sft"), 2, r"data\.n_train.*10000000"),
    Case("config-n-train-zero", "config", cfg("data.n_train=0", cmd="sft"), 2, r"data\.n_train.*1\.\."),
    Case("config-n-val-zero", "config", cfg("data.n_val=0", cmd="sft"), 2, r"data\.n_val"),
    Case("config-n-test-fraction", "config", cfg("data.n_test=2.5"), 2, r"data\.n_test.*expected int"),
    Case("config-rollout-threads", "config", cfg("rollout.torch_threads=-1"), 2, r"rollout\.torch_threads"),
    Case("config-learner-threads", "config", cfg("learner.torch_threads=-2"), 2, r"learner\.torch_threads"),
    Case(
        "config-file-is-a-folder",
        "config",
        lambda w: ["config", str((w.root / "cfg.yaml").mkdir() or w.root / "cfg.yaml")],
        2,
        r"cfg\.yaml is a folder",
    ),
    Case(
        "config-alias-bomb-in-run-name",
        "security",
        yaml_cfg(f"run:\n  name: {_ALIAS_BOMB}\n"),
        2,
        r"run\.name.*\.\.\. \([\d,]+ characters\); expected str",
    ),
    Case(
        "config-output-dir-under-proc",
        "config",
        lambda w: ["sft", *w.run(), "run.output_dir=/proc/raysys-runs"],
        2,
        r"run\.output_dir=/proc/raysys-runs cannot be created",
    ),
    Case(
        "config-output-dir-under-a-file",
        "config",
        lambda w: ["eval", *w.run(f"run.output_dir={w.file('f.txt', 'x')}/runs")],
        2,
        r"run\.output_dir=.*f\.txt/runs cannot be created",
    ),
    Case(
        "config-swamps-the-machine-rollout",
        "config",
        cfg("rollout.num_workers=64", cmd="train"),
        2,
        r"rollout\.num_workers=64.*run\.num_cpus",
    ),
    Case(
        "config-swamps-the-machine-reward",
        "config",
        cfg("reward.num_actors=48", cmd="train"),
        2,
        r"reward\.num_actors=48.*run\.ray_address",
    ),
    Case(
        "config-swamps-the-machine-tune",
        "config",
        cfg(
            "rollout.num_workers=4",
            "tune.max_concurrent_trials=8",
            "tune.search_space={learner.lr: {grid: [1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4, 7e-4, 8e-4]}}",
            cmd="tune",
        ),
        2,
        r"x 8 concurrent trials",
    ),
]
