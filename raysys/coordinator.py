"""Rollout -> reward collection and weight sync, over Ray actors or plain in-process objects.

``RayCoordinator`` is fault tolerant: a rollout (or reward) actor that dies mid-iteration is restarted by
Ray (``max_restarts``), given the current weights again, and its shard is resubmitted. Samples are seeded
by (seed, iteration, image), so the retried shard yields exactly the masks the dead actor would have
produced: nothing is lost or duplicated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from raysys import keys
from raysys.batches import ScoredRollout

log = logging.getLogger(__name__)


@dataclass
class CollectStats:
    rollout_s: float = 0.0
    """Wall time of the collection (sampling and scoring overlap across actors)."""
    sample_s: float = 0.0
    """Sum of rollout workers' sampling time."""
    reward_s: float = 0.0
    """Sum of reward workers' scoring time."""
    retries: int = 0
    """Shards resubmitted after an actor failure."""

    def as_metrics(self) -> dict[str, float]:
        return {
            keys.TIME_ROLLOUT: self.rollout_s,
            keys.TIME_SAMPLE: self.sample_s,
            keys.TIME_REWARD: self.reward_s,
            "fault/retries": float(self.retries),
        }


def state_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def shards(indices: Sequence[int], n: int) -> list[list[int]]:
    """Split ``indices`` into at most ``n`` contiguous non-empty shards."""
    return [s.tolist() for s in np.array_split(np.asarray(indices, dtype=int), n) if len(s)]


class LocalCoordinator:
    """Same interface without Ray: plain RolloutWorker/RewardWorker objects called in this process."""

    def __init__(self, rollout_workers: Sequence, reward_workers: Sequence) -> None:
        self.rollout, self.reward = list(rollout_workers), list(reward_workers)

    def push_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        for w in self.rollout:
            w.set_weights(state_dict, version)
        return state_bytes(state_dict)

    def collect(self, indices: Sequence[int], *, iteration: int) -> tuple[list[ScoredRollout], CollectStats]:
        t0 = time.perf_counter()
        out = []
        for j, shard in enumerate(shards(indices, len(self.rollout))):
            batch = self.rollout[j].sample(shard, iteration=iteration)
            out.append(self.reward[j % len(self.reward)].score(batch))
        stats = CollectStats(rollout_s=time.perf_counter() - t0)
        stats.sample_s = sum(s.batch.seconds for s in out)
        stats.reward_s = sum(s.seconds for s in out)
        return out, stats


class RayCoordinator:
    """Drives Ray actor handles of RolloutWorker and RewardWorker."""

    def __init__(self, rollout_handles: Sequence, reward_handles: Sequence, *, max_attempts: int = 3) -> None:
        self.rollout, self.reward = list(rollout_handles), list(reward_handles)
        self.max_attempts = max_attempts
        self._weights = None  # (ObjectRef, version) of the latest push; re-sent to restarted actors

    def push_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        import ray

        ref = ray.put(state_dict)  # one copy in the object store, read by every worker
        self._weights = (ref, version)
        pending = [(w, w.set_weights.remote(ref, version)) for w in self.rollout]
        for w, done in pending:
            try:
                ray.get(done)
            except ray.exceptions.RayActorError:  # died before or while loading: restarted, sent again
                log.warning("a rollout actor died while receiving weights version %d; retrying", version)
                self._recover(w, rollout=True)
        return state_bytes(state_dict)

    def _recover(self, handle, *, rollout: bool) -> None:
        """Wait until a restarted actor answers; give a rollout actor the current weights again."""
        import ray

        deadline = time.monotonic() + 300
        while True:
            try:
                ray.get(handle.ready.remote(), timeout=60)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        if rollout and self._weights is not None:
            ray.get(handle.set_weights.remote(*self._weights))

    def collect(
        self, indices: Sequence[int], *, iteration: int, version: int | None = None
    ) -> tuple[list[ScoredRollout], CollectStats]:
        """Sample and score ``indices``. ``version``: the policy version the shards must come from (every
        learner rank passes its own; only rank 0 pushes weights, so only its coordinator knows by itself)."""
        import ray

        t0 = time.perf_counter()
        stats = CollectStats()
        parts = shards(indices, len(self.rollout))
        results: dict[int, ScoredRollout] = {}
        attempts = dict.fromkeys(range(len(parts)), 0)
        while len(results) < len(parts):
            pending = {}
            for j in (j for j in range(len(parts)) if j not in results):
                w, r = self.rollout[j], self.reward[j % len(self.reward)]
                sample_ref = w.sample.remote(parts[j], iteration=iteration)
                pending[j] = (sample_ref, r.score.remote(sample_ref))
            for j, (sample_ref, score_ref) in pending.items():
                try:
                    scored = ray.get(score_ref)
                    expected = version if version is not None else self._weights[1] if self._weights else 0
                    if scored.batch.version != expected:
                        # A restarted actor that has not been given the current weights yet.
                        raise _StaleVersion(
                            f"shard sampled at version {scored.batch.version}, expected {expected}"
                        )
                    results[j] = scored
                except (ray.exceptions.RayError, _StaleVersion) as exc:
                    attempts[j] += 1
                    if attempts[j] >= self.max_attempts:
                        raise RuntimeError(
                            f"iteration {iteration}: shard {j} failed {attempts[j]} times; last error: {exc}"
                        ) from exc
                    stats.retries += 1
                    rollout_failed = isinstance(exc, _StaleVersion) or _failed(sample_ref)
                    log.warning(
                        "iteration %d: %s actor failed on shard %d (%s); retrying",
                        iteration,
                        "rollout" if rollout_failed else "reward",
                        j,
                        type(exc).__name__,
                    )
                    if rollout_failed:
                        self._recover(self.rollout[j], rollout=True)
                    else:
                        self._recover(self.reward[j % len(self.reward)], rollout=False)
        out = [results[j] for j in range(len(parts))]
        stats.rollout_s = time.perf_counter() - t0
        stats.sample_s = sum(s.batch.seconds for s in out)
        stats.reward_s = sum(s.seconds for s in out)
        return out, stats


class _StaleVersion(RuntimeError):
    pass


def _failed(ref) -> bool:
    import ray

    try:
        ray.get(ref, timeout=0)
        return False
    except ray.exceptions.GetTimeoutError:
        return False
    except ray.exceptions.RayError:
        return True
