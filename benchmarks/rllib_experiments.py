"""The two RLlib experiments on the tiny synthetic setup, 3 seeds each -> JSON.

    .venv/bin/python benchmarks/rllib_experiments.py --sft runs/sft_baseline_bench/sft/model \
        --reward-net runs/demo/reward_net/best_reward_net.pth

1. prompt-rl with the GT reward (trains the prompt-conditioned tiny segmenter first);
2. the GT-free variant: the same, with the learned reward net as the only training reward (evaluated with GT);
3. postproc-rl on the SFT model's probability maps.
Each runs the real CLI (timed); the held-out test numbers come from each run's results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS: list[int] = [0, 1, 2]


def _run(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "raysys", *args, "--out", str(out), "--seeds", *map(str, SEEDS)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stdout.write(proc.stdout[-2500:])
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    res = json.loads((out / "results.json").read_text())
    return {"command": " ".join(["raysys", *args]), "wall_s": round(wall, 1), "results": res}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="tiny SFT checkpoint (postproc-rl's segmenter)")
    parser.add_argument("--reward-net", required=True, help="reward net checkpoint (the GT-free variant)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rllib_experiments.json"))
    args = parser.parse_args()
    SEEDS[:] = args.seeds
    runs = ROOT / "runs" / "rllib_bench"
    common = [str(ROOT / "examples" / "tiny_synthetic.yaml"), f"run.output_dir={runs}"]
    reward_net = f"reward.reward_net={Path(args.reward_net).resolve()}"
    gt = _run(["prompt-rl", *common, reward_net], runs / "prompt_rl")
    segmenter = gt["results"]["segmenter"]
    learned = _run(["prompt-rl", *common, reward_net, "rllib.reward=learned", f"policy.checkpoint={segmenter}"],
                   runs / "prompt_rl_learned")  # fmt: skip
    post = _run(
        ["postproc-rl", *common, f"policy.checkpoint={Path(args.sft).resolve()}"], runs / "postproc_rl"
    )
    Path(args.out).write_text(json.dumps({"prompt_rl_gt": gt, "prompt_rl_learned": learned, "postproc_rl": post},
                                         indent=2, default=float) + "\n")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
