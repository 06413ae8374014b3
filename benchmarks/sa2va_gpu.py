"""Sa2VA-1B and -4B shapes on one GPU in bfloat16: rollout masks/s, learner steps/s and peak memory, with the
frozen-feature cache on and off -> benchmarks/results/sa2va_gpu.json. One command, meant to finish within 10
minutes on one H100-class GPU (not yet run on one: no GPU has been lent to this project so far):

    python benchmarks/sa2va_gpu.py --remote DIR

``DIR`` holds Sa2VA's remote-code files (default ``../shared/sa2va_remote`` or ``$RAYSYS_SA2VA_REMOTE``); on a
machine that only receives the repository, copy them into a git-ignored folder of it first. Every measurement is
``benchmarks/sa2va_scale.py``'s (same adapter, LoRA r=8, K=8 masks per image), on CUDA: the rollout is one
forward with the feature cache (or the encoders too, without it) plus K Bernoulli samples, the learner step a
forward with grad and a backward through LoRA, text_hidden_fcs and the mask decoder.
"""

from __future__ import annotations

import sys

import torch
from sa2va_scale import main

DEFAULTS = ["--shapes", "1b", "4b", "--count-only", "--dtype", "bfloat16", "--cache", "on", "off",
            "--repeats", "3", "--image-sizes", "584x565", "1024x1024"]  # fmt: skip

if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("no CUDA device: run benchmarks/sa2va_scale.py for the CPU figures", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(DEFAULTS + sys.argv[1:], device="cuda", name="sa2va_gpu"))
