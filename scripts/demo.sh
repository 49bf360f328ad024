#!/usr/bin/env bash
# Set up, then the main job: generate the default model, run both forwards, compare them, and
# benchmark PyTorch against the C++ (through cppyy and standalone).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-out}
celerinfer-lab generate --output "$OUT/model.json"
celerinfer-lab torch-forward "$OUT/model.json" --dump-dir "$OUT"
celerinfer-lab cpp-forward "$OUT/model.json" --dump-dir "$OUT"
celerinfer-lab compare "$OUT/model.json"
celerinfer-lab bench 64 2 8 2 128 5 2 --decode 16 --json "$OUT/bench.json" --work-dir "$OUT/bench"
