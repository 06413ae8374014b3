"""Reliability: the fault matrix (every bad input through the CLI) and faults during real Ray training runs.

1. Every case of ``raysys/testing/faults/`` runs through ``raysys.cli.main`` in this process and is
   classified: ``clear`` (expected exit code and message), ``silent`` (exit 0 where an error was due, or an
   unclear message) or ``data_loss`` (a file that existed before the command changed or vanished).
2. Faults during ``raysys train`` (a small run in its own process): a rollout actor, the reward actor and the
   learner (Ray Train worker) are SIGKILLed mid-run, the driver is SIGKILLed, gets Ctrl-C (SIGINT) or SIGTERM
   (what `ray job stop` and schedulers send), the driver dies leaving half a metrics row behind, the run's disk
   fills up (a 64 MiB tmpfs), ``run.storage_path`` cannot be created, and a standalone ``raysys sft`` races a
   running pipeline of the same name. A run that stops is continued with the same command plus ``--resume``. On a simulated multi-node
   cluster (a head and four labelled worker nodes on this machine) the node hosting a rollout actor, then in a
   second run the node hosting a learner rank, is removed mid-run. A fault is survived when
   the run then completes and ``metrics.jsonl`` holds every iteration exactly once, in order. Two
   uninterrupted runs check that one config and seed give the same weights, and each fault run is compared
   with them.

    python benchmarks/reliability.py            # writes benchmarks/results/reliability.json (~15 min, 2 CPUs)
    python benchmarks/reliability.py --no-runs  # the matrix only (~15 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import harness

from raysys import keys
from raysys.testing.faults import CASES, World, classify, run_case
from raysys.testing.rl_small import NODE_ROLES, PLACED_ON_NODES, SMALL_RL, metric_rows

ITERATIONS = 8


def run_matrix() -> dict:
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        assets = Path(tmp) / "assets"
        assets.mkdir()
        for i, case in enumerate(CASES):
            t0 = time.perf_counter()
            outcome = run_case(case, World(Path(tmp) / f"case{i}", assets))
            rows.append(
                {
                    "id": case.id,
                    "category": case.category,
                    "verdict": classify(case, outcome),
                    "exit": outcome.code,
                    "expected_exit": case.code,
                    "changed": outcome.changed,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
    verdicts = Counter(r["verdict"] for r in rows)
    by_category: dict[str, Counter] = {}
    for r in rows:
        by_category.setdefault(r["category"], Counter())[r["verdict"]] += 1
    return {
        "cases": len(rows),
        "clear": verdicts["clear"],
        "silent": verdicts["silent"],
        "data_loss": verdicts["data_loss"],
        "by_category": {k: dict(v) for k, v in sorted(by_category.items())},
        "not_clear": [r for r in rows if r["verdict"] != "clear"],
        "seconds": round(sum(r["seconds"] for r in rows), 1),
    }


def _pids(session: int, title: str = "") -> list[int]:
    """PIDs of the processes in ``session`` (this run's) whose title starts with ``title`` (Ray names actor
    processes ray::<Class>)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    pids = []
    for line in out.splitlines():
        pid, sid, *args = line.strip().split(None, 2)
        if int(sid) == session and (args[0] if args else "").startswith(title):
            pids.append(int(pid))
    return pids


def _wait_for_rows(metrics: Path, n: int, proc: subprocess.Popen, timeout: float = 400) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if len(_iterations(metrics)) >= n:
            return True
        time.sleep(0.2)
    return False


def _tail(path: Path, n: int = 12) -> list[str]:
    lines = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and "Checkpoint successfully" not in line
    ]
    return [line[:300] for line in lines[-n:]]


FAULTS = {
    "rollout_actor_sigkill": ("ray::RolloutWorker", signal.SIGKILL),
    "reward_actor_sigkill": ("ray::RewardWorker", signal.SIGKILL),
    "learner_sigkill": ("ray::RayTrainWorker", signal.SIGKILL),
    "driver_sigkill": ("driver", signal.SIGKILL),
    "driver_ctrl_c": ("driver", signal.SIGINT),
    "driver_sigterm": ("driver", signal.SIGTERM),
    "torn_metrics_row": ("driver", signal.SIGKILL),
}


