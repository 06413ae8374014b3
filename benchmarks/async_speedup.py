"""Asynchronous rollouts against lock step: iterations per second, wall time to the same validation Dice and
held-out quality for ``rollout.max_staleness`` 0, 1, 2 -> JSON.

    .venv/bin/python benchmarks/async_speedup.py --sft runs/sft_baseline_bench/sft/model \\
        [--seeds 0 1 2] [--staleness 0 1 2] [--iterations 150] [key=value ...]

For each (seed, staleness): ``raysys train`` from the SFT checkpoint (the real CLI; the reward of raw masks,
``rl_common.FIRST_RECIPE``, as first measured). Times come from the run's
own ``time/iteration_s`` (start-up excluded, validations included, the same in every mode). "Time to the same
val Dice" is the training time until a run's validation Dice first comes within ``TOLERANCE`` of the best
validation Dice of the lock-step run of the same seed (its final one would do only for a monotone curve: RL's
validation Dice goes up and down, and a dip at the end is reached by any run at its first validation);
``speedup_to_same_val_dice`` is the lock-step time over the max_staleness 1 time, the mean over seeds with a
seed whose asynchronous run never gets there counted as 0; the validation curves are noisy (one lock-step run
peaking late makes its seed's ratio large), so ``..._median`` and ``..._per_seed`` come with it. Both the
best-validation checkpoint (what a user deploys) and the last one are scored on the test split at
``eval.threshold``: ``test_dice_delta`` = max_staleness 1 minus 0 for the best checkpoints, mean over seeds
(``test_dice_delta_last`` for the last ones).

``--cpu`` adds the reason for the ceiling on a small machine: seed 0, ``CPU_ITERATIONS`` iterations at
max_staleness 0 and 1 (and 1 with a one-thread learner), each with the machine's CPU busy share over its
training window (``/proc/stat``). Overlap can only fill idle cores, so lock step's busy share b bounds any
schedule's speed-up by 1/b (``overlap_speedup_bound``).

``--heavy`` adds a rollout-bound case (``rollout.samples_per_image=16``, 384-px images, from scratch, a few
iterations): the share of each iteration the learner waits for samples, lock step against one step off.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import harness
import numpy as np
import torch
from rl_common import FIRST_RECIPE, scores, train

from raysys import keys

TOLERANCE = 0.005
"""Validation Dice within this of the lock-step run's best counts as reaching it."""
CPU_ITERATIONS = 30
CPU_CASES = {"max_staleness_0": ["rollout.max_staleness=0"], "max_staleness_1": ["rollout.max_staleness=1"],
             "max_staleness_1_learner_1_thread": ["rollout.max_staleness=1", "learner.torch_threads=1"]}  # fmt: skip
HEAVY = ["rollout.samples_per_image=16", "data.size=384", "data.n_train=32", "data.n_val=4", "eval.every=100"]


class CpuMeter:
    """The machine's cumulative (busy, total) CPU jiffies from ``/proc/stat``, sampled twice a second."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), *self.read()))
            self._stop.wait(0.5)

    def __enter__(self) -> CpuMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def busy_share(self, start: float, end: float) -> float:
        """Busy share of all cores between the samples nearest ``start`` and ``end`` (wall-clock times)."""
        a = min(self.samples, key=lambda s: abs(s[0] - start))
        b = min(self.samples, key=lambda s: abs(s[0] - end))
        return (b[1] - a[1]) / max(b[2] - a[2], 1)


def train_metered(config: str, overrides: list[str]) -> dict:
    """``train`` with the machine's CPU busy share over the training iterations (start-up and shutdown
    excluded: the window ends when the last metrics row is written and spans the run's iteration time)."""
    if not Path("/proc/stat").is_file():
        raise SystemExit("--cpu reads /proc/stat (Linux)")
    with CpuMeter() as meter:
        run = train(config, overrides)
    out = summary(run.rows, run.wall_s)
    end = (run.cfg.run_dir / "metrics.jsonl").stat().st_mtime
    out["cpu_busy_share"] = meter.busy_share(end - out["train_s"], end)
    return out


def curve(rows: list[dict]) -> list[tuple[float, float]]:
    """(training seconds so far, val Dice) at every validation."""
    out, t = [], 0.0
    for r in rows:
        t += r[keys.TIME_ITERATION]
        if keys.VAL_DICE in r:
            out.append((t, r[keys.VAL_DICE]))
    return out


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, d in points if d >= target - 1e-9), None)


