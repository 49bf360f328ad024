#!/usr/bin/env bash
# Set up, then the main job: generate the default model, run both forwards, compare them, and
# benchmark PyTorch against the C++ (through cppyy and standalone). The tools run from the
# environment that setup.sh installed into (the active one, or the project venv .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ENV_DIR=$(bash scripts/setup.sh --env-dir)
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then export VIRTUAL_ENV=$ENV_DIR; fi
export PATH="$ENV_DIR/bin:$PATH"
CLI=$ENV_DIR/bin/celerinfer-lab
OUT=${OUT:-out}
mkdir -p "$OUT"
"$CLI" generate --force --output "$OUT/model.json"  # a re-run replaces the demo's own model
"$CLI" torch-forward "$OUT/model.json" --dump-dir "$OUT"
"$CLI" cpp-forward "$OUT/model.json" --dump-dir "$OUT"
"$CLI" compare "$OUT/model.json"
"$CLI" bench 64 2 8 2 128 5 2 --decode 16 --json "$OUT/bench.json" --work-dir "$OUT/bench"
