"""One private local Ray for all tests under tests/ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from raysys.runtime import LOCAL_RAY_ENV, local_raylet_env  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    os.environ.pop("RAY_ADDRESS", None)
    # Workers import actor classes defined in test modules by module name.
    here = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    # Logical CPUs above the 2 physical cores: actors and Train workers ask for fractions or whole CPUs.
    with local_raylet_env():
        ray.init(
            address="local",
            num_cpus=8,
            object_store_memory=200 * 1024 * 1024,
            # The dashboard stays on, as in a user's private Ray: without it Ray still records 127.0.0.1:8265
            # as the state API's address, so Ray Train's placement-group cleaner asks whichever other cluster
            # owns that port (a parallel test's) whether this run's controller is alive: ~12 s per run.
            log_to_driver=False,
            runtime_env=LOCAL_RAY_ENV,
        )
    yield ray
    ray.shutdown()
