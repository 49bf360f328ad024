#!/usr/bin/env bash
# Set up, then the main job: generate the default model, run both forwards, compare them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-out}
celerinfer-lab generate --output "$OUT/model.json"
celerinfer-lab torch-forward "$OUT/model.json" --dump-dir "$OUT"
celerinfer-lab cpp-forward "$OUT/model.json" --dump-dir "$OUT"
celerinfer-lab compare "$OUT/model.json"
