"""Every config in examples/ loads, and the GPU / CPU arithmetic in the cluster examples' comments is what
the config really asks Ray for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raysys.config import load_config
from raysys.runtime import required_resources, role_resources

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
    # README and benchmarks/gpu_suite.sh: every role on one GPU, 2 rollout workers x 0.25 + the learner's 0.5.
    one_gpu = ["rollout.gpus_per_worker=0.25", "learner.use_gpu=true", "learner.gpus_per_worker=0.5"]
    cfg = load_config(EXAMPLES[0].parent / "tiny_synthetic.yaml", one_gpu)
    assert required_resources(cfg)["GPU"] == 1.0
    assert role_resources(cfg)["learner"][1]["GPU"] == 0.5
    suite = (EXAMPLES[0].parents[1] / "benchmarks/gpu_suite.sh").read_text()
    assert all(o in suite for o in one_gpu)
