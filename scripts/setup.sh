#!/usr/bin/env bash
# Install everything CelerInfer Lab needs (Debian packages, then the Python packages) into the
# Python environment that `--env-dir` names:
#   - an active virtual environment ($VIRTUAL_ENV) or conda environment ($CONDA_PREFIX), as is;
#   - the venv that python3 itself runs in, when it is one;
#   - otherwise the project venv .venv in this repo, created here (a system Python such as
#     Debian's refuses pip installs: externally-managed-environment).
# demo.sh and test.sh run the tools from that environment's bin/, so nothing needs activating.
# Idempotent: a second run only checks. Used by demo.sh, test.sh and CI.
#   bash scripts/setup.sh            set up
#   bash scripts/setup.sh --env-dir  only print the environment's folder (creates and installs nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# Which environment: ENV_DIR, and ENV_SAYS, the one line that tells the user.
if [ -n "${VIRTUAL_ENV:-}" ]; then
  ENV_DIR=$VIRTUAL_ENV
  ENV_SAYS="setup: installing into the active virtual environment $ENV_DIR"
elif [ -n "${CONDA_PREFIX:-}" ]; then
  ENV_DIR=$CONDA_PREFIX
  ENV_SAYS="setup: installing into the active conda environment $ENV_DIR"
else
  venv_prefix=$("$PYTHON" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")')
  if [ -n "$venv_prefix" ]; then
    ENV_DIR=$venv_prefix
    ENV_SAYS="setup: installing into the virtual environment of $PYTHON: $ENV_DIR"
  else
    ENV_DIR=$REPO/.venv
    ENV_SAYS="setup: no virtual environment active: using the project venv .venv (demo.sh and test.sh run from it; no need to activate it)"
  fi
fi
if [ "${1:-}" = "--env-dir" ]; then
  echo "$ENV_DIR"
  exit 0
fi
echo "$ENV_SAYS"

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_install() {
  echo "setup: installing Debian packages: $*"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# Debian packages: the C++ toolchain and nlohmann/json for base_line_micro; Chromium for the
# real-browser test of JupyterLab (Playwright drives it; a browser download cannot work here).
DEBIAN_PACKAGES=(g++ cmake nlohmann-json3-dev chromium clang libclang-rt-dev)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

# The project venv, when no environment is active. A half-made one (no pip) is made again.
if [ "$ENV_DIR" = "$REPO/.venv" ] && ! "$ENV_DIR/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$ENV_DIR"
  if ! "$PYTHON" -m venv "$ENV_DIR" >/dev/null 2>&1; then
    # Debian/Ubuntu ship venv (ensurepip) separately.
    rm -rf "$ENV_DIR"
    apt_install python3-venv
    "$PYTHON" -m venv "$ENV_DIR"
  fi
fi
PY=$ENV_DIR/bin/python

# torch first, pinned: an unpinned or default-index torch on Linux is the CUDA build with GBs of
# NVIDIA wheels. Without a working nvidia-smi, take the CPU build from PyTorch's CPU wheel index;
# when that index cannot be reached (a quick probe: seconds), fall back to the default index.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing $TORCH (CUDA build) from the default index"
    "$PY" -m pip install -q "$TORCH"
  elif "$PY" -m pip index versions torch --index-url "$TORCH_CPU_INDEX" --timeout 5 --retries 1 >/dev/null 2>&1; then
    echo "setup: no NVIDIA GPU: installing $TORCH (CPU build) from $TORCH_CPU_INDEX"
    log=$(mktemp)
    "$PY" -m pip install -q --index-url "$TORCH_CPU_INDEX" "$TORCH" 2>"$log" || { cat "$log" >&2; rm -f "$log"; exit 1; }
    rm -f "$log"
  else
    echo "setup: no NVIDIA GPU, and $TORCH_CPU_INDEX cannot be reached: installing $TORCH from the default index"
    "$PY" -m pip install -q "$TORCH"
  fi
fi
"$PY" -m pip install -q -e '.[test,real]'
# llama.cpp as the bench's third engine (the `llama` extra) is built from source by pip: minutes of
# compiling, so only on request (CI asks: .ci/run). Its multimodal library is not needed.
if [ "${CELERINFER_LAB_LLAMA:-0}" = "1" ] && ! "$PY" -c "import llama_cpp" >/dev/null 2>&1; then
  echo "setup: building llama-cpp-python from source (CELERINFER_LAB_LLAMA=1; takes minutes)"
  CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip install -q -e '.[llama]'
fi
