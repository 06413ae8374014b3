"""Rollout -> reward collection and weight sync, over Ray actors or plain in-process objects.

Without reward actors (``reward.device: cuda``) each rollout actor scores its own shard (``sample_scored``): one
task per shard, and a failed one is a rollout actor failure.

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
    """Sum of the scoring time (reward actors', or the rollout actors' when they score their samples)."""
    retries: int = 0
    """Shards resubmitted after an actor failure."""
    wait_s: float = 0.0
    """How long the learner waited for the batch (less than ``rollout_s`` when sampling overlapped the
    previous update: asynchronous rollouts)."""

    def as_metrics(self) -> dict[str, float]:
        return {
            keys.TIME_ROLLOUT: self.rollout_s,
            keys.TIME_ROLLOUT_WAIT: self.wait_s,
            keys.TIME_SAMPLE: self.sample_s,
            keys.TIME_REWARD: self.reward_s,
            keys.RETRIES: float(self.retries),
        }


def state_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def shards(indices: Sequence[int], n: int) -> list[list[int]]:
    """Split ``indices`` into at most ``n`` contiguous non-empty shards."""
    return [s.tolist() for s in np.array_split(np.asarray(indices, dtype=int), n) if len(s)]


class LocalCoordinator:
    """Same interface without Ray: plain RolloutWorker/RewardWorker objects called in this process (no reward
    workers: the rollout workers score their samples)."""

    def __init__(self, rollout_workers: Sequence, reward_workers: Sequence) -> None:
        self.rollout, self.reward = list(rollout_workers), list(reward_workers)

    def push_weights(self, state_dict: dict[str, torch.Tensor], version: int, *, wait: bool = True) -> int:
        for w in self.rollout:
            w.set_weights(state_dict, version)
        return state_bytes(state_dict)

    def dispatch(self, indices: Sequence[int], *, iteration: int) -> tuple[list[ScoredRollout], CollectStats]:
        """Sample and score now, with the weights the workers hold now (as actors run tasks in order)."""
        t0 = time.perf_counter()
        out = []
        for j, shard in enumerate(shards(indices, len(self.rollout))):
            if not self.reward:
                out.append(self.rollout[j].sample_scored(shard, iteration=iteration))
                continue
            batch = self.rollout[j].sample(shard, iteration=iteration)
            out.append(self.reward[j % len(self.reward)].score(batch))
        stats = CollectStats(rollout_s=time.perf_counter() - t0)
        stats.wait_s = stats.rollout_s
        stats.sample_s = sum(s.batch.seconds for s in out)
        stats.reward_s = sum(s.seconds for s in out)
        return out, stats

    def gather(self, pending, *, version: int | None = None) -> tuple[list[ScoredRollout], CollectStats]:
        return pending

    def collect(
        self, indices: Sequence[int], *, iteration: int, version: int | None = None
    ) -> tuple[list[ScoredRollout], CollectStats]:
        return self.dispatch(indices, iteration=iteration)


class ActorTimeoutError(TimeoutError):
    """An actor did not answer within ``rollout.timeout_s``; the message names the actor and its task."""


def get_within(ref, timeout_s: float, what: str):
    """``ray.get(ref)``, or an :class:`ActorTimeoutError` naming ``what`` after ``timeout_s`` seconds."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise ActorTimeoutError(f"{what} did not answer within rollout.timeout_s={timeout_s:g}s") from exc


@dataclass
class PendingCollect:
    """Shards of one iteration submitted to the rollout and reward actors, not yet gathered."""

    iteration: int
    parts: list[list[int]]
    refs: dict[int, tuple]  # shard -> (sample ref, [(reward actor, score ref) per part of the shard])
    t0: float


