"""Suite-wide setup: markers follow the folder, GPU tests skip without CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_FOLDER_MARKERS = {
    "unit": "unit", "ray": "ray", "cluster": "cluster", "e2e": "e2e", "gpu": "gpu", "remote": "remote",
}  # fmt: skip

# Tests never attach to a user's cluster by accident.
os.environ.pop("RAY_ADDRESS", None)
# One intra-op thread per process (the test workers, the CLIs they start, their Ray workers inherit it): the
# suite runs one xdist worker per core, and torch's default of one thread per core oversubscribes them; its
# waiting threads spin, so a CLI's SFT or eval under a busy suite ran ~2x slower (measured 100 s -> 55 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules of tiny torch ops: with more threads than free cores (a shared CI
    machine) each op waits on the thread pool and runs 20-100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_FOLDER_ORDER = ("cluster", "e2e", "ray", "remote", "gpu", "unit")
"""Long folders first: with one xdist worker per core (``make test``: loadfile, files in this order), the
last minutes are many short unit files on both workers, not one long e2e file on one worker while the other
idles (measured: 50 s at the end of a run with one DeepSpeed test alone)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def folder_rank(item: pytest.Item) -> int:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        top = parts[0] if len(parts) > 1 else ""
        return _FOLDER_ORDER.index(top) if top in _FOLDER_ORDER else len(_FOLDER_ORDER)

    items.sort(key=folder_rank)  # stable: files and tests keep their order within a folder
    skip_gpu = None if _cuda_available() else pytest.mark.skip(reason="needs CUDA")
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        marker = _FOLDER_MARKERS.get(parts[0]) if len(parts) > 1 else None
        if marker:
            item.add_marker(getattr(pytest.mark, marker))
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
