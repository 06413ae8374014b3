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
#   3. (SA2VA=1, or SA2VA=only to stop after it) Sa2VA on one GPU: the 1B shape at random init from the remote
#      code at RAYSYS_SA2VA_REMOTE (default ../shared/sa2va_remote), SA2VA_ITERATIONS (default 5) iterations of
#      examples/sa2va_1gpu.yaml on a DRIVE-size synthetic folder; its metrics.jsonl and placement.json into OUT
#   4. async_speedup.py with the rollout workers (2 x 0.25) and the learner (0.5) sharing the GPU: seed by
#      seed, the JSON rewritten after each (the rollout-heavy case comes with the first)
#
# Needs the tiny SFT checkpoint (benchmarks/sft_baseline.py writes it) at SFT, and PYTHON (default python3)
# with the project importable. The per-run results are cached under runs/async_speedup_gpu; copy them along
# to continue another time. To spend a short lease on the async runs alone:
#   ASYNC_ONLY=1 STALENESS="0 1" HEAVY=0 benchmarks/gpu_suite.sh OUT 0 1 2
# and on the Sa2VA run alone (not run yet on a GPU):
#   ASYNC_ONLY=1 SA2VA=only benchmarks/gpu_suite.sh OUT
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

if [[ -n ${SA2VA:-} ]]; then
    [[ -d runs/sa2va_1b_random ]] || "$PY" -m raysys sa2va random-init --shape 1b --out runs/sa2va_1b_random \
        --remote "${RAYSYS_SA2VA_REMOTE:-../shared/sa2va_remote}"
    [[ -d runs/DRIVE_synth ]] || "$PY" -m raysys data synth-folder --layout drive --out runs/DRIVE_synth
    name=sa2va_1gpu_$(date +%s)
    "$PY" -m raysys train examples/sa2va_1gpu.yaml policy.checkpoint=runs/sa2va_1b_random \
        data.root=runs/DRIVE_synth run.name="$name" learner.iterations="${SA2VA_ITERATIONS:-5}" eval.every=5 \
        --no-progress
    cp "runs/$name/metrics.jsonl" "$OUT/sa2va_1gpu_metrics.jsonl"
    cp "runs/$name/placement.json" "$OUT/sa2va_1gpu_placement.json"
    [[ $SA2VA != only ]] || exit 0
fi

done_seeds=()
for seed in "${SEEDS[@]}"; do
    done_seeds+=("$seed")
    "$PY" benchmarks/async_speedup.py --sft "$SFT" --seeds "${done_seeds[@]}" --iterations "$ITERATIONS" \
        --staleness "${STALENESS[@]}" --output-dir runs/async_speedup_gpu --json "$OUT/async_speedup_gpu.json" \
        "${HEAVY_FLAG[@]}" "${ONE_GPU[@]}"
done
