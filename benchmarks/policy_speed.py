"""TinySa2VA speed on this machine: forward+backward of a 4 x 256 x 256 batch (SFT, all weights) and the RL
step with cached frozen features (LoRA + heads) -> JSON.

    .venv/bin/python benchmarks/policy_speed.py [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import harness
import numpy as np
import torch


def _time(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=str(harness.result_path("policy_speed")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from policies.lora import LoRASpec, parameter_counts
    from policies.policy import AdapterPolicy
    from policies.tiny import TinySa2VA

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)
    prompts = ["Please segment the blood vessels."] * 4
    model = TinySa2VA()
    total = sum(p.numel() for p in model.parameters())

    def sft_step() -> None:
        model.zero_grad(set_to_none=True)
        model(images, prompts).square().mean().backward()

    sft = _time(sft_step, args.repeats)
    policy = AdapterPolicy(model, LoRASpec())
    feats = policy.frozen_features(images)

    def rl_step() -> None:
        policy.model.zero_grad(set_to_none=True)
        policy.mask_logits(images, prompts, features=feats).square().mean().backward()

    def frozen() -> None:
        policy.frozen_features(images)

    rl = _time(rl_step, args.repeats)
    enc = _time(frozen, args.repeats)
    trainable, _ = parameter_counts(policy.model)
    out = {
        "torch_threads": args.threads,
        "batch": [4, 256, 256],
        "parameters_total": total,
        "parameters_trainable_rl": trainable,
        "sft_forward_backward": sft,
        "rl_forward_backward_cached_features": rl,
        "frozen_features": enc,
        "torch": torch.__version__,
    }
    harness.write_result("policy_speed", out, args.json)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
