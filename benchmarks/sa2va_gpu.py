"""Sa2VA-1B and -4B shapes on one GPU in bfloat16: rollout masks/s and learner images/s one image per call and
batched, MFU and peak memory, with the frozen-feature cache on and off -> benchmarks/results/sa2va_gpu.json.
One command, meant to finish within 4 minutes on one H200 (``--time-budget-s`` skips, and records, what is
left after 200 s; what is in flight then still finishes: estimated, not yet timed on a GPU):

    python benchmarks/sa2va_gpu.py --remote DIR

``DIR`` holds Sa2VA's remote-code files (default ``../shared/sa2va_remote`` or ``$RAYSYS_SA2VA_REMOTE``); on a
machine that only receives the repository, copy them into a git-ignored folder of it first. Every measurement is
``benchmarks/sa2va_scale.py``'s (same adapter, LoRA r=8, K=8 masks per image), on CUDA, in two runs that write
one file (earlier rows kept, re-measured rows replaced, the file rewritten after every row):

1. 1B: DRIVE's 584x565 (1 tile) and 1024x1024 (10 tiles), one image per call with the cache on and off (the
   rows the script wrote before the batch axis), then the batch axis with the cache on: 1, 4, 16 and 64 images
   per call (one LLM forward and one mask-decoder call per batch), up to 16,384 image tokens per batch
   (1024x1024: batches of 1 and 4).
2. 4B, the short check: the same one-image rows, and batches of 1 and 16 images of 584x565.

Arguments given here are appended to both runs (e.g. ``--repeats 5``). Top-level keys of the JSON: the best
batched 1B 584x565 figures (``rollout_masks_per_s``, ``learner_images_per_s`` and their batch sizes,
``mfu_rollout``, ``mfu_learner``, ``rollout_peak_mib``, ``learner_peak_mib``; ``mfu_formula`` says how FLOPs
are counted), ``batch_axis`` (every shape's rates by image size and batch size) and ``peak_mib_max``.
"""

from __future__ import annotations

import sys

import torch
from sa2va_scale import main

COMMON = ["--dtype", "bfloat16", "--repeats", "3", "--count-only", "--time-budget-s", "200"]
RUNS = [
    ["--shapes", "1b", "--image-sizes", "584x565", "1024x1024", "--cache", "on", "off",
     "--batch-sizes", "1", "4", "16", "64", "--max-batch-image-tokens", "16384"],
    ["--shapes", "4b", "--image-sizes", "584x565", "1024x1024", "--cache", "on", "off",
     "--batch-sizes", "1", "16", "--max-batch-image-tokens", "4096"],
]  # fmt: skip


def run_all(extra: list[str], *, device: str = "cuda") -> int:
    for argv in RUNS:
        rc = main(COMMON + argv + extra, device=device, name="sa2va_gpu")
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("no CUDA device: run benchmarks/sa2va_scale.py for the CPU figures", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_all(sys.argv[1:]))
