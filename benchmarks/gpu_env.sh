# Sourced first in a command on the one-GPU device machine (nvidia-h200), from the repository root, with the
# kit that benchmarks/gpu_kit.sh builds here carried along (carry: [".whl", ".sa2va_remote"]):
#
#   source benchmarks/gpu_env.sh || exit 1; benchmarks/gpu_suite.sh "$OUT" 0
#
# Installs the carried wheels (Ray and what the image lacks) into /tmp/site, puts them and this checkout on
# PYTHONPATH (the project is not pip-installed there: `python3 -m raysys.cli`, `python3 -m pytest tests/gpu`
# and the benchmarks run from the root), points RAYSYS_SA2VA_REMOTE at the carried Sa2VA remote code and
# prints the versions that matter. KIT (.whl) and SITE (/tmp/site) name other folders.
# shellcheck shell=bash
(return 0 2>/dev/null) || { echo "gpu_env.sh: source it: source benchmarks/gpu_env.sh" >&2; exit 1; }
_gpu_env_kit=${KIT:-.whl}
_gpu_env_site=${SITE:-/tmp/site}
if [[ ! -d raysys || ! -d $_gpu_env_kit ]]; then
    echo "gpu_env.sh: run from the repository root with $_gpu_env_kit carried (benchmarks/gpu_kit.sh builds it)" >&2
    return 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$_gpu_env_site" "$_gpu_env_kit"/*.whl || return 1
# Byte-compiled once, on all cores: otherwise every new Ray worker compiles what it imports (here a 3-iteration
# run took 59 s instead of 44 s, and Train's first 5 s resource request to its autoscaling coordinator timed out).
python3 -m compileall -q -j 0 "$_gpu_env_site" >/dev/null || echo "gpu_env.sh: compileall met errors (not fatal)" >&2
export PYTHONPATH="$_gpu_env_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$_gpu_env_site/bin:$PATH"
export RAYSYS_SA2VA_REMOTE=${RAYSYS_SA2VA_REMOTE:-$PWD/.sa2va_remote}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
[[ -d $RAYSYS_SA2VA_REMOTE ]] || echo "gpu_env.sh: no Sa2VA remote code at $RAYSYS_SA2VA_REMOTE (carry .sa2va_remote)" >&2
python3 - <<'EOF' || return 1
import platform, sys
import numpy, pydantic, ray, torch, transformers
import raysys.cli  # noqa: F401  (the project imports from this checkout)
cuda = torch.cuda.is_available()
print(f"gpu_env: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available {cuda}{', ' + torch.cuda.get_device_name(0) if cuda else ''}), ray {ray.__version__} "
      f"from {ray.__file__.rsplit('/ray/', 1)[0]}, transformers {transformers.__version__}, "
      f"pydantic {pydantic.__version__}, numpy {numpy.__version__}")
EOF
unset _gpu_env_kit _gpu_env_site
