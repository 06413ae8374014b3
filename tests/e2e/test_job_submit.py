"""The cluster path on one machine: a private head from `ray start --head` (free ports, 4 fake GPUs, Ray 2.60
token auth as it comes), jobs through cluster/submit.sh (= `ray job submit`), `ray job stop`, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from raysys.runtime import latest_iteration
from raysys.testing.rl_small import SMALL_RL, metric_rows

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = SMALL_RL


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start --head --block` on free ports; yields the environment a user's shell would have."""
    gcs, dashboard, agent, client = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv, as after `source .venv/bin/activate`
    log = tmp_path_factory.mktemp("head") / "ray_start.log"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", "--num-cpus=8",
         "--num-gpus=4", "--disable-usage-stats"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 without a token: the job server is up
            break
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                head.kill()
                pytest.fail(f"ray start --head did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield {**env, "RAY_ADDRESS": url}
    head.send_signal(signal.SIGTERM)  # --block: stops this head's processes only
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        # Its graceful shutdown waits on every worker for ~30 s; the head's session (its own process group,
        # start_new_session) holds nothing the tests still need.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


def _submit(env, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "cluster" / "submit.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def _ray(env, *args: str) -> subprocess.CompletedProcess:
    env = {**env, "RAY_AUTH_MODE": "token"}
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=120)


def _iterations(run_dir: Path) -> list[int]:
    return [row["iteration"] for row in metric_rows(run_dir / "metrics.jsonl")]


def test_submit_places_actors_and_learners_on_fake_gpus(cluster, tmp_path) -> None:
    proc = _submit(
        cluster, "--submission-id", "raysys-e2e-gpus", "--", "train", *TINY, "learner.iterations=2",
        f"run.output_dir={tmp_path}", "run.name=gpus", "rollout.gpus_per_worker=1", "learner.use_gpu=true",
        "learner.num_workers=2", "learner.dist_backend=gloo", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Job 'raysys-e2e-gpus' succeeded" in proc.stdout + proc.stderr
    run = tmp_path / "gpus"
    assert _iterations(run) == [0, 1]
    placed = json.loads((run / "placement.json").read_text())
    assert [p["resources"].get("GPU") for p in placed["rollout"]] == [1.0, 1.0]
    assert [p["resources"].get("GPU") for p in placed["learner"]] == [1.0, 1.0]
    assert [p["rank"] for p in placed["learner"]] == [0, 1]
    assert all("GPU" not in p["resources"] for p in placed["reward"])  # reward actors are CPU only
    gpu_ids = [g for role in ("rollout", "learner") for p in placed[role] for g in p["gpu_ids"]]
    assert sorted(gpu_ids) == ["0", "1", "2", "3"]  # 4 processes, 4 different GPUs


def test_asking_more_gpus_than_the_cluster_has_fails_fast(cluster, tmp_path) -> None:
    t0 = time.time()
    proc = _submit(cluster, "--submission-id", "raysys-e2e-toomany", "--", "train", *TINY,
                   f"run.output_dir={tmp_path}", "run.name=big", "rollout.gpus_per_worker=4", timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "Job 'raysys-e2e-toomany' failed" in out, out[-4000:]
    assert "the config needs 8 GPU" in out and "the Ray cluster has 4" in out
    assert time.time() - t0 < 120  # no hanging on pending placement


def _registered(experiment: Path) -> int:
    """Train's latest registered checkpoint, or -1; also -1 while the controller is rewriting its snapshot."""
    try:
        return latest_iteration(experiment)
    except ValueError:  # a half-written checkpoint_manager_snapshot.json
        return -1


def test_job_stop_leaves_a_resumable_checkpoint(cluster, tmp_path) -> None:
    # Asynchronous rollouts (rollout.max_staleness=1): a job of either mode stops and resumes.
    # 12 short iterations (about 0.7 s each with a checkpoint every one, one rollout actor): the stop below
    # lands mid-run, 3-5 iterations after the second.
    n = 12
    args = [*TINY, f"learner.iterations={n}", "learner.checkpoint_every=1", f"run.output_dir={tmp_path}",
            "run.name=stopme", "rollout.max_staleness=1", "eval.every=100", "rollout.num_workers=1",
            "--no-progress"]  # fmt: skip
    run = tmp_path / "stopme"
    started = _submit(cluster, "--no-wait", "--submission-id", "raysys-e2e-stop", "--", "train", *args)
    assert started.returncode == 0, started.stderr[-3000:]
    # Stop once 2 iterations are logged and Train has registered a checkpoint (its controller records one
    # shortly after the report; a job stopped before that has no checkpoint to resume from, only folders).
    deadline = time.time() + 300
    while len(_iterations(run)) < 2 or _registered(run / "ray" / "stopme") < 0:
        assert time.time() < deadline, _ray(cluster, "job", "logs", "raysys-e2e-stop").stdout[-3000:]
        time.sleep(0.5)
    stop = _ray(cluster, "job", "stop", "raysys-e2e-stop")
    assert stop.returncode == 0, stop.stderr
    status = _ray(cluster, "job", "status", "raysys-e2e-stop")
    assert "stopped" in (status.stdout + status.stderr).lower()
    assert list((run / "ray" / "stopme").glob("iter_*")), "no checkpoint survived the stop"
    assert len(_iterations(run)) < n
    # The latest checkpoint Train registered by now; the stopping job may still register one more.
    registered = latest_iteration(run / "ray" / "stopme") + 1
    assert registered >= 1

    resumed = _submit(cluster, "--submission-id", "raysys-e2e-resume", "--", "train", *args, "--resume")
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and "Job 'raysys-e2e-resume' succeeded" in out, out[-4000:]
    resumed_at = re.search(r"resuming run 'stopme' at iteration (\d+) ", out)
    assert resumed_at and registered <= int(resumed_at.group(1)) <= n - 1, out[-4000:]
    assert _iterations(run) == list(range(n))  # rows past the checkpoint were redone, none twice
    # One version behind, but for the first iteration of a run and of a resumed one.
    assert any(r.get("async/staleness_1") == 4 for r in metric_rows(run / "metrics.jsonl")[1:])