def _tear_metrics(run: Path) -> None:
    """What a crash in the middle of writing a row leaves behind: the first bytes of the next row."""
    metrics = run / "metrics.jsonl"
    intact = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            intact.append(json.loads(line)["iteration"])
    last = max(intact)
    with metrics.open("a") as f:
        f.write(json.dumps({"iteration": last + 1, keys.REWARD_MEAN: 0.5})[:24])


AFTER_STOP = {"torn_metrics_row": _tear_metrics}
"""Damage done to a run's folder after its process died, before ``--resume``."""


def _train_args(out: Path, name: str, base: Path, *extra: str) -> list[str]:
    """``raysys`` arguments of one small training run in ``out/name``."""
    return [
        "train", f"run.output_dir={out}", f"run.name={name}", *SMALL_RL, f"policy.checkpoint={base}",
        f"learner.iterations={ITERATIONS}", "learner.checkpoint_every=1", "eval.every=4", "run.num_cpus=4",
        *extra, "--no-progress",
    ]  # fmt: skip


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "latest" / "trainable.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def run_reference(out: Path, base: Path) -> dict:
    """Two uninterrupted runs of one config in two processes: same seed, same weights, bit for bit?"""
    t0 = time.perf_counter()
    for name in ("reference", "reference_again"):
        harness.run_cli(*_train_args(out, name, base), cwd=harness.ROOT, timeout=900)
    a, b = _weights(out / "reference"), _weights(out / "reference_again")
    rows = [metric_rows(out / n / "metrics.jsonl") for n in ("reference", "reference_again")]
    same_rewards = [r[keys.REWARD_MEAN] for r in rows[0]] == [r[keys.REWARD_MEAN] for r in rows[1]]
    return {
        "bitwise_identical_weights": all(a[k].equal(b[k]) for k in a) and a.keys() == b.keys(),
        "max_abs_weight_diff": max_abs_diff(a, b),
        "identical_reward_curves": same_rewards,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _base_model(path: Path) -> Path:
    """A tiny base model checkpoint (what SFT writes): RL from a checkpoint must be reproducible too."""
    from policies.checkpoint import save_base_model
    from policies.config import PolicyConfig
    from policies.factory import build_base_model

    return save_base_model(build_base_model(PolicyConfig(), seed=5), path)


def run_fault(name: str, out: Path, base: Path) -> dict:
    """One training run with one fault injected after 2 iterations, then ``--resume`` if it stopped."""
    title, sig = FAULTS[name]
    out.mkdir(parents=True)
    args = _train_args(out, name, base)
    t0 = time.perf_counter()
    log = (out / f"{name}.log").open("w")
    proc = subprocess.Popen(
        harness.cli_argv(*args),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=harness.ROOT,
    )
    metrics = out / name / "metrics.jsonl"
    injected, orphans = False, None
    if _wait_for_rows(metrics, 2, proc):
        targets = [proc.pid] if title == "driver" else _pids(proc.pid, title)[:1]
        for pid in targets:
            os.kill(pid, sig)
            injected = True
    first_rc = proc.wait(timeout=600)
    if title == "driver" and sig == signal.SIGKILL:
        time.sleep(10)  # Ray's own processes should notice their driver is gone
        orphans = len(_pids(proc.pid))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of this run's Ray
    if injected and name in AFTER_STOP:
        AFTER_STOP[name](out / name)
    resumed_rc = None
    if first_rc != 0:
        again = harness.run_cli(*args, "--resume", log=log, check=False, cwd=harness.ROOT, timeout=900)
        resumed_rc = again.returncode
    log.close()
    iterations = _iterations(metrics)
    retries = _retries(metrics, iterations)
    final_rc = resumed_rc if resumed_rc is not None else first_rc
    survived = (
        injected
        and final_rc == 0
        and iterations == list(range(ITERATIONS))
        and (out / name / "checkpoints" / "latest").is_dir()
    )
    reference = out.parent / "reference"  # run_reference's run, next to the fault runs
    has_reference = (reference / "checkpoints" / "latest").is_dir()
    diff = max_abs_diff(_weights(out / name), _weights(reference)) if survived and has_reference else None
    return {
        "fault": name,
        "injected": injected,
        "first_exit": first_rc,
        "resumed": resumed_rc is not None,
        "resume_exit": resumed_rc,
        "iterations_logged": iterations,
        "shard_retries": retries,
        "orphan_processes_after_10s": orphans,
        "survived": survived,
        "max_abs_weight_diff_vs_uninterrupted": diff,
        "seconds": round(time.perf_counter() - t0, 1),
        # Why the run stopped (or failed to come back): the log's last lines.
        "log_tail": None if survived and first_rc == 0 else _tail(out / f"{name}.log"),
    }


def _iterations(metrics: Path) -> list[int | None]:
    """The iteration of each row of a run's metrics.jsonl; None for a row that is not JSON (torn by a crash or
    a full disk), so a run left with one does not count as survived."""
    out: list[int | None] = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        if line.strip():
            try:
                out.append(json.loads(line)["iteration"])
            except (json.JSONDecodeError, KeyError):
                out.append(None)
    return out


def _retries(metrics: Path, iterations: list[int | None]) -> int | None:
    """Shard retries the run logged; None when a row is torn (``_iterations``), as then no total is known."""
    return sum(r.get("fault/retries", 0) for r in metric_rows(metrics)) if None not in iterations else None


def _outcome(name: str, t0: float, log: Path, **fields) -> dict:
    row = {"fault": name, **fields, "seconds": round(time.perf_counter() - t0, 1)}
    row["log_tail"] = None if fields.get("survived") else _tail(log)
    return row


def run_disk_full(out: Path, base: Path) -> dict:
    """The run folder on a 64 MiB tmpfs that fills up after 2 iterations (a filler file takes every free
    byte): the run must stop naming the full disk and advising --resume; with the space back, ``--resume``
    finishes it. Needs root for ``mount`` (else recorded as not injected)."""
    name, t0 = "disk_full_train", time.perf_counter()
    disk = out / "disk"
    disk.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True
    )
    log_path = out / f"{name}.log"
    if mounted.returncode != 0:
        log_path.write_text(mounted.stderr.decode())
        return _outcome(name, t0, log_path, injected=False, survived=False)
    try:
        args = _train_args(disk, name, base)
        with log_path.open("w") as log:
            proc = subprocess.Popen(harness.cli_argv(*args), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=harness.ROOT)  # fmt: skip
            injected = _wait_for_rows(disk / name / "metrics.jsonl", 2, proc)
            filler = disk / "filler.bin"
            if injected:
                with filler.open("wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * (1 << 20))
            first_rc = proc.wait(timeout=600)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            filler.unlink(missing_ok=True)
            said = log_path.read_text()
            named = "the disk is full" in said and "--resume" in said
            again = harness.run_cli(*args, "--resume", log=log, check=False, cwd=harness.ROOT, timeout=900)
        iterations = _iterations(disk / name / "metrics.jsonl")
        survived = (
            injected
            and first_rc == 1
            and named
            and again.returncode == 0
            and iterations == list(range(ITERATIONS))
        )
        diff = _diff_vs_reference(out, disk / name) if survived else None
        return _outcome(name, t0, log_path, injected=injected, first_exit=first_rc, cause_named=named,
                        resumed=True, resume_exit=again.returncode, iterations_logged=iterations,
                        survived=survived, max_abs_weight_diff_vs_uninterrupted=diff)  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def run_unreachable_storage(out: Path, base: Path) -> dict:
    """``run.storage_path`` under /proc (cannot be created): the run must stop before Ray, naming the key, in
    seconds; the same run with a reachable path then finishes."""
    name, t0 = "unreachable_storage", time.perf_counter()
    out.mkdir(parents=True)
    log_path = out / f"{name}.log"
    with log_path.open("w") as log:
        bad = harness.run_cli(*_train_args(out, name, base, "run.storage_path=/proc/raysys-ckpts"), log=log,
                              check=False, cwd=harness.ROOT, timeout=300)  # fmt: skip
        said = log_path.read_text()
        named = "run.storage_path=/proc/raysys-ckpts" in said and "Traceback" not in said
        good = harness.run_cli(
            *_train_args(out, name, base), log=log, check=False, cwd=harness.ROOT, timeout=900
        )
    iterations = _iterations(out / name / "metrics.jsonl")
    survived = (
        bad.returncode == 2 and named and good.returncode == 0 and iterations == list(range(ITERATIONS))
    )
    return _outcome(name, t0, log_path, injected=True, first_exit=bad.returncode, refused_in_s=round(bad.wall_s, 1),
                    cause_named=named, resumed=False, resume_exit=good.returncode, iterations_logged=iterations,
                    survived=survived,
                    max_abs_weight_diff_vs_uninterrupted=_diff_vs_reference(out, out / name) if survived else None)  # fmt: skip


PIPELINE = [*SMALL_RL, f"learner.iterations={ITERATIONS}", "learner.checkpoint_every=4", "eval.every=4",
            "run.num_cpus=4", "sft.steps=20", "sft.eval_every=10", "reward_net.epochs=1", "reward_net.n_train=8",
            "reward_net.n_val=4"]  # fmt: skip


def run_stage_racing_pipeline(out: Path, base: Path) -> dict:
    """A standalone ``raysys sft`` (plain and with --overwrite) under the name of a pipeline whose rl stage is
    running: both must be refused without touching the pipeline's SFT model; the pipeline finishes, and a
    rerun skips every stage (its recorded digests still match the files)."""
    name, t0 = "stage_racing_pipeline", time.perf_counter()
    out.mkdir(parents=True)
    log_path = out / f"{name}.log"
    common = [f"run.output_dir={out}", f"run.name={name}", *PIPELINE]
    run = out / name
    with log_path.open("w") as log:
        proc = subprocess.Popen(harness.cli_argv("pipeline", *common), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=harness.ROOT)  # fmt: skip
        deadline, injected = time.time() + 600, False
        while proc.poll() is None and time.time() < deadline and not injected:
            injected = (run / "rl.tmp").is_dir()
            time.sleep(0.2)
        refusals, untouched = [], False
        if injected:
            model = run / "sft" / "model" / "model.safetensors"
            before = model.read_bytes()
            for extra in ([], ["--overwrite"]):
                r = harness.run_cli("sft", *common, *extra, check=False, cwd=harness.ROOT, timeout=300)
                log.write(r.stdout + r.stderr)
                refusals.append(r.returncode == 2 and "in use by another raysys process" in r.stderr)
            untouched = model.read_bytes() == before
        first_rc = proc.wait(timeout=900)
        again = harness.run_cli("pipeline", *common, check=False, cwd=harness.ROOT, timeout=900)
        log.write(again.stdout + again.stderr)
    skipped = again.returncode == 0 and again.stdout.count("skipped (up to date)") == 7
    survived = injected and all(refusals) and len(refusals) == 2 and untouched and first_rc == 0 and skipped
    return _outcome(name, t0, log_path, injected=injected, first_exit=first_rc, standalone_refused=refusals,
                    sft_model_untouched=injected and untouched, rerun_all_skipped=skipped, resumed=False,
                    resume_exit=None, survived=survived)  # fmt: skip


def _diff_vs_reference(out: Path, run: Path) -> float | None:
    reference = out.parent / "reference"
    return (
        max_abs_diff(_weights(run), _weights(reference))
        if (reference / "checkpoints" / "latest").is_dir()
        else None
    )


SCENARIOS = {
    "disk_full_train": run_disk_full,
    "unreachable_storage": run_unreachable_storage,
    "stage_racing_pipeline": run_stage_racing_pipeline,
}
"""Faults that need their own set-up (a small disk, a bad key, a pipeline), one function each."""

NODE_FAULTS = ("rollout_node_loss", "learner_node_loss")


def run_node_faults(out: Path, base: Path, names: list[str]) -> list[dict]:
    """A head and four worker nodes (``ray.cluster_utils.Cluster``, 2 fake GPUs each). An uninterrupted run,
    then one run per fault that removes the node hosting rollout actor 0 or learner rank 0 after 2 iterations
    (the node comes back, empty, before the next run). Survived: the run finishes by itself with every
    iteration logged once; its weights are compared with the uninterrupted run's."""
    from ray.cluster_utils import Cluster

    # With its dashboard: Ray Train's placement-group cleaner asks the state API (tests/ray/conftest.py).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    nodes = {cluster.add_node(num_cpus=2, num_gpus=2, labels={"role": r}): r for r in NODE_ROLES}
    results = []
    try:

        def args(name: str) -> list[str]:
            return _train_args(out, name, base, *PLACED_ON_NODES, f"run.ray_address={cluster.address}")

        out.mkdir(parents=True, exist_ok=True)
        with (out / "node_reference.log").open("w") as log:
            ref = harness.run_cli(
                *args("node_reference"), log=log, check=False, cwd=harness.ROOT, timeout=900
            )
        if ref.returncode != 0:  # recorded as not survived, with the reason; the other results stay
            tail = _tail(out / "node_reference.log")
            return [{"fault": n, "injected": False, "survived": False, "log_tail": tail} for n in names]
        for name in names:
            role = name.split("_")[0]
            t0 = time.perf_counter()
            log = (out / f"{name}.log").open("w")
            proc = subprocess.Popen(
                harness.cli_argv(*args(name)), stdout=log, stderr=subprocess.STDOUT, cwd=harness.ROOT
            )
            metrics, injected = out / name / "metrics.jsonl", False
            if _wait_for_rows(metrics, 2, proc):
                node_id = json.loads((out / name / "placement.json").read_text())[role][0]["node_id"]
                victim = next(n for n in nodes if n.node_id == node_id)
                cluster.remove_node(victim)
                injected = True
            rc = proc.wait(timeout=900)
            log.close()
            if injected:  # the cluster back to full strength for the next fault
                label = nodes.pop(victim)
                nodes[cluster.add_node(num_cpus=2, num_gpus=2, labels={"role": label})] = label
            iterations = _iterations(metrics)
            survived = injected and rc == 0 and iterations == list(range(ITERATIONS))
            placement = out / name / "placement.json"
            placed = json.loads(placement.read_text()) if placement.is_file() else {}
            results.append(
                {
                    "fault": name,
                    "injected": injected,
                    "first_exit": rc,
                    "resumed": False,
                    "resume_exit": None,
                    "iterations_logged": iterations,
                    "shard_retries": _retries(metrics, iterations),
                    "actor_restarts": placed.get("restarts", []),
                    "survived": survived,
                    "max_abs_weight_diff_vs_uninterrupted": max_abs_diff(
                        _weights(out / name), _weights(out / "node_reference")
                    )
                    if survived
                    else None,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "log_tail": None if survived else _tail(out / f"{name}.log"),
                }
            )
            print(
                f"{name}: survived={survived} exit {rc} iterations {iterations} ({results[-1]['seconds']} s)"
            )
    finally:
        cluster.shutdown()
    return results


def _new_folder(path: Path) -> str:
    path.mkdir(parents=True)  # a folder that exists already is refused: never mixed with older runs
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-runs", action="store_true", help="the fault matrix only")
    every = [*FAULTS, *SCENARIOS, *NODE_FAULTS]
    ap.add_argument("--faults", nargs="+", choices=every, default=every)
    ap.add_argument("--no-reference", action="store_true", help="skip the two uninterrupted runs")
    ap.add_argument("--out", default=str(harness.result_path("reliability")))
    ap.add_argument(
        "--keep", type=Path, help="run the faults in this (new) folder and keep it, for post-mortems"
    )
    args = ap.parse_args()
    matrix = run_matrix()
    print(f"matrix: {matrix['cases']} cases, {matrix['clear']} clear, {matrix['silent']} silent, "
          f"{matrix['data_loss']} data loss ({matrix['seconds']} s)")  # fmt: skip
    faults, reference = [], None
    if not args.no_runs:
        with (
            contextlib.nullcontext(_new_folder(args.keep))
            if args.keep
            else tempfile.TemporaryDirectory() as tmp
        ):
            base = _base_model(Path(tmp) / "base")
            if not args.no_reference:
                reference = run_reference(Path(tmp), base)
                print(f"reference: {reference}")
            for i, name in enumerate(n for n in args.faults if n in FAULTS):
                res = run_fault(name, Path(tmp) / f"try{i}", base)
                print(f"{name}: survived={res['survived']} first exit {res['first_exit']} "
                      f"resume exit {res['resume_exit']} iterations {res['iterations_logged']} ({res['seconds']} s)")  # fmt: skip
                faults.append(res)
            for name in (n for n in args.faults if n in SCENARIOS):
                res = SCENARIOS[name](Path(tmp) / name, base)
                print(f"{name}: survived={res['survived']} ({res['seconds']} s)")
                faults.append(res)
            node_faults = [n for n in args.faults if n in NODE_FAULTS]
            if node_faults:
                faults += run_node_faults(Path(tmp) / "nodes", base, node_faults)
    result = {
        "cases": matrix["cases"],
        "clear": matrix["clear"],
        "silent": matrix["silent"],
        "data_loss": matrix["data_loss"],
        "faults_tried": len(faults),
        "faults_survived": sum(f["survived"] for f in faults),
        "reproducibility": reference,
        "matrix": matrix,
        "faults": faults,
        "run_iterations": ITERATIONS,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"wrote {harness.write_result('reliability', result, args.out)}")


if __name__ == "__main__":
    main()
