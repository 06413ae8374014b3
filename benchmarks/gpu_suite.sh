#!/usr/bin/env bash
# The GPU checks on a one-GPU machine, in order of cost; each writes its JSON into OUT (default
# benchmarks/results) as soon as it finishes, so a run cut short keeps what it measured.
#
# On the lent device machine (nvidia-h200: no Ray, no network): first build the carry kit here with
# benchmarks/gpu_kit.sh (-> .whl/ and .sa2va_remote/, git-ignored, ~39 MiB), then in the device command, from
# the repository root, with carry [".whl", ".sa2va_remote"] (and the SFT checkpoint's folder below):
#   source benchmarks/gpu_env.sh || exit 1; benchmarks/gpu_suite.sh "$OUT" 0
#
#   benchmarks/gpu_suite.sh [OUT] [SEEDS...]      e.g. benchmarks/gpu_suite.sh /tmp/gpu 0 1 2
#
#   1. tests/gpu (CUDA metrics; both rollout modes through the CLI with every role on the one GPU)
#   2. gpu_profile.py: rollout masks/s and update steps/s, in-process
#   3. async_speedup.py with the rollout workers (2 x 0.25) and the learner (0.5) sharing the GPU: seed by
#      seed, the JSON rewritten after each (the rollout-heavy case comes with the first)
#
# Needs the tiny SFT checkpoint (benchmarks/sft_baseline.py writes it) at SFT, and PYTHON (default python3)
# with the project importable. The per-run results are cached under runs/async_speedup_gpu; copy them along
# to continue another time. To spend a short lease on the async runs alone:
#   ASYNC_ONLY=1 STALENESS="0 1" HEAVY=0 benchmarks/gpu_suite.sh OUT 0 1 2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
shift || true
SEEDS=("$@")
[[ ${#SEEDS[@]} -gt 0 ]] || SEEDS=(0 1 2)
PY=${PYTHON:-python3}
SFT=${SFT:-runs/sft_baseline_bench/sft/model}
ITERATIONS=${ITERATIONS:-60}
read -r -a STALENESS <<<"${STALENESS:-0 1 2}"
HEAVY_FLAG=(--heavy)
[[ ${HEAVY:-1} == 1 ]] || HEAVY_FLAG=()
ONE_GPU=(rollout.gpus_per_worker=0.25 learner.use_gpu=true learner.gpus_per_worker=0.5)
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, ray; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "ray", ray.__version__)'

if [[ -z ${ASYNC_ONLY:-} ]]; then
    "$PY" -m pytest -q -p no:cacheprovider tests/gpu -s -x
    "$PY" benchmarks/gpu_profile.py --json "$OUT/gpu_profile.json"
fi

done_seeds=()
for seed in "${SEEDS[@]}"; do
    done_seeds+=("$seed")
    "$PY" benchmarks/async_speedup.py --sft "$SFT" --seeds "${done_seeds[@]}" --iterations "$ITERATIONS" \
        --staleness "${STALENESS[@]}" --output-dir runs/async_speedup_gpu --json "$OUT/async_speedup_gpu.json" \
        "${HEAVY_FLAG[@]}" "${ONE_GPU[@]}"
done
