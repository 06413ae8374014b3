"""The cached pipeline: a full tiny run, a second run that skips everything, and a reward-weight change
that reruns rl and what follows but not data, sft or reward_net."""

from __future__ import annotations

import json
import re

from raysys.config_io import load_config, replace
from raysys.pipeline import STAGES, Pipeline
from raysys.testing.rl_small import SMALL_RL

TINY = [
    *SMALL_RL, "data.n_test=3", "sft.steps=4", "sft.eval_every=2", "sft.batch_size=2", "reward_net.epochs=1",
    "reward_net.n_train=3", "reward_net.n_val=2", "reward_net.masks_per_image=2", "learner.iterations=2",
    "eval.every=1", "run.name=pipe", "rollout.num_workers=1",
]  # fmt: skip


def test_pipeline_runs_skips_and_reruns_downstream_only(ray_local, tmp_path, monkeypatch) -> None:
    import raysys.pipeline as pipeline_mod

    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path}"])
    first = Pipeline(cfg, progress=False).run()
    assert [r["stage"] for r in first] == list(STAGES) and all(r["status"] == "ran" for r in first)
    run = cfg.run_dir
    report = run / "report" / "report.html"
    for src in re.findall(r'src="([^"]+)"', report.read_text()):
        assert (report.parent / src).is_file(), src  # every figure the page references exists
    assert (run / "export" / "merged" / "model.safetensors").is_file()
    table = json.loads((run / "eval" / "comparison.json").read_text())
    assert set(table) == {"sft", "sft@val_best_t", "rl", "rl@val_best_t"}
    assert not list(run.glob("*.tmp"))

    second = Pipeline(cfg, progress=False).run()
    assert all(r["status"].startswith("skipped") for r in second)

    # Which stages a changed reward weight reruns: each stage stands in for itself by writing new bytes
    # into its outputs (the real stages ran above), so a rerun rl stage changes what eval, export and
    # report read.
    called = []

    def stand_in(name, outputs):
        def run(cfg, inputs, out):
            called.append(name)
            for rel in outputs:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_text(f"{name} again")
            return {}

        return run

    stages = {n: pipeline_mod.Stage(n, s.inputs, stand_in(n, s.outputs), s.outputs, s.resumable)
              for n, s in pipeline_mod._stages().items()}  # fmt: skip
    monkeypatch.setattr(pipeline_mod, "_stages", lambda: stages)
    changed = replace(cfg, ["reward.weights.dice=0.9"])
    third = {r["stage"]: r["status"] for r in Pipeline(changed, progress=False).run()}
    assert all(third[s].startswith("skipped") for s in ("data", "sft", "reward_net"))
    assert called == ["rl", "eval", "export", "report"] and all(third[s] == "ran" for s in called)


def test_failed_stage_is_named_and_earlier_outputs_kept(ray_local, tmp_path, monkeypatch) -> None:
    import pytest

    import raysys.pipeline as pipeline_mod
    from raysys.pipeline import PipelineError

    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path}", "run.name=fail"])

    def broken(*args, **kwargs):
        raise ValueError("corrupt weights")

    stages = pipeline_mod._stages()
    stages["reward_net"] = pipeline_mod.Stage("reward_net", ("sft",), broken, ())
    monkeypatch.setattr(pipeline_mod, "_stages", lambda: stages)
    with pytest.raises(
        PipelineError, match=r"stage 'reward_net' failed: ValueError: corrupt weights"
    ) as info:
        Pipeline(cfg, progress=False).run()
    assert "--from reward_net" in str(info.value)
    assert (cfg.run_dir / "sft" / "manifest.json").is_file() and not (cfg.run_dir / "reward_net").exists()