class RayCoordinator:
    """Drives Ray actor handles of RolloutWorker and RewardWorker.

    Every wait on an actor is bounded by ``timeout_s`` (an :class:`ActorTimeoutError` names the actor and
    what it was doing). ``max_staleness`` >= 1 accepts shards sampled up to that many policy versions ago
    (they were submitted before the last weight syncs: see ``dispatch``).

    With more reward actors than rollout actors, each rollout shard is scored in ``ceil(reward / rollout)``
    parts by as many reward actors at once (the learner gets one ScoredRollout per part, in image order). Without
    reward actors the rollout actors score their own shards."""

    def __init__(
        self,
        rollout_handles: Sequence,
        reward_handles: Sequence,
        *,
        max_attempts: int = 3,
        timeout_s: float = 600.0,
        max_staleness: int = 0,
        weights_source=None,
        on_push=None,
    ) -> None:
        self.rollout, self.reward = list(rollout_handles), list(reward_handles)
        self.max_attempts, self.timeout_s, self.max_staleness = max_attempts, timeout_s, max_staleness
        self._weights = None  # (ObjectRef, version) of the latest push; re-sent to restarted actors
        self.weights_source = weights_source
        """For a coordinator that does not push (learner ranks > 0): returns the latest push's (ObjectRef,
        version), or None, so it can re-sync an actor it finds restarted instead of waiting for rank 0."""
        self.on_push = on_push
        """Called with (ObjectRef, version) after every push (rank 0 publishes its pushes for the others)."""
        self._syncs: list[tuple[int, int, object]] = []  # (actor, version, ref) of unconfirmed weight loads
        self.restarted: list[dict] = []
        """Actors found restarted (role, index and their new placement), for placement.json; the caller
        empties it."""

    def _get(self, ref, what: str):
        return get_within(ref, self.timeout_s, what)

    def push_weights(self, state_dict: dict[str, torch.Tensor], version: int, *, wait: bool = True) -> int:
        """Send the weights to every rollout actor. ``wait=False`` (asynchronous rollouts) returns at once: an
        actor runs its tasks in order, so samples submitted later use these weights, and the loads are
        confirmed (or their actors recovered) at the next ``gather``."""
        import ray

        ref = ray.put(state_dict)  # one copy in the object store, read by every worker
        self._weights = (ref, version)
        if self.on_push is not None:
            self.on_push(ref, version)
        self._syncs += [(j, version, w.set_weights.remote(ref, version)) for j, w in enumerate(self.rollout)]
        if wait:
            self._confirm_syncs()
        return state_bytes(state_dict)

    def _confirm_syncs(self) -> None:
        import ray

        syncs, self._syncs = self._syncs, []
        for j, version, done in syncs:
            try:
                self._get(done, f"rollout actor {j} (loading weights version {version})")
            except ray.exceptions.RayActorError:  # died before or while loading: restarted, sent again
                log.warning("rollout actor %d died while receiving weights version %d; retrying", j, version)
                self._recover(self.rollout[j], role="rollout", index=j)

    def _recover(self, handle, *, role: str, index: int) -> None:
        """Wait until a restarted actor answers (possibly on another node: its own was lost); give a rollout
        actor the current weights again."""
        import ray

        name = f"{role} actor {index}"
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                answer = ray.get(handle.ready.remote(), timeout=min(60.0, self.timeout_s))
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ActorTimeoutError(
                        f"{name} (restarting after a failure) did not answer within "
                        f"rollout.timeout_s={self.timeout_s:g}s"
                    ) from exc
                time.sleep(1.0)
        self.restarted.append({"role": role, "index": index, **answer})
        weights = self._weights or (self.weights_source() if self.weights_source is not None else None)
        if role == "rollout" and weights is not None:
            self._get(handle.set_weights.remote(*weights), f"{name} (loading weights after a restart)")

    def _submit(self, j: int, shard: list[int], iteration: int) -> tuple:
        if not self.reward:  # the rollout actor scores its samples: one ref, "scored" by no reward actor
            ref = self.rollout[j].sample_scored.remote(shard, iteration=iteration)
            return ref, [(None, ref)]
        sample_ref = self.rollout[j].sample.remote(shard, iteration=iteration)
        per_shard = -(-len(self.reward) // len(self.rollout))
        n = min(per_shard, len(shard))
        actors = [(j * per_shard + p) % len(self.reward) for p in range(n)]
        return sample_ref, [
            (r, self.reward[r].score.remote(sample_ref, None if n == 1 else (p, n)))
            for p, r in enumerate(actors)
        ]

    def dispatch(self, indices: Sequence[int], *, iteration: int) -> PendingCollect:
        """Submit the sampling and scoring of ``indices`` and return at once (``gather`` waits for them)."""
        parts = shards(indices, len(self.rollout))
        refs = {j: self._submit(j, part, iteration) for j, part in enumerate(parts)}
        return PendingCollect(iteration, parts, refs, time.perf_counter())

    def collect(
        self, indices: Sequence[int], *, iteration: int, version: int | None = None
    ) -> tuple[list[ScoredRollout], CollectStats]:
        """Sample and score ``indices``. ``version``: the policy version the shards must come from (every
        learner rank passes its own; only rank 0 pushes weights, so only its coordinator knows by itself)."""
        return self.gather(self.dispatch(indices, iteration=iteration), version=version)

    def gather(
        self, pending: PendingCollect, *, version: int | None = None
    ) -> tuple[list[ScoredRollout], CollectStats]:
        """Wait for a dispatched iteration; resubmit the shards of failed actors (restarted and given the
        current weights first) and of versions more than ``max_staleness`` behind ``version``."""
        import ray

        t_wait = time.perf_counter()
        self._confirm_syncs()
        stats = CollectStats()
        it, parts = pending.iteration, pending.parts
        results: dict[int, list[ScoredRollout]] = {}
        attempts = dict.fromkeys(range(len(parts)), 0)
        refs = dict(pending.refs)
        while len(results) < len(parts):
            for j, (sample_ref, score_refs) in refs.items():
                try:
                    scored_parts = []
                    for reward_j, score_ref in score_refs:  # the failing part names its actor below
                        try:
                            scored_parts.append(ray.get(score_ref, timeout=self.timeout_s))
                        except ray.exceptions.GetTimeoutError as exc:
                            sampled = reward_j is not None and bool(ray.wait([sample_ref], timeout=0)[0])
                            what = (
                                f"reward actor {reward_j} (scoring shard {j} of iteration {it})"
                                if sampled
                                else f"rollout actor {j} (sampling {len(parts[j])} images of iteration {it}"
                                + (" and scoring them)" if reward_j is None else ")")
                            )
                            raise ActorTimeoutError(
                                f"{what} did not answer within rollout.timeout_s={self.timeout_s:g}s"
                            ) from exc
                    expected = version if version is not None else self._weights[1] if self._weights else 0
                    sampled_at = scored_parts[0].batch.version
                    if not 0 <= expected - sampled_at <= self.max_staleness:
                        # A restarted actor that has not been given the current weights yet.
                        raise _StaleVersion(
                            f"shard sampled at version {sampled_at}, expected {expected}"
                            + (f" (at most {self.max_staleness} behind)" if self.max_staleness else "")
                        )
                    results[j] = scored_parts
                except (ray.exceptions.RayError, _StaleVersion) as exc:
                    attempts[j] += 1
                    if attempts[j] >= self.max_attempts:
                        raise RuntimeError(
                            f"iteration {it}: shard {j} failed {attempts[j]} times; last error: {exc}"
                        ) from exc
                    stats.retries += 1
                    rollout_failed = isinstance(exc, _StaleVersion) or reward_j is None or _failed(sample_ref)
                    log.warning(
                        "iteration %d: %s actor failed on shard %d (%s); retrying",
                        it,
                        "rollout" if rollout_failed else "reward",
                        j,
                        type(exc).__name__,
                    )
                    if rollout_failed:
                        self._recover(self.rollout[j], role="rollout", index=j)
                    else:
                        self._recover(self.reward[reward_j], role="reward", index=reward_j)
            refs = {j: self._submit(j, parts[j], it) for j in range(len(parts)) if j not in results}
        out = [s for j in range(len(parts)) for s in results[j]]
        stats.rollout_s = time.perf_counter() - pending.t0
        stats.wait_s = time.perf_counter() - t_wait
        stats.sample_s = sum(results[j][0].batch.seconds for j in results)  # the parts share one sampling
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
