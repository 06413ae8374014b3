#!/usr/bin/env bash
# Submit a raysys command to a Ray cluster as a Ray job: a thin wrapper over `ray job submit`.
#
#   cluster/submit.sh [ray job submit options] [--] [COMMAND] CONFIG [key=value ...] [--resume]
#
# COMMAND is a raysys command (train by default; tune, pipeline, prompt-rl, postproc-rl, eval ...).
# Options before COMMAND go to `ray job submit` (e.g. --no-wait, --submission-id ID).
# Environment:
#   RAY_ADDRESS          the cluster's dashboard / job server URL (default http://127.0.0.1:8265)
#   RAYSYS_OUTPUT_DIR    where runs/<name>/ goes (default: <repo>/runs). The job runs from an unpacked copy
#                        of the code, so a relative path would vanish with it; on a multi-node cluster use a
#                        shared filesystem (and run.storage_path for Train checkpoints).
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

submit_opts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; break ;;
        --submission-id|--runtime-env|--metadata-json|--entrypoint-num-cpus|--entrypoint-num-gpus|--entrypoint-memory|--entrypoint-resources)
            submit_opts+=("$1" "$2"); shift 2 ;;
        --*) submit_opts+=("$1"); shift ;;
        *) break ;;
    esac
done
if [ $# -eq 0 ]; then
    echo "usage: cluster/submit.sh [ray job submit options] [--] [COMMAND] CONFIG [key=value ...]" >&2
    exit 2
fi
case "$1" in
    train|tune|pipeline|prompt-rl|postproc-rl|eval|export|sft|reward-net|demo|config) command="$1"; shift ;;
    *) command=train ;;
esac

args=("$@")
case " ${args[*]} " in
    *" run.output_dir="*) ;;
    *) args+=("run.output_dir=${RAYSYS_OUTPUT_DIR:-$root/runs}") ;;
esac

if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; }; then
    export RAY_AUTH_MODE=token
fi

exec "$ray_bin" job submit \
    --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
    --working-dir "$root" \
    --runtime-env "$here/runtime_env.yaml" \
    "${submit_opts[@]}" \
    -- python -m raysys "$command" "${args[@]}"
