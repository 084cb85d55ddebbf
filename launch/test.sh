#!/usr/bin/env bash
# The test suite's default tier, in the same virtual environment as the demo. Extra arguments
# go to pytest: --extended adds the extended tier, -m extended runs it alone (tests/conftest.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$(bash launch/setup_env.sh | tail -n 1)
export WANDB_MODE=disabled
exec "$PY" -m pytest -q "$@"
