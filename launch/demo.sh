#!/usr/bin/env bash
# The demo: the char-level GPT on Shakespeare, 2 local CPU workers (gloo), wandb offline.
# Extra arguments are Hydra overrides, e.g. `bash launch/demo.sh comm=none trainer.max_steps=100`;
# each set of overrides gets its own run dir (runs/demo, runs/demo_comm=none_trainer.max_steps=100),
# so a second experiment never lands on the first one (a run dir that holds a run is refused).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$(bash launch/setup_env.sh | tail -n 1)
export WANDB_MODE=${WANDB_MODE:-offline}
RUN=runs/demo
if [ $# -gt 0 ]; then
  RUN="runs/demo_$(printf '%s_' "$@" | tr -c 'A-Za-z0-9.=,_-' '_' | sed 's/_*$//' | cut -c1-120)"
fi
# quoted: the name holds '=' and ',' from the overrides, which Hydra's grammar would parse
exec "$PY" -m thinwire.train dist.nproc=2 "hydra.run.dir='$RUN'" "$@"
