"""Where a Ray actor or Train worker runs and what Ray reserved for it (written to runs/<name>/placement.json)."""

from __future__ import annotations

import os
from typing import Any


def placement() -> dict[str, Any]:
    """This process: pid, and under Ray its node (id, address, user labels), reserved resources and GPU ids."""
    info: dict[str, Any] = {"pid": os.getpid()}
    try:
        import ray
    except ImportError:
        return info
    if not ray.is_initialized():
        return info
    ctx = ray.get_runtime_context()
    info.update(
        node_id=ctx.get_node_id(),
        node_ip=ray.util.get_node_ip_address(),
        labels=user_labels(ctx.get_node_labels()),
    )
    if ctx.get_actor_id() is None:
        # The driver (an actor class built in-process, as tests do) has no reservation; Ray asserts if asked.
        return info
    info.update(
        resources={k: float(v) for k, v in ctx.get_assigned_resources().items()},
        gpu_ids=[str(g) for g in ray.get_gpu_ids()],
    )
    return info


def user_labels(labels: dict[str, str]) -> dict[str, str]:
    """A node's labels without the ones Ray sets itself (``ray.io/node-id`` and the like)."""
    return {k: v for k, v in labels.items() if not k.startswith("ray.io/")}
