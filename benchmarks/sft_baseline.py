"""SFT baseline of the tiny policy: wall time, validation and held-out test metrics -> JSON.

    .venv/bin/python benchmarks/sft_baseline.py [CONFIG] [key=value ...] [--json PATH]

Runs the same code as ``raysys sft`` (defaults: examples/tiny_synthetic.yaml), then scores the best
checkpoint on the held-out test split at threshold 0.5 and at the best validation threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import harness
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="*", default=[str(harness.ROOT / "examples/tiny_synthetic.yaml")])
    parser.add_argument("--json", default=str(harness.result_path("sft_baseline")))
    args = parser.parse_args()

    from envs.datasets import load_dataset
    from policies.evaluation import evaluate
    from policies.sft import train_sft
    from policies.tiny import TinySa2VA
    from raysys.cli import _split_config_args
    from raysys.config_io import load_config, replace
    from raysys.data import dataset_for_split

    path, overrides = _split_config_args(args.config)
    cfg = load_config(path, overrides)
    cfg = replace(cfg, ["run.name=sft_baseline_bench"])
    t0 = time.perf_counter()
    train = list(dataset_for_split(cfg.data, "train", load=load_dataset))
    val = list(dataset_for_split(cfg.data, "val", load=load_dataset))
    test = list(dataset_for_split(cfg.data, "test", load=load_dataset))
    data_s = time.perf_counter() - t0
    torch.manual_seed(cfg.run.seed)
    model = TinySa2VA()
    res = train_sft(model, train, val, cfg.sft, out_dir=cfg.run_dir / "sft", seed=cfg.run.seed)
    model.eval()
    at_05 = evaluate(lambda im, pr: model(im, pr), test, threshold=0.5)
    at_best = evaluate(lambda im, pr: model(im, pr), test, threshold=res.val_best_threshold)
    machine = harness.machine()
    out = {
        "config": path,
        "overrides": overrides,
        "torch_threads": torch.get_num_threads(),
        "data_seconds": round(data_s, 2),
        "train_seconds": round(res.seconds, 2),
        "steps": res.steps,
        "best_step": res.best_step,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "val_at_0.5": res.val,
        "val_best_threshold": res.val_best_threshold,
        "test_at_0.5": at_05.mean,
        "test_at_val_best_threshold": at_best.mean,
        "checkpoint": res.checkpoint,
        # as first recorded; the result's "machine" block has the same
        "python": machine["python"],
        "platform": machine["platform"],
    }
    harness.write_result("sft_baseline", out, args.json, machine_block=machine)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