def test_scores(cfg, checkpoint: str) -> dict[str, float]:
    """The run's ``checkpoint`` ("best" or "latest") on the test split at ``eval.threshold``."""
    from envs.datasets import load_dataset
    from policies.evaluation import predict_probs
    from policies.factory import load_policy
    from raysys.data import dataset_for_split, inference_for

    pol = load_policy(cfg.policy, cfg.run_dir / "checkpoints" / checkpoint, seed=cfg.run.seed)
    test = list(dataset_for_split(cfg.data, "test", load=load_dataset))
    probs = predict_probs(lambda im, pr: pol.mask_logits(im, pr), test, inference_for(cfg))
    return scores(probs, test, cfg.eval.threshold)


def summary(rows: list[dict], wall: float) -> dict[str, float]:
    it_s = [r[keys.TIME_ITERATION] for r in rows]
    wait = [r.get(keys.TIME_ROLLOUT_WAIT, r[keys.TIME_ROLLOUT]) for r in rows]
    out = {
        "iterations": len(rows),
        "wall_s": round(wall, 1),
        "train_s": round(float(np.sum(it_s)), 1),
        # the rest of wall_s: start-up (Ray, actors, Train) before the first iteration, shutdown after the last
        "startup_s": rows[0].get(keys.TIME_STARTUP),
        "iterations_per_s": float(len(rows) / np.sum(it_s)),
        "rollout_wait_share": float(np.sum(wait) / np.sum(it_s)),
        "update_s_mean": float(np.mean([r[keys.TIME_UPDATE] for r in rows])),
        "batch_stale_total": float(sum(r.get(keys.STALE, 0.0) for r in rows)),
    }
    for k in (keys.STALENESS_MEAN, keys.IS_RATIO_MEAN, keys.IS_CLIPPED, keys.LOGPROB_MISMATCH):
        vals = [r[k] for r in rows if k in r]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="tiny SFT checkpoint every run starts from")
    parser.add_argument("--config", default=str(harness.ROOT / "examples/tiny_synthetic.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--heavy", action="store_true", help="also the rollout-bound case")
    parser.add_argument("--cpu", action="store_true", help="also the CPU busy share of lock step and async")
    parser.add_argument("--output-dir", default=str(harness.RUNS / "async_speedup"))
    parser.add_argument("--json", default=str(harness.result_path("async_speedup")))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    if 0 not in args.staleness:
        raise SystemExit("--staleness must include 0 (the lock-step reference)")
    torch.set_num_threads(2)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    runs: dict[int, dict[int, dict]] = {}
    for seed in args.seeds:
        for n in args.staleness:
            cached = out_dir / f"ms{n}_s{seed}.json"
            overrides = [
                f"policy.checkpoint={args.sft}", f"run.seed={seed}", f"run.name=ms{n}_s{seed}",
                f"run.output_dir={out_dir}", f"rollout.max_staleness={n}",
                f"learner.iterations={args.iterations}", *FIRST_RECIPE, *args.overrides,
            ]  # fmt: skip
            if not cached.is_file():
                run = train(args.config, overrides)
                result = {
                    **summary(run.rows, run.wall_s),
                    "curve": curve(run.rows),
                    "test": test_scores(run.cfg, "latest"),
                }
                cached.write_text(json.dumps(result))
            result = json.loads(cached.read_text())
            if "test_best" not in result:  # runs cached before the best checkpoint was scored too
                from raysys.config_io import load_config

                result["test_best"] = test_scores(load_config(args.config, overrides), "best")
                cached.write_text(json.dumps(result))
            runs.setdefault(n, {})[seed] = json.loads(cached.read_text())

    per_mode = {}
    for n, by_seed in runs.items():
        speedups, deltas, cl_deltas, reach = [], [], [], []
        last_deltas = []
        for seed, r in by_seed.items():
            ref = runs[0][seed]
            target = max(d for _, d in ref["curve"]) - TOLERANCE
            t_ref, t_n = time_to(ref["curve"], target), time_to(r["curve"], target)
            reach.append(t_n)
            speedups.append(None if t_n is None else t_ref / t_n)
            deltas.append(r["test_best"]["dice"] - ref["test_best"]["dice"])
            cl_deltas.append(r["test_best"]["cldice"] - ref["test_best"]["cldice"])
            last_deltas.append(r["test"]["dice"] - ref["test"]["dice"])
        got = [s for s in speedups if s is not None]
        per_mode[f"max_staleness_{n}"] = {
            "iterations_per_s": float(np.mean([r["iterations_per_s"] for r in by_seed.values()])),
            "iterations_per_s_std": float(np.std([r["iterations_per_s"] for r in by_seed.values()])),
            "rollout_wait_share": float(np.mean([r["rollout_wait_share"] for r in by_seed.values()])),
            # A seed whose run never gets there counts as no speed-up at all (0). One lock-step run that peaks
            # late (or early) swings the mean, hence the median beside it.
            "speedup_to_same_val_dice": float(np.mean([s or 0.0 for s in speedups])),
            "speedup_to_same_val_dice_median": float(np.median([s or 0.0 for s in speedups])),
            "speedup_to_same_val_dice_per_seed": speedups,
            "seeds_reaching_lock_step_val_dice": len(got),
            "time_to_lock_step_val_dice_s": reach,
            "test_dice": float(np.mean([r["test_best"]["dice"] for r in by_seed.values()])),
            "test_cldice": float(np.mean([r["test_best"]["cldice"] for r in by_seed.values()])),
            "test_dice_delta": float(np.mean(deltas)),
            "test_cldice_delta": float(np.mean(cl_deltas)),
            "test_dice_last": float(np.mean([r["test"]["dice"] for r in by_seed.values()])),
            "test_dice_delta_last": float(np.mean(last_deltas)),
            "per_seed": by_seed,
        }
    heavy = None
    if args.heavy:
        heavy = {}
        for n in (0, 1):
            cached = out_dir / f"heavy_ms{n}.json"
            if not cached.is_file():
                overrides = [f"run.name=heavy_ms{n}", f"run.output_dir={out_dir}", f"rollout.max_staleness={n}",
                             "learner.iterations=6", *FIRST_RECIPE, *HEAVY, *args.overrides]  # fmt: skip
                run = train(args.config, overrides)
                cached.write_text(json.dumps(summary(run.rows, run.wall_s)))
            heavy[f"max_staleness_{n}"] = json.loads(cached.read_text())
        heavy["speedup_iterations_per_s"] = (
            heavy["max_staleness_1"]["iterations_per_s"] / heavy["max_staleness_0"]["iterations_per_s"]
        )
        heavy["overrides"] = HEAVY
    cpu = None
    if args.cpu:
        cpu = {"seed": 0, "iterations": CPU_ITERATIONS}
        for name, case in CPU_CASES.items():
            cached = out_dir / f"cpu_{name}.json"
            if not cached.is_file():
                overrides = [f"policy.checkpoint={args.sft}", "run.seed=0", f"run.name=cpu_{name}",
                             f"run.output_dir={out_dir}", f"learner.iterations={CPU_ITERATIONS}",
                             *FIRST_RECIPE, *case, *args.overrides]  # fmt: skip
                cached.write_text(json.dumps(train_metered(args.config, overrides)))
            cpu[name] = {"overrides": case, **json.loads(cached.read_text())}
        lock = cpu["max_staleness_0"]
        cpu["overlap_speedup_bound"] = 1.0 / lock["cpu_busy_share"]
        for name in CPU_CASES:
            cpu[name]["iterations_per_s_ratio"] = cpu[name]["iterations_per_s"] / lock["iterations_per_s"]
    one = per_mode.get("max_staleness_1", {})
    result = {
        "config": harness.display_path(args.config),
        "overrides": args.overrides,
        "iterations": args.iterations,
        "seeds": args.seeds,
        "speedup_to_same_val_dice": one.get("speedup_to_same_val_dice"),
        "speedup_to_same_val_dice_median": one.get("speedup_to_same_val_dice_median"),
        "test_dice_delta": one.get("test_dice_delta"),
        "test_dice_delta_last": one.get("test_dice_delta_last"),
        "val_dice_tolerance": TOLERANCE,
        "iterations_per_s_ratio": (
            one["iterations_per_s"] / per_mode["max_staleness_0"]["iterations_per_s"] if one else None
        ),
        "modes": per_mode,
        "rollout_heavy": heavy,
        "cpu_bound": cpu,
    }
    harness.write_result("async_speedup", result, args.json)
    print(json.dumps({k: v for k, v in result.items() if k != "modes"}, indent=2))
    for name, m in per_mode.items():
        print(name, {k: v for k, v in m.items() if k != "per_seed"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
