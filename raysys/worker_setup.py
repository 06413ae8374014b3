"""Ray worker set-up hooks (``runtime_env.worker_process_setup_hook``). Every worker process of a run imports
this module before anything else, so it imports the standard library only: the config tree behind
``raysys.runtime`` pulls in SciPy and scikit-image (~0.7 CPU-s), which Train's controller, its helper actors
and the metrics sink never use."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys


def private_worker_setup() -> None:
    """Worker set-up hook of a private local Ray (and of a driver attaching from a shell)."""
    know_own_cluster()
    atomic_train_snapshots()


CHECKPOINT_MANAGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"


def atomic_train_snapshots() -> None:
    """Worker set-up hook: Ray Train writes its record of checkpoints (``checkpoint_manager_snapshot.json``,
    what a resume starts from) in place, so a full disk tears it and no resume can read it again. Written to
    a temporary file and moved over the old one, a failed write leaves the previous record, which names only
    checkpoints that still exist (Train deletes old checkpoints after writing the record).

    Only the process that imports Train's checkpoint manager (Train's controller) needs the change, so it is
    made when that import happens: importing Train in every worker (rollout, reward and metrics actors, Tune
    trials) would cost each about 1 CPU-s of start-up."""
    _when_imported(CHECKPOINT_MANAGER, _atomic_snapshot_writes)


SCALING_POLICY = "ray.train.v2._internal.execution.scaling_policy.scaling_policy"


def local_worker_setup() -> None:
    """Worker set-up hook of a private local Ray: ``private_worker_setup``, and Train's controller sends no
    resource requests for an autoscaler. One machine has no autoscaler to ask; each request would start
    Train's autoscaling-coordinator actor, which imports Ray Data (~2.5 CPU-s per run)."""
    private_worker_setup()
    _when_imported(SCALING_POLICY, _no_autoscaling_requests)


def _no_autoscaling_requests(scaling_policy) -> None:
    def skip(self) -> None:
        return None

    for name in ("_send_resource_request", "_maybe_send_resource_request", "_cancel_resource_request"):
        setattr(scaling_policy.ScalingPolicy, name, skip)


def _when_imported(name: str, then) -> None:
    """``then(module)`` now if ``name`` is imported, else right after its import; once per process."""
    module = sys.modules.get(name)
    if module is not None:
        then(module)
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))


class _AfterImport:
    """A post-import hook (a ``sys.meta_path`` finder): runs ``then(module)`` once ``name`` has been imported,
    then leaves ``sys.meta_path``."""

    def __init__(self, name: str, then) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run, then = spec.loader.exec_module, self.then

        def exec_module(module) -> None:
            run(module)
            then(module)

        spec.loader.exec_module = exec_module
        return spec


def _atomic_snapshot_writes(checkpoint_manager) -> None:
    manager = checkpoint_manager.CheckpointManager
    if getattr(manager._write_state_to_storage, "atomic", False):
        return

    def write_state_to_storage(self) -> None:
        storage = self._storage_context
        fs, path = storage.storage_filesystem, storage.checkpoint_manager_snapshot_path
        tmp = f"{path}.tmp"
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(self._save_state().encode("utf-8"))
            fs.move(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.delete_file(tmp)
            raise

    write_state_to_storage.atomic = True  # type: ignore[attr-defined]
    manager._write_state_to_storage = write_state_to_storage


def know_own_cluster() -> None:
    """Worker set-up hook of a private local Ray: RAY_ADDRESS names this cluster. Without it Ray's state API in
    the workers (Ray Train's placement-group cleaner) resolves the address from /tmp/ray/ray_current_cluster,
    the last `ray start` on the machine: a stale file costs a GCS time-out at every Train run's end, and a live
    other cluster tells the cleaner that this run's controller is dead, so it removes the run's workers."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
