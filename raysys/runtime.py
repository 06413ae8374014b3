"""Where runs run and write: Ray start-up and resource checks, absolute paths for actors, the run lock, and
Train's storage (a local folder, a shared path or an object-store URI through pyarrow's filesystems)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

from raysys.config import Config, ConfigError

log = logging.getLogger(__name__)

RAY_STORAGE = "ray"
TRAIN_POLL_S = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
"""How often Ray Train's controller polls its workers (Ray's default: 2 s). A report with a checkpoint waits
for the next poll, and the end of training is noticed only over several: with 2 s a two-iteration run ended
7.6 s after its last iteration (2.9 s with 0.5 s), and six iterations checkpointing each took 46.5 s of wall
time instead of 32.2 s."""
PRIVATE_RAY_ENV = {
    "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_POLL_S},
    "worker_process_setup_hook": "raysys.worker_setup.private_worker_setup",
}
"""Runtime environment of a driver attaching from a shell (see worker_setup.private_worker_setup); a private
local Ray adds to it (LOCAL_RAY_ENV). Jobs get theirs from cluster/runtime_env.yaml (its hook:
atomic_train_snapshots)."""
LOCAL_RAY_ENV = {
    "env_vars": {**PRIVATE_RAY_ENV["env_vars"], "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
    "worker_process_setup_hook": "raysys.worker_setup.local_worker_setup",
}
"""A private local Ray's runtime environment: one machine has no node to pre-empt and no autoscaler, and
Train's preemption watcher and autoscaling coordinator are one actor process each (~2-3 CPU-s of start-up)
per run and per restart (worker_setup.local_worker_setup)."""

LOCAL_RAYLET_ENV = {"RAY_prestart_worker_first_driver": "0"}
"""Environment of a private local Ray's own processes. Ray starts idle workers for the first driver that no
actor of a run takes (each still idle when a two-iteration run ended): ~1.3 CPU-s apiece per Ray start."""


@contextlib.contextmanager
def local_raylet_env() -> Iterator[None]:
    """LOCAL_RAYLET_ENV while a private local Ray starts (its raylet reads this process's environment); a
    value the user set wins, and the environment is restored after."""
    saved = {k: os.environ.get(k) for k in LOCAL_RAYLET_ENV}
    os.environ.update({k: v for k, v in LOCAL_RAYLET_ENV.items() if saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


class ResourceError(RuntimeError):
    """The cluster cannot host what the config asks for."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, a scheduler's pre-emption, `kill`): the same orderly stop as Ctrl-C."""


def stop_on_sigterm():
    """Turn SIGTERM into ``Terminated`` in this (main) thread; returns the handler it replaced (None off the
    main thread). ``ray.init`` installs its own handler (a bare ``sys.exit``), so this runs again after it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def init_ray(cfg: Config, *, copies: int = 1, extra_cpus: float = 0.0) -> bool:
    """Attach to ``run.ray_address`` / RAY_ADDRESS, or start a private local Ray sized for ``copies`` runs
    of ``cfg`` (Tune trials) plus ``extra_cpus`` each. Returns True if it started one."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a job the job's runtime env applies; a driver attaching from a shell brings its own (the
        # set-up hook too: several clusters on one machine, as in tests/cluster, share /tmp/ray).
        ray.init(address=address, runtime_env=None if _inside_job() else PRIVATE_RAY_ENV, log_to_driver=True)
        stop_on_sigterm()
        return False
    if not cfg.run.num_cpus:
        check_oversubscription(cfg, copies)
    # Room for the reward actors whether they run or not: that is decided on the running Ray (resolve_reward_device).
    needed = required_resources(cfg)["CPU"] + (
        0 if reward_actors(cfg) else cfg.reward.num_actors * cfg.reward.cpus_per_actor
    )
    num_cpus = cfg.run.num_cpus or max(4.0, (needed + extra_cpus) * copies + 1)
    with local_raylet_env():
        ray.init(
            address="local",
            num_cpus=int(num_cpus),
            num_gpus=cfg.run.num_gpus,
            runtime_env=LOCAL_RAY_ENV,
            log_to_driver=True,
        )
    stop_on_sigterm()
    return True


PROCESSES_PER_CORE = 4
"""Ray processes (actors, Train workers) per CPU core a private local Ray starts unasked: past it each gets a
sliver of a core, start-up alone takes minutes and the actors' time-outs fire with no progress made."""


def check_oversubscription(cfg: Config, copies: int = 1) -> None:
    """Refuse, before Ray starts, a private local Ray whose actors would swamp this machine."""
    cores = os.cpu_count() or 1
    counts = {
        "rollout.num_workers": cfg.rollout.num_workers,
        "reward.num_actors": cfg.reward.num_actors,
        "learner.num_workers": cfg.learner.num_workers,
    }
    processes = sum(counts.values()) * copies
    if processes > max(16, PROCESSES_PER_CORE * cores):
        shown = ", ".join(f"{k}={v}" for k, v in counts.items())
        per_trial = f" x {copies} concurrent trials" if copies > 1 else ""
        raise ConfigError(
            f"the config starts {processes} Ray actors and workers ({shown}{per_trial}) on this machine's {cores} "
            "CPU cores: each would get a sliver of a core and the run would stall. Lower those settings, attach to "
            "a cluster with run.ray_address, or set run.num_cpus to start this local Ray anyway"
        )


def _inside_job() -> bool:
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def reward_device(cfg: Config, *, cuda: bool = True) -> tuple[str, str]:
    """Where the GT reward is scored: ``"cuda"`` (each rollout actor on its GPU, no reward actors) or ``"cpu"``
    (the reward actors), and why not on the rollout GPUs when ``reward.device`` is not ``cpu``. ``cuda``:
    whether the rollout actors' GPUs are CUDA devices (not only logical Ray GPUs).

    The rollout actors score the GT reward only: the learned reward net (its scores on a GPU would not equal the
    CPU reward actors' bit for bit, and every rollout actor would load it) and ``reward.postprocess`` (scipy's
    morphology) stay with the reward actors."""
    rc = cfg.reward
    if rc.device == "cpu":
        return "cpu", ""
    if rc.source != "gt":
        return (
            "cpu",
            f"reward.source={rc.source} is scored by the reward actors (the learned reward net runs there)",
        )
    if rc.postprocess:
        return "cpu", "reward.postprocess is scored by the reward actors (its morphology is numpy and scipy)"
    if rc.device == "cuda":
        return "cuda", ""
    if cfg.rollout.gpus_per_worker <= 0:
        return "cpu", "the rollout actors have no GPU (rollout.gpus_per_worker=0)"
    if not cuda:
        return "cpu", "their GPUs are not CUDA devices (declared with run.num_gpus or `ray start --num-gpus`)"
    return "cuda", ""


def reward_actors(cfg: Config) -> int:
    """Reward actors to launch: none when the rollout actors score the reward (``reward_device``)."""
    return 0 if reward_device(cfg)[0] == "cuda" else cfg.reward.num_actors


def rollout_cuda(cfg: Config, *, private: bool) -> bool:
    """Whether the rollout actors' GPUs are CUDA devices. On a private local Ray (this machine): whether torch sees
    CUDA here. On a cluster: whether a node the rollout actors may use (``rollout.label_selector``) has GPUs of a
    type Ray detected; GPUs that ``ray start --num-gpus`` or ``run.num_gpus`` declare on a CPU machine (to rehearse
    placement) have none."""
    if private:
        import torch

        return torch.cuda.is_available()
    import ray

    return any(
        n.get("Alive")
        and n.get("Resources", {}).get("GPU", 0) > 0
        and labels_match(cfg.rollout.label_selector, n.get("Labels", {}))
        and (
            "ray.io/accelerator-type" in n.get("Labels", {})
            or any(k.startswith("accelerator_type:") for k in n.get("Resources", {}))
        )
        for n in ray.nodes()
    )


def resolve_reward_device(cfg: Config, *, private: bool) -> Config:
    """``cfg`` with ``reward.device`` decided (``cpu`` or ``cuda``, never ``auto``), once, by the driver on a
    running Ray (``private``: one it started on this machine), so that the reserved resources, the launched
    actors and every Tune trial agree; logs where the reward runs and why. ``reward.device=cuda`` without CUDA
    devices for the rollout actors (``rollout_cuda``) is an error."""
    from raysys.config_io import replace

    cuda = cfg.rollout.gpus_per_worker > 0 and rollout_cuda(cfg, private=private)
    device, why = reward_device(cfg, cuda=cuda)
    if device == "cuda" and not cuda:  # reward.device=cuda (auto would be cpu)
        raise ConfigError(
            "invalid value for 'reward.device': cuda, but the rollout actors' GPUs are not CUDA devices (GPUs that "
            "run.num_gpus or `ray start --num-gpus` declare on a CPU machine); use reward.device=auto or cpu"
        )
    if device == "cuda":
        log.info(
            "reward: the rollout actors score the GT reward on their GPUs (reward.device=%s)",
            cfg.reward.device,
        )
    elif why and (cfg.reward.device == "cuda" or cfg.rollout.gpus_per_worker > 0):
        (log.warning if cfg.reward.device == "cuda" else log.info)(
            "reward: scored by %d CPU reward actor(s), not on the rollout GPUs: %s",
            cfg.reward.num_actors,
            why,
        )
    return cfg if cfg.reward.device == device else replace(cfg, [f"reward.device={device}"])


def role_resources(cfg: Config) -> dict[str, tuple[dict[str, str], dict[str, float]]]:
    """Per role (rollout, reward, learner): its node-label selector and the logical CPUs and GPUs it reserves."""
    r, rw, lc = cfg.rollout, cfg.reward, cfg.learner
    return {
        "rollout": (r.label_selector, {"CPU": r.num_workers * r.cpus_per_worker, "GPU": r.num_workers * r.gpus_per_worker}),
        "reward": (rw.label_selector, {"CPU": reward_actors(cfg) * rw.cpus_per_actor, "GPU": 0.0}),
        "learner": (lc.label_selector, {"CPU": lc.num_workers * lc.cpus_per_worker, "GPU": lc.num_workers * lc.gpus_per_worker if lc.use_gpu else 0.0}),
    }  # fmt: skip


def required_resources(cfg: Config) -> dict[str, float]:
    """Logical CPUs and GPUs the actors and Train workers reserve."""
    needs = [need for _, need in role_resources(cfg).values()]
    return {key: sum(need[key] for need in needs) for key in ("CPU", "GPU")}


def check_resources(cfg: Config) -> None:
    """Fail fast (instead of pending forever) when the cluster has fewer resources than the config needs, in
    all or on the nodes a role's ``label_selector`` allows."""
    import ray

    have = ray.cluster_resources()
    need = required_resources(cfg)
    for key, amount in need.items():
        if amount > have.get(key, 0.0) + 1e-9:
            raise ResourceError(
                f"the config needs {amount:g} {key} (rollout.num_workers x gpus/cpus_per_worker + "
                f"reward.num_actors x cpus_per_actor + learner.num_workers x ...) but the Ray cluster has "
                f"{have.get(key, 0.0):g}; lower those settings or add nodes"
            )
    from raysys.placement import user_labels

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for role, (selector, role_need) in role_resources(cfg).items():
        if not selector:
            continue
        matching = [n for n in nodes if labels_match(selector, n.get("Labels", {}))]
        if not matching:
            seen = sorted({f"{k}={v}" for n in nodes for k, v in user_labels(n.get("Labels", {})).items()})
            raise ResourceError(
                f"{role}.label_selector {selector} matches no node of the Ray cluster (node labels: "
                f"{', '.join(seen) or 'none'}); start nodes with `ray start --labels ...` or change the selector"
            )
        for key, amount in role_need.items():
            there = sum(n.get("Resources", {}).get(key, 0.0) for n in matching)
            if amount > there + 1e-9:
                raise ResourceError(
                    f"{role}.label_selector {selector} matches {len(matching)} node(s) with {there:g} {key} in all, "
                    f"but the {role} role needs {amount:g}; label more nodes or lower the {role} settings"
                )


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a node with ``labels`` satisfies a Ray label selector (``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``)."""
    for key, want in selector.items():
        negate = want.startswith("!")
        want = want[1:] if negate else want
        allowed = [v.strip() for v in want[3:-1].split(",")] if want.startswith("in(") else [want]
        if (labels.get(key) in allowed) == negate:
            return False
    return True


PATH_KEYS = ("policy.checkpoint", "data.root", "reward.reward_net", "run.output_dir", "run.storage_path")


def absolute_paths(cfg: Config, base: str | os.PathLike[str] | None = None) -> Config:
    """Local paths in the config made absolute: actors and Train workers run in other working directories.

    Without ``base``, existing relative paths resolve against the working directory. With ``base`` (a Ray
    job's RAYSYS_BASE_DIR, the submitter's repository) every relative path resolves against it, existing or
    not: the job itself runs from an unpacked copy of the code."""
    from raysys.config_io import replace

    overrides = []
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not value or "://" in value or Path(value).is_absolute():
            continue
        if base is not None:
            overrides.append(f"{key}={Path(base) / value}")
        elif Path(value).exists():
            overrides.append(f"{key}={Path(value).resolve()}")
    return replace(cfg, overrides) if overrides else cfg


@contextlib.contextmanager
def run_lock(run_dir: Path, *, hint: str = "wait for it, or choose another run.name") -> Iterator[None]:
    """Hold ``<run dir>/.lock`` (an OS file lock, released if the process dies) for as long as a run writes
    there; a second run of the same name fails at once instead of interleaving with the first."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise FileExistsError(
                f"run directory {run_dir} is in use by another raysys process ({handle.read().strip()}); {hint}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def command_output(out: Path, run_dir: Path, *, overwrite: bool, what: str) -> Iterator[Path]:
    """The output folder of a standalone command (`raysys sft`, `reward-net`, `eval`, `export`, ...).

    A folder that already holds files is refused unless ``overwrite``; then it is moved aside and put back
    if the command fails, so an earlier result is lost only to a finished replacement. A failed command
    removes what it wrote (no empty or half-written folder a later stage could take for a result). When
    ``out`` lies inside ``run_dir`` the run's lock is held throughout, so nothing writes under a running
    pipeline or training run."""
    out = Path(out).expanduser().absolute()
    inside = out.is_relative_to(run_dir.absolute())
    lock = (
        run_lock(run_dir, hint="wait for it, or write elsewhere with --out")
        if inside
        else contextlib.nullcontext()
    )
    # The lock first: under a running pipeline "in use" is the answer, not advice to --overwrite.
    with lock:
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{what} output {out} is a file, not a folder; choose another --out")
        holds = out.is_dir() and any(out.iterdir())
        if holds and not overwrite:
            raise FileExistsError(
                f"{out} already holds a {what} result; pass --overwrite to replace it, or choose another "
                "--out or run.name (nothing there is changed)"
            )
        aside = out.with_name(f".{out.name}.replaced")
        if holds:
            if aside.exists():  # a replacement interrupted by a crash: that folder is the result to keep
                raise FileExistsError(
                    f"{aside} holds the result an interrupted --overwrite moved aside; move it back to {out} "
                    "or delete it, then run the command again"
                )
            out.rename(aside)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            yield out
        except BaseException:
            if created or holds:
                shutil.rmtree(out, ignore_errors=True)
            if holds:
                aside.rename(out)
                log.warning("%s failed: the earlier result in %s is kept", what, out)
            raise
        if holds:
            shutil.rmtree(aside)


def holds_results(run_dir: Path) -> bool:
    """True when a run directory has metrics or checkpoints of an earlier run (whatever its storage_path)."""
    metrics = run_dir / "metrics.jsonl"
    has_rows = metrics.is_file() and metrics.stat().st_size > 0
    checkpoints = run_dir / "checkpoints"
    return has_rows or (checkpoints.is_dir() and any(checkpoints.iterdir()))


def train_storage(cfg: Config) -> str:
    """Ray Train's storage_path: ``<run dir>/ray``, or ``<run.storage_path>/<run.name>`` (shared path or URI)."""
    if cfg.run.storage_path:
        base = cfg.run.storage_path.rstrip("/")
        if "://" not in base:
            base = str(Path(base).resolve())
        return f"{base}/{cfg.run.name}"
    return str(cfg.run_dir.resolve() / RAY_STORAGE)


ROOT_CAUSES: tuple[tuple[tuple[str, ...], str, str, bool], ...] = (
    (
        ("No space left on device", "[Errno 28]"),
        "the disk is full",
        "free space where the run writes ({where})",
        True,
    ),
    (
        ("OutOfMemoryError", "CUDA out of memory", "out of memory", "MemoryError"),
        "a process ran out of memory",
        "lower rollout.images_per_iteration, rollout.batch_size or learner.micro_batch_size, or use bigger nodes",
        True,
    ),
    (
        ("cannot be loaded as plain tensors",),
        "a checkpoint file was refused (raysys never unpickles)",
        "replace the file named above with one raysys wrote",
        False,
    ),
    (
        ("Permission denied", "[Errno 13]"),
        "a file could not be written (permission denied)",
        "make {where} writable, or choose another run.output_dir / run.storage_path",
        True,
    ),
)
"""(texts that identify a root cause in a failure raised inside Ray, the cause in plain words, the next step,
whether --resume can then continue)."""


def explain_failure(exc: BaseException, where: str) -> tuple[str, str, bool] | None:
    """The root cause of a failure inside Ray Train or an actor (Ray wraps it as WorkerGroupError,
    ActorDiedError, RayTaskError, whose text carries the original traceback): (cause, next step, whether
    ``--resume`` can help), or None when it is none of the known causes."""
    texts = []
    seen: BaseException | None = exc
    while seen is not None and len(texts) < 10:
        texts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(texts)
    for needles, cause, step, resumable in ROOT_CAUSES:
        if any(n in text for n in needles):
            return cause, step.format(where=where), resumable
    return None


def check_storage(cfg: Config) -> None:
    """Create Train's storage folder now, on the driver: one that cannot be created or written (a file in the
    way, no permission, an unreachable URI) otherwise surfaces ~40 s later as Ray Train's controller dying."""
    storage = train_storage(cfg)
    key = (
        f"run.storage_path={cfg.run.storage_path}"
        if cfg.run.storage_path
        else f"run.output_dir={cfg.run.output_dir}"
    )
    try:
        if "://" in storage:
            fs, path = _filesystem(storage)
            fs.create_dir(path, recursive=True)
        else:
            Path(storage).mkdir(parents=True, exist_ok=True)
            if not os.access(storage, os.W_OK):
                raise PermissionError(f"no permission to write {storage}")
    except FileExistsError:
        raise ConfigError(
            f"{key}: Ray Train's checkpoints go to {storage}, where a file is; choose another path"
        ) from None
    except Exception as exc:  # OSError, pyarrow's errors for URIs
        raise ConfigError(
            f"{key}: Ray Train's checkpoint storage {storage} cannot be created or written "
            f"({type(exc).__name__}: {str(exc)[:300]}); choose a path or URI every node can write"
        ) from None


def _filesystem(path: str):
    """(pyarrow filesystem, path in it) for a local path or a URI such as s3://bucket/prefix."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def storage_exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = _filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def latest_iteration(experiment: str | Path) -> int:
    """Iteration of the checkpoint Train resumes from: the latest one its snapshot registered (a folder can
    exist without being registered when the run stopped mid-report); -1 if none."""
    snapshot = f"{experiment}/checkpoint_manager_snapshot.json"
    if not storage_exists(snapshot):
        return -1
    fs, p = _filesystem(snapshot)
    with fs.open_input_stream(p) as f:
        raw = f.read().decode(errors="replace")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{snapshot}, Ray Train's record of this run's checkpoints, is not intact ({e}; a full disk or a "
            "crash while Ray wrote it, before this version wrote it atomically): the run cannot resume from it. "
            "Start a new run.name (the last checkpoint's weights are in the run's checkpoints/latest for raysys eval)"
        ) from None
    names = [r.get("checkpoint_dir_name", "") for r in data.get("checkpoint_results", [])]
    its = [int(n.split("_")[1]) for n in names if n.startswith("iter_") and n.split("_")[1].isdigit()]
    return max(its) if its else -1
