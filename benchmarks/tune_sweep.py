"""A real small Tune sweep (examples/tune_reward_weights.yaml by default) -> JSON with its table and wall time.

    .venv/bin/python benchmarks/tune_sweep.py --sft runs/sft_baseline_bench/sft/model

Runs ``raysys tune`` (the real CLI, timed) in a fresh run folder, then copies the results table into
benchmarks/results/tune_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "tune_reward_weights.yaml"))
    parser.add_argument("--sft", required=True, help="tiny SFT checkpoint folder to start every trial from")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tune_sweep.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides")
    args = parser.parse_args()
    runs = ROOT / "runs" / "tune_bench"
    shutil.rmtree(runs, ignore_errors=True)
    cmd = [sys.executable, "-m", "raysys", "tune", args.config, f"run.output_dir={runs}",
           f"policy.checkpoint={Path(args.sft).resolve()}", *args.overrides]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stdout.write(proc.stdout[-4000:])
    tune_dir = next(runs.glob("*/tune"))
    table = pd.read_parquet(tune_dir / "results.parquet").drop(columns=["path"])
    result = {
        "command": " ".join(["raysys", *cmd[3:]]),
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "trials": json.loads(table.to_json(orient="records")),
        "best_config": (tune_dir / "best_config.yaml").read_text()
        if (tune_dir / "best_config.yaml").exists()
        else None,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} (wall {wall:.0f}s, exit {proc.returncode})")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
