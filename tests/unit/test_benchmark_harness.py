"""benchmarks/ stands on one harness: one ROOT, no imports from tests/ or of another script's private names,
and results written in one shape (``{"benchmark", "machine", ...}``)."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def _harness():
    """benchmarks/harness.py, imported under the name the scripts use."""
    if "harness" not in sys.modules:
        spec = importlib.util.spec_from_file_location("harness", BENCHMARKS / "harness.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["harness"] = module  # before running it: its dataclass looks itself up there
        spec.loader.exec_module(module)
    return sys.modules["harness"]


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in the file, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", [alias.name for alias in node.names]))
    return out


def test_root_is_defined_once_in_the_harness() -> None:
    def targets(node: ast.stmt) -> list[ast.expr]:
        if isinstance(node, ast.Assign):
            return node.targets
        return [node.target] if isinstance(node, ast.AnnAssign) else []

    defining = [
        p.name
        for p in SCRIPTS
        for node in ast.parse(p.read_text()).body
        if any(isinstance(t, ast.Name) and t.id == "ROOT" for t in targets(node))
    ]
    assert defining == ["harness.py"], defining


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_no_script_imports_tests_or_another_scripts_private_names(path: Path) -> None:
    siblings = {p.stem for p in SCRIPTS}
    for module, names in _imports(ast.parse(path.read_text())):
        top = module.split(".")[0]
        assert top not in ("tests", "rl_small", "faults", "conftest"), (
            f"{path.name} imports {module}: shared helpers live in raysys.testing"
        )
        if top in siblings:
            private = [n for n in names if n.startswith("_")]
            assert not private, (
                f"{path.name} imports private {private} from {module}.py: make them public there"
            )
    if path.name != "harness.py":
        assert "sys.path.insert" not in path.read_text(), f"{path.name}: the harness sets sys.path"


def test_a_result_has_the_benchmark_name_then_the_machine_block(tmp_path: Path) -> None:
    import numpy as np

    harness = _harness()
    path = harness.write_result(
        "demo", {"value": np.float32(0.5), "where": Path("a")}, tmp_path / "r" / "d.json"
    )
    result = json.loads(path.read_text())
    assert list(result)[:3] == ["benchmark", "machine", "value"]
    assert result["benchmark"] == "demo" and result["value"] == 0.5 and result["where"] == "a"
    machine = result["machine"]
    assert set(machine) == {
        "summary", "cpus", "cpu_model", "cpu_isa", "gpus", "arch", "platform", "python", "packages", "loadavg",
    }  # fmt: skip
    import torch

    assert machine["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert machine["summary"].startswith(f"{machine['cpus']} CPUs, ")
    with pytest.raises(ValueError, match="harness writes the 'machine' block"):
        harness.write_result("demo", {"machine": "2 CPUs"}, tmp_path / "x.json")
    with pytest.raises(ValueError, match="says benchmark 'other'"):
        harness.write_result("demo", {"benchmark": "other"}, tmp_path / "x.json")


def test_results_default_to_benchmarks_results_and_configs_are_recorded_from_the_root() -> None:
    harness = _harness()
    assert harness.result_path("rl_gain") == BENCHMARKS / "results" / "rl_gain.json"
    assert harness.display_path(BENCHMARKS.parent / "examples" / "drive.yaml") == "examples/drive.yaml"
    assert harness.display_path("/elsewhere/x.yaml") == "/elsewhere/x.yaml"


def test_a_cached_rl_result_trained_with_other_settings_is_refused(tmp_path: Path) -> None:
    _harness()
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from rl_common import check_cached, run_overrides
    finally:
        sys.path.remove(str(BENCHMARKS))
    from raysys.config_io import load_config, save_config

    overrides = run_overrides("sft/model", 1, "grpo_s1", str(tmp_path), ["learner.iterations=5"])
    cached = tmp_path / "grpo_s1.json"
    cached.write_text("{}")
    with pytest.raises(SystemExit, match=r"config\.yaml is missing"):
        check_cached(None, overrides, cached)
    cfg = load_config(None, overrides)
    save_config(cfg, cfg.run_dir / "config.yaml")
    check_cached(None, overrides, cached)  # the same settings: kept
    check_cached(None, [*overrides, "learner.iterations=9"], cached)  # how long it goes on may differ
    with pytest.raises(
        SystemExit, match=r"grpo_s1\.json was trained with other settings \(rollout\.jitter: 0\.0 -> 0\.4\)"
    ):
        check_cached(None, [*overrides, "rollout.jitter=0.4"], cached)


def test_a_cached_rl_result_is_scored_again_only_when_the_threshold_grid_changed(
    tmp_path, monkeypatch
) -> None:
    _harness()
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import rl_common
    finally:
        sys.path.remove(str(BENCHMARKS))
    from raysys.config_io import load_config, save_config

    calls = []

    def score_run(cfg, seed):
        calls.append((list(cfg.eval.thresholds), seed))
        return {"thresholds": [float(t) for t in cfg.eval.thresholds], "rl_oracle_threshold": 0.1}

    monkeypatch.setattr(rl_common, "score_run", score_run)
    overrides = rl_common.run_overrides("sft/model", 2, "grpo_s2", str(tmp_path), [])
    save_config(load_config(None, overrides), tmp_path / "grpo_s2" / "config.yaml")
    cached = tmp_path / "grpo_s2.json"
    cached.write_text(
        json.dumps({"seed": 2, "train_wall_s": 9.0, "rl_oracle_threshold": 0.2})
    )  # default grid
    assert rl_common.rescore_if_needed(None, overrides, cached)["rl_oracle_threshold"] == 0.2 and not calls
    wide = [*overrides, "eval.thresholds=[0.1,0.5,0.9]"]
    rl_common.check_cached(None, wide, cached)  # only the scoring reads the grid: no retraining needed
    result = rl_common.rescore_if_needed(None, wide, cached)
    assert calls == [([0.1, 0.5, 0.9], 2)] and result["rl_oracle_threshold"] == 0.1
    assert result["train_wall_s"] == 9.0 and json.loads(cached.read_text()) == result  # kept, then rewritten
    rl_common.rescore_if_needed(None, wide, cached)
    assert len(calls) == 1  # scored over that grid already
    at_threshold = [*overrides, "eval.select_metric=val/best_threshold_dice"]
    save_config(load_config(None, at_threshold), tmp_path / "grpo_s2" / "config.yaml")
    rl_common.check_cached(None, at_threshold, cached)
    with pytest.raises(SystemExit, match=r"other settings \(eval\.thresholds: "):  # it chose the checkpoint
        rl_common.check_cached(None, [*at_threshold, "eval.thresholds=[0.1,0.5,0.9]"], cached)
