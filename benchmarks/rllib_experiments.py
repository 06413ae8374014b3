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
import sys
from pathlib import Path

import harness

SEEDS: list[int] = [0, 1, 2]


def _run(args: list[str], out: Path) -> dict:
    run = harness.run_cli(*args, "--out", str(out), "--seeds", *map(str, SEEDS))
    sys.stdout.write(run.stdout[-2500:])
    res = json.loads((out / "results.json").read_text())
    return {"command": " ".join(["raysys", *args]), "wall_s": round(run.wall_s, 1), "results": res}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="tiny SFT checkpoint (postproc-rl's segmenter)")
    parser.add_argument("--reward-net", required=True, help="reward net checkpoint (the GT-free variant)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(harness.result_path("rllib_experiments")))
    args = parser.parse_args()
    SEEDS[:] = args.seeds
    runs = harness.RUNS / "rllib_bench"
    common = [str(harness.ROOT / "examples" / "tiny_synthetic.yaml"), f"run.output_dir={runs}"]
    reward_net = f"reward.reward_net={Path(args.reward_net).resolve()}"
    gt = _run(["prompt-rl", *common, reward_net], runs / "prompt_rl")
    segmenter = gt["results"]["segmenter"]
    learned = _run(["prompt-rl", *common, reward_net, "rllib.reward=learned", f"policy.checkpoint={segmenter}"],
                   runs / "prompt_rl_learned")  # fmt: skip
    post = _run(
        ["postproc-rl", *common, f"policy.checkpoint={Path(args.sft).resolve()}"], runs / "postproc_rl"
    )
    result = {"prompt_rl_gt": gt, "prompt_rl_learned": learned, "postproc_rl": post}
    print(f"wrote {harness.write_result('rllib_experiments', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
