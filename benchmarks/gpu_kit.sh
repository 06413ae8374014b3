#!/usr/bin/env bash
# Builds the carry kit for the one-GPU device machine (nvidia-h200: Python 3.12, torch, transformers, peft,
# timm, einops, pandas, pyarrow, aiohttp, grpcio, ... but no Ray), from scratch, on a machine that reaches PyPI:
#
#   benchmarks/gpu_kit.sh            # -> .whl/ (wheels, <= 50 MiB) and .sa2va_remote/ (Sa2VA's remote code)
#
# Both folders are git-ignored (/.whl/ in .gitignore, /.sa2va_remote/ added to .git/info/exclude here) and
# travel only when a device call names them in `carry`; benchmarks/gpu_env.sh installs them there.
#
# What the image lacks for `raysys train`, tests/gpu and the Ray benchmarks (everything else is in the image):
#   ray 2.60.0       repacked without ray/jars (Java workers, 34 MB), the dashboard's web front end, ray/serve,
#                    ray/llm and (unless RLLIB=1) ray/rllib, none of which raysys imports; with STRIP=1
#                    (default) its three binaries lose their static symbol tables (only crash back-traces
#                    read them); RECORD is rewritten to match
#   jsonschema, jsonschema-specifications, referencing, rpds-py   `import ray` (runtime_env schemas)
#   pydantic, pydantic-core, annotated-types, typing-inspection   ray.train v2 refuses to import without it
#   typing-extensions  pydantic needs >= 4.16; the image's version is not known
#   tensorboardX       Tune's default logger (raysys tune, benchmarks/tune_sweep.py)
# RLLIB=1 keeps ray/rllib and adds gymnasium, farama-notifications, dm-tree, lz4, ormsgpack (prompt/post-proc RL).
# Ray runs there without its dashboard (opencensus, opentelemetry, aiohttp_cors, ... are missing): ray.init
# starts a minimal Ray and prints no dashboard URL; Ray Train's placement-group cleaner then logs "Failed to
# query Ray Train Controller actor state" every few seconds (the state API needs the dashboard), harmlessly.
#
# Environment: PYTHON (python3), PY_VERSION (3.12, the device's; 3.11 builds a kit for a local check),
# KIT (.whl), RAY_WHEEL (a local ray-2.60.0 wheel for PY_VERSION; default: downloaded), STRIP (1), RLLIB (0),
# SA2VA_REMOTE_SRC ($RAYSYS_SA2VA_REMOTE or ../shared/sa2va_remote), REPO (the checkout to build in: this one).
set -euo pipefail
cd "${REPO:-$(dirname "$0")/..}"
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
KIT=${KIT:-.whl}
STRIP=${STRIP:-1}
RLLIB=${RLLIB:-0}
SA2VA_REMOTE_SRC=${SA2VA_REMOTE_SRC:-${RAYSYS_SA2VA_REMOTE:-../shared/sa2va_remote}}
MAX_MIB=${MAX_MIB:-50}

DEPS=(
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 tensorboardX==2.6.5
)
[[ $RLLIB == 1 ]] && DEPS+=(gymnasium==1.2.2 farama-notifications==0.0.6 dm-tree==0.1.10 lz4==4.4.5 ormsgpack==1.13.1)

download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"
}

rm -rf "$KIT"
mkdir -p "$KIT"
download "$KIT" "${DEPS[@]}"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [[ -z ${RAY_WHEEL:-} ]]; then
    download "$tmp" ray==2.60.0
    RAY_WHEEL=$(ls "$tmp"/ray-2.60.0-*.whl)
fi
DROP="ray/jars/ ray/dashboard/client/build/ ray/serve/ ray/llm/"
[[ $RLLIB == 1 ]] || DROP+=" ray/rllib/"
STRIP=$STRIP DROP=$DROP "$PY" - "$RAY_WHEEL" "$KIT/$(basename "$RAY_WHEEL")" <<'EOF'
"""Copy a wheel without the DROP prefixes (and, with STRIP=1, with its ELF binaries stripped); RECORD rewritten."""
import base64, hashlib, os, subprocess, sys, tempfile, zipfile

src, dst = sys.argv[1:3]
drop = tuple(os.environ["DROP"].split())
strip = os.environ["STRIP"] == "1"
binaries = {"ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"}
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    # The wheel's own RECORD, not those of the packages Ray vendors (thirdparty_files/*.dist-info/RECORD).
    record = next(n for n in zin.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD"))
    rows = {}
    for line in zin.read(record).decode().splitlines():
        if line.strip():
            rows[line.rsplit(",", 2)[0]] = line
    for info in zin.infolist():
        name = info.filename
        if name == record:
            continue
        if name.startswith(drop):
            rows.pop(name, None)
            continue
        data = zin.read(info)
        if strip and name in binaries:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "bin")
                with open(path, "wb") as f:
                    f.write(data)
                subprocess.run(["strip", "--strip-unneeded", path], check=True)
                with open(path, "rb") as f:
                    data = f.read()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows[name] = f"{name},sha256={digest},{len(data)}"
        out = zipfile.ZipInfo(name, date_time=info.date_time)
        out.external_attr = info.external_attr
        zout.writestr(out, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    rows[record] = f"{record},,"
    out = zipfile.ZipInfo(record, date_time=(2020, 1, 1, 0, 0, 0))
    out.external_attr = 0o644 << 16
    zout.writestr(out, "\n".join(rows.values()) + "\n", compress_type=zipfile.ZIP_DEFLATED)
    written = set(zout.namelist())
    missing = [n for n in rows if n not in written]
    assert not missing, f"RECORD names files the wheel lacks: {missing[:5]}"
EOF

# Sa2VA's remote-code files (policy.kind: sa2va, tests/remote, benchmarks/sa2va_*): gpu_env.sh points
# RAYSYS_SA2VA_REMOTE at this copy, since ../shared does not travel.
if [[ -d $SA2VA_REMOTE_SRC ]]; then
    rm -rf .sa2va_remote
    mkdir .sa2va_remote
    cp --no-preserve=mode "$SA2VA_REMOTE_SRC"/* .sa2va_remote/
else
    echo "gpu_kit: no Sa2VA remote code at $SA2VA_REMOTE_SRC (set SA2VA_REMOTE_SRC); .sa2va_remote not made" >&2
fi
exclude="$(git rev-parse --git-path info/exclude)"
for folder in "$KIT" .sa2va_remote; do
    if [[ $folder != /* && -e $folder ]] && ! git check-ignore -q "$folder/"; then
        mkdir -p "$(dirname "$exclude")"
        echo "/$folder/" >>"$exclude"
    fi
done

ls -l "$KIT"
size=$(du -cb "$KIT"/*.whl | tail -1 | cut -f1)
echo "gpu_kit: $KIT holds $(ls "$KIT" | wc -l) wheels, $((size / 1048576)) MiB; .sa2va_remote $(du -sh .sa2va_remote 2>/dev/null | cut -f1)"
if ((size > MAX_MIB * 1048576)); then
    echo "gpu_kit: over $MAX_MIB MiB: a device call carries at most 64 MiB with the working tree" >&2
    exit 1
fi
