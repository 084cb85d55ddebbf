#!/usr/bin/env bash
# The demo: the char-level GPT on Shakespeare, 2 local CPU workers (gloo), wandb offline.
# Extra arguments are Hydra overrides, e.g. `bash launch/demo.sh comm=none trainer.max_steps=100`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$(bash launch/setup_env.sh | tail -n 1)
export WANDB_MODE=${WANDB_MODE:-offline}
exec "$PY" -m thinwire.train dist.nproc=2 hydra.run.dir=runs/demo "$@"
