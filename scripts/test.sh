#!/usr/bin/env bash
# Set up, then run the whole test suite (arguments go to pytest) with the Python of the
# environment that setup.sh installed into (the active one, or the project venv .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ENV_DIR=$(bash scripts/setup.sh --env-dir)
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then export VIRTUAL_ENV=$ENV_DIR; fi
export PATH="$ENV_DIR/bin:$PATH"
# Two workers (pytest-xdist), each taking whole test files, the longest first (tests/parallel.py):
# most of the suite is one core's work (cling compiling the C++, Python starting commands).
# CELERINFER_LAB_TEST_WORKERS=0 runs it in this one process; so does `-n 0` among the arguments.
"$ENV_DIR/bin/python" -m pytest -n "${CELERINFER_LAB_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
