"""A multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``: a head and four worker nodes with
fake GPUs and node labels), placed like examples/sa2va_4node_32gpu.yaml scaled down, a worker node lost
mid-run (one hosting a rollout actor, then one hosting a learner rank), and checkpoints on an object store
(an S3 server emulated by moto on localhost) that a fresh driver resumes from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file

from raysys.testing.rl_small import NODE_ROLES as ROLES
from raysys.testing.rl_small import PLACED_ON_NODES, SMALL_RL, metric_rows

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(
    420
)  # time-boxed: a hung node-loss recovery fails here, not at the suite's 600 s

from raysys.config_io import load_config  # noqa: E402
from raysys.runtime import PRIVATE_RAY_ENV, ResourceError  # noqa: E402
from raysys.train import run_training  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "raysys-test"
PLACED = [*SMALL_RL, *PLACED_ON_NODES, "learner.iterations=5", "learner.checkpoint_every=1", "eval.every=100"]


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint; every process started after this (the nodes, their workers, a CLI driver) finds it
    through AWS_ENDPOINT_URL, as on a cluster whose nodes carry the object store's settings."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}  # fmt: skip
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield fs
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    # With its dashboard: Ray Train's placement-group cleaner asks the state API (tests/ray/conftest.py).
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    nodes = [c.add_node(num_cpus=2, num_gpus=2, labels={"role": role}) for role in ROLES]
    ray.init(address=c.address, runtime_env=PRIVATE_RAY_ENV, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """One undisturbed run, checkpoints in a shared folder (standing in for NFS)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = load_config(
        None,
        [*PLACED, f"run.output_dir={tmp / 'runs'}", f"run.storage_path={tmp / 'shared'}", "run.name=ref"],
    )
    return run_training(cfg, progress=False), tmp / "shared"


def _role_of(nodes, node_id: str) -> str:
    return next((ROLES[i] for i, n in enumerate(nodes) if n.node_id == node_id), "head")


def test_rollout_actors_and_learner_ranks_spread_over_their_labelled_nodes(cluster, reference) -> None:
    _, nodes = cluster
    result, shared = reference
    placed = json.loads((result.run_dir / "placement.json").read_text())
    rollout_nodes = [a["node_id"] for a in placed["rollout"]]
    learner_nodes = [r["node_id"] for r in placed["learner"]]
    assert [_role_of(nodes, n) for n in rollout_nodes] == ["rollout", "rollout"]
    assert [_role_of(nodes, n) for n in learner_nodes] == ["learner", "learner"]
    assert len(set(rollout_nodes)) == 2 and len(set(learner_nodes)) == 2  # spread: one per node
    assert all(a["labels"] == {"role": "rollout"} and a["resources"]["GPU"] == 1 for a in placed["rollout"])
    assert [r["rank"] for r in placed["learner"]] == [0, 1]
    assert [r["iteration"] for r in metric_rows(result.run_dir / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    # Train's checkpoints went to the shared folder, not to the run directory.
    experiment = shared / "ref" / "ref"
    assert sorted(p.name for p in experiment.glob("iter_*")) == [
        "iter_000003",
        "iter_000004",
    ]  # num_to_keep=2
    assert not (result.run_dir / "ray").exists()


def test_a_selector_no_node_matches_fails_before_anything_starts(cluster, tmp_path) -> None:
    cfg = load_config(None, [*PLACED, f"run.output_dir={tmp_path}", "rollout.label_selector.role=gpu-a100"])
    with pytest.raises(ResourceError, match=r"rollout.label_selector .*matches no node.*role=learner"):
        run_training(cfg, progress=False)
    cfg = load_config(None, [*PLACED, f"run.output_dir={tmp_path}", "run.name=big", "rollout.num_workers=5"])
    with pytest.raises(ResourceError, match=r"rollout.label_selector .*4 GPU in all.*needs 5"):
        run_training(cfg, progress=False)


def test_losing_a_rollout_node_then_a_learner_node_loses_nothing(cluster, reference, s3, tmp_path) -> None:
    """Iteration 0 logged: the node of rollout actor 0 goes (the actor restarts on the other rollout node and
    gets the current weights). Iteration 1 logged: the node of learner rank 0 goes (Train restarts both ranks
    on the remaining learner node from the latest checkpoint in S3). The run, 4 iterations, finishes by itself
    with every iteration logged once. A fresh driver process then resumes it from S3 to the reference run's 5
    iterations: the same reward curve and weights as the undisturbed run."""
    c, nodes = cluster
    overrides = [
        *PLACED,
        f"run.output_dir={tmp_path}",
        f"run.storage_path=s3://{BUCKET}/runs",
        "run.name=lossy",
    ]
    cfg = load_config(None, [*overrides, "learner.iterations=4"])
    removed: list[tuple[str, str]] = []
    done = threading.Event()

    def remove(role: str, after_rows: int) -> bool:
        while not done.is_set():
            if len(metric_rows(cfg.run_dir / "metrics.jsonl")) >= after_rows:
                placed = json.loads((cfg.run_dir / "placement.json").read_text())
                node_id = placed[role][0]["node_id"]
                c.remove_node(next(n for n in nodes if n.node_id == node_id))
                removed.append((role, node_id))
                return True
            time.sleep(0.05)
        return False

    thread = threading.Thread(target=lambda: remove("rollout", 1) and remove("learner", 2))
    thread.start()
    try:
        result = run_training(cfg, progress=False)
    finally:
        done.set()
        thread.join()
    assert [role for role, _ in removed] == ["rollout", "learner"], (
        "the run ended before both nodes were lost"
    )
    rows = metric_rows(result.run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    placed = json.loads((result.run_dir / "placement.json").read_text())
    moved = [r for r in placed["restarts"] if r["role"] == "rollout" and r["index"] == 0]
    assert (
        moved and moved[0]["node_id"] != removed[0][1] and _role_of(nodes, moved[0]["node_id"]) == "rollout"
    )
    assert placed["rollout"][0]["node_id"] == moved[-1]["node_id"]
    survivors = {r["node_id"] for r in placed["learner"]}
    assert removed[1][1] not in survivors and {_role_of(nodes, n) for n in survivors} == {"learner"}
    # A fresh driver (a new process, as after the head node itself was replaced) resumes from S3.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "raysys", "train", *overrides, f"run.ray_address={c.address}", "--resume",
         "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metric_rows(result.run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    # Nothing lost or duplicated by either node loss or the resume: the undisturbed run's curve and weights.
    ref_rows = metric_rows(reference[0].run_dir / "metrics.jsonl")
    for a, b in zip(rows, ref_rows, strict=True):
        assert a["rollout/reward_mean"] == pytest.approx(b["rollout/reward_mean"], rel=1e-5)
    _assert_same_weights(result.run_dir, reference[0].run_dir)
    listed = s3.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/lossy/lossy"))
    assert {"iter_000003", "iter_000004"} <= {Path(f.path).name for f in listed}


def _assert_same_weights(a: Path, b: Path) -> None:
    x = load_file(str(a / "checkpoints/latest/trainable.safetensors"))
    y = load_file(str(b / "checkpoints/latest/trainable.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6)
