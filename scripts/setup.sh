#!/usr/bin/env bash
# Install everything CelerInfer Lab needs into the active Python environment (and Debian packages).
# Idempotent: a second run only checks. Used by demo.sh, test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Debian packages: the C++ toolchain and nlohmann/json for base_line_micro; Chromium for the
# real-browser test of JupyterLab (Playwright drives it; a browser download cannot work here).
DEBIAN_PACKAGES=(g++ cmake nlohmann-json3-dev chromium)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# torch first, pinned to the CPU build: an unpinned torch would pull a multi-GB CUDA build.
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU)"
  "$PYTHON" -m pip install -q torch==2.13.0
fi
"$PYTHON" -m pip install -q -e '.[test]'
