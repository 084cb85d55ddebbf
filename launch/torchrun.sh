#!/usr/bin/env bash
# thinwire on one node under torchrun: NPROC workers (one per GPU; NCCL on GPU, gloo on CPU).
#
#   NPROC=8 bash launch/torchrun.sh comm=topk comm.ratio=0.01 hydra.run.dir=runs/topk1
#
# Arguments are Hydra overrides for the trainer, passed through unchanged. Without
# hydra.run.dir the trainer writes outputs/<torchrun run id>, one directory for all ranks.
#
# Environment:
#   NPROC          workers on this node (default: number of GPUs nvidia-smi lists, else 1)
#   PYTHON         the interpreter with thinwire installed (default: the active venv's python,
#                  else the repo's .venv/bin/python that launch/setup_env.sh made, else python);
#                  torchrun is started as "$PYTHON -m torch.distributed.run", so it is that env's torchrun
#   TORCHRUN_ARGS  extra torchrun options, space-separated (e.g. "--max-restarts=3")
#   DRY_RUN=1      print the command instead of running it
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC=${NPROC:-$(default_nproc)}
PYTHON=${PYTHON:-$(default_python)}
read -r -a extra <<< "${TORCHRUN_ARGS:-}"

cmd=("$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC"
     "${extra[@]}" -m thinwire.train "$@")

run_or_print "${cmd[@]}"
