"""Config overrides for a tiny, fast RL setup shared by the unit, Ray, DeepSpeed and e2e tests and
benchmarks/reliability.py, a reader of a run's metrics.jsonl, and a way to start a CLI process that Ctrl-C can
interrupt."""

import json
import signal
import subprocess
from pathlib import Path

SMALL_RL = [
    "data.size=64", "data.n_train=6", "data.n_val=2", "rollout.samples_per_image=4",
    "rollout.images_per_iteration=4", "learner.minibatch_size=2", "learner.epochs=1",
    "rollout.cpus_per_worker=0.25", "reward.cpus_per_actor=0.25", "learner.cpus_per_worker=0.25",
]  # fmt: skip
"""64x64 images, 6 training images, K=4, 4 images per iteration, fractional CPUs for one shared Ray."""

ONE_GPU = ["rollout.gpus_per_worker=0.25", "learner.use_gpu=true", "learner.gpus_per_worker=0.5"]
"""Every role on one GPU (README, benchmarks/gpu_suite.sh): 2 rollout workers x 0.25 + the learner's 0.5."""


NODE_ROLES = ("rollout", "rollout", "learner", "learner")
"""Worker nodes of a simulated cluster by label (``ray.cluster_utils.Cluster``, 2 CPUs and 2 fake GPUs each):
the 4-node example's two rollout nodes and two learner nodes, scaled down; the head (no GPU) hosts the driver,
the metrics sink and Train's controller."""
PLACED_ON_NODES = [
    "rollout.num_workers=2", "rollout.gpus_per_worker=1", "rollout.label_selector.role=rollout",
    "rollout.scheduling=spread", "reward.scheduling=spread", "learner.num_workers=2", "learner.use_gpu=true",
    "learner.dist_backend=gloo", "learner.label_selector.role=learner", "learner.placement=spread",
]  # fmt: skip
"""Placement on NODE_ROLES as examples/sa2va_4node_32gpu.yaml places its roles: one rollout actor and one
learner rank per labelled node."""


def metric_rows(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (none if the file does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def popen_interruptible(args: list[str]) -> subprocess.Popen:
    """Start ``args`` so that a later SIGINT acts as Ctrl-C in it. A non-interactive shell that runs the suite
    in the background (``make test &``) starts it with SIGINT ignored, every child inherits that, and a
    Python started with SIGINT ignored never raises KeyboardInterrupt: the child gets the default back."""
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
