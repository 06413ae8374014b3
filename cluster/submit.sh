#!/usr/bin/env bash
# Submit a raysys command to a Ray cluster as a Ray job: a thin wrapper over `ray job submit`.
#
#   cluster/submit.sh [ray job submit options] [--] [COMMAND] CONFIG [key=value ...] [--resume]
#
# COMMAND is a raysys command (train by default; tune, pipeline, prompt-rl, postproc-rl, eval ...).
# Options before COMMAND go to `ray job submit` (e.g. --no-wait, --submission-id ID); --address,
# --working-dir and --runtime-env replace this script's defaults.
# Relative paths in the config and overrides (run.output_dir, policy.checkpoint, data.root, ...) mean paths
# under this repository on the submitting machine, as they do for a local `raysys` call: the job gets
# RAYSYS_BASE_DIR=<repo root> and resolves them there (on a multi-node cluster, use shared paths).
# Environment:
#   RAY_ADDRESS          the cluster's dashboard / job server URL (default http://127.0.0.1:8265)
#   RAYSYS_OUTPUT_DIR    if set, adds run.output_dir=$RAYSYS_OUTPUT_DIR (e.g. /mnt/cluster_storage/runs)
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token
#                        Ray 2.60 clusters require a token by default; when one is available and
#                        RAY_AUTH_MODE is unset, this script sets RAY_AUTH_MODE=token for the CLI.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
ray_bin="${RAY_BIN:-ray}"
if ! command -v "$ray_bin" >/dev/null 2>&1 && [ -x "$root/.venv/bin/ray" ]; then
    ray_bin="$root/.venv/bin/ray"
fi

usage() { echo "usage: cluster/submit.sh [ray job submit options] [--] [COMMAND] CONFIG [key=value ...]" >&2; exit 2; }

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
working_dir="$root"
runtime_env=(--runtime-env "$here/runtime_env.yaml")
submit_opts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; break ;;
        --address|--working-dir|--runtime-env|--runtime-env-json|--metadata-json|--submission-id|--job-id|\
        --entrypoint-num-cpus|--entrypoint-num-gpus|--entrypoint-memory|--entrypoint-resources|\
        --entrypoint-label-selector|--headers|--verify|--log-style|--log-color)
            [ $# -ge 2 ] || { echo "cluster/submit.sh: $1 needs a value" >&2; usage; }
            case "$1" in
                --address) address="$2" ;;
                --working-dir) working_dir="$2" ;;
                --runtime-env|--runtime-env-json) runtime_env=("$1" "$2") ;;
                *) submit_opts+=("$1" "$2") ;;
            esac
            shift 2 ;;
        --*=*|--no-wait|--disable-usage-stats|-v|--verbose) submit_opts+=("$1"); shift ;;
        --*) echo "cluster/submit.sh: unknown ray job submit option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || usage
case "$1" in
    train|tune|pipeline|prompt-rl|postproc-rl|eval|export|sft|reward-net|demo|config|data) command="$1"; shift ;;
    *) command=train ;;
esac

args=("$@")
if [ -n "${RAYSYS_OUTPUT_DIR:-}" ]; then
    args+=("run.output_dir=$RAYSYS_OUTPUT_DIR")
fi

if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; }; then
    export RAY_AUTH_MODE=token
fi

# ${a[@]+"${a[@]}"}: empty arrays are fine under `set -u` on bash < 4.4 too.
exec "$ray_bin" job submit \
    --address "$address" \
    --working-dir "$working_dir" \
    "${runtime_env[@]}" \
    ${submit_opts[@]+"${submit_opts[@]}"} \
    -- env RAYSYS_BASE_DIR="$root" python -m raysys "$command" ${args[@]+"${args[@]}"}
