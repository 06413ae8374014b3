"""Every config in examples/ loads, and the GPU / CPU arithmetic in the cluster examples' comments is what
the config really asks Ray for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raysys.config_io import load_config
from raysys.runtime import LOCAL_RAY_ENV, PRIVATE_RAY_ENV, required_resources, role_resources
from raysys.testing.rl_small import ONE_GPU

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path: Path) -> None:
    assert load_config(path).run.name


@pytest.mark.parametrize("path", [p for p in EXAMPLES if "gpu" in p.name], ids=lambda p: p.name)
def test_gpu_arithmetic_in_comments_matches_the_config(path: Path) -> None:
    text = path.read_text()
    need = required_resources(load_config(path))
    total = re.search(r"total:.*?= (\d+) GPUs|= (\d+)\.?\s*$", text, re.MULTILINE)
    assert total, f"{path.name} does not state its GPU total"
    assert need["GPU"] == float(total.group(1) or total.group(2))
    cpus = re.search(r"^# CPUs: .*?= (\d+)", text, re.MULTILINE)
    if cpus:
        assert need["CPU"] == float(cpus.group(1))


def test_the_one_gpu_overrides_fit_one_gpu() -> None:
    cfg = load_config(EXAMPLES[0].parent / "tiny_synthetic.yaml", ONE_GPU)
    assert required_resources(cfg)["GPU"] == 1.0
    assert role_resources(cfg)["learner"][1]["GPU"] == 0.5
    root = EXAMPLES[0].parents[1]
    for doc in ("benchmarks/gpu_suite.sh", "README.md"):
        assert all(o in (root / doc).read_text() for o in ONE_GPU), doc


def test_jobs_poll_train_workers_as_often_as_a_private_ray() -> None:
    # The poll interval is stated twice: for a private Ray in code, for `ray job submit` in the job's env.
    import yaml

    job_env = yaml.safe_load((EXAMPLES[0].parents[1] / "cluster/runtime_env.yaml").read_text())["env_vars"]
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    assert job_env[key] == PRIVATE_RAY_ENV["env_vars"][key] == "0.5"


def test_jobs_and_private_rays_write_trains_checkpoint_record_atomically() -> None:
    import importlib

    import yaml

    job = yaml.safe_load((EXAMPLES[0].parents[1] / "cluster/runtime_env.yaml").read_text())
    for env in (job, PRIVATE_RAY_ENV, LOCAL_RAY_ENV):
        hook = env["worker_process_setup_hook"]
        module, name = hook.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name)), hook
    assert job["worker_process_setup_hook"] == "raysys.worker_setup.atomic_train_snapshots"
