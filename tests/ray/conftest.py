"""One private local Ray for the tests under tests/ray, stopped when a worker leaves the folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from raysys.runtime import LOCAL_RAY_ENV, local_raylet_env  # noqa: E402

HERE = Path(__file__).parent


def _start() -> None:
    os.environ.pop("RAY_ADDRESS", None)
    # Workers import actor classes defined in test modules by module name.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
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


@pytest.fixture
def ray_local():
    """The folder's Ray, started by its first test on this worker and kept until the worker leaves the folder."""
    if not ray.is_initialized():
        _start()
    return ray


@pytest.hookimpl(trylast=True)  # after the item's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    # Leaving the folder: stop its Ray, or the next folder's in-process CLIs (the fault matrix, the unit tests
    # of `raysys train`) would attach to it and skip what they test on a private local Ray.
    if ray.is_initialized() and (nextitem is None or HERE not in Path(str(nextitem.fspath)).parents):
        ray.shutdown()
