"""A real small Tune sweep (examples/tune_reward_weights.yaml by default) -> JSON with its table and wall time.

    .venv/bin/python benchmarks/tune_sweep.py --sft runs/sft_baseline_bench/sft/model

Runs ``raysys tune`` (the real CLI, timed) in a fresh run folder, then copies the results table into
benchmarks/results/tune_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import harness
import pandas as pd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(harness.ROOT / "examples" / "tune_reward_weights.yaml"))
    parser.add_argument("--sft", required=True, help="tiny SFT checkpoint folder to start every trial from")
    parser.add_argument("--out", default=str(harness.result_path("tune_sweep")))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides")
    args = parser.parse_args()
    runs = harness.RUNS / "tune_bench"
    shutil.rmtree(runs, ignore_errors=True)
    argv = ["tune", args.config, f"run.output_dir={runs}", f"policy.checkpoint={Path(args.sft).resolve()}",
            *args.overrides]  # fmt: skip
    run = harness.run_cli(*argv, check=False)  # a failed sweep is recorded with its exit code
    sys.stdout.write(run.stdout[-4000:])
    tune_dir = next(runs.glob("*/tune"))
    table = pd.read_parquet(tune_dir / "results.parquet").drop(columns=["path"])
    result = {
        "command": run.command,
        "exit_code": run.returncode,
        "wall_s": round(run.wall_s, 1),
        "trials": json.loads(table.to_json(orient="records")),
        "best_config": (tune_dir / "best_config.yaml").read_text()
        if (tune_dir / "best_config.yaml").exists()
        else None,
    }
    harness.write_result("tune_sweep", result, args.out)
    print(f"wrote {args.out} (wall {run.wall_s:.0f}s, exit {run.returncode})")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
