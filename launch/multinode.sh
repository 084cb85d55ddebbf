#!/usr/bin/env bash
# thinwire on several nodes: run this script once on every node, with the same settings.
# torchrun's c10d rendezvous (hosted on MASTER_ADDR:MASTER_PORT) gathers the nodes and
# assigns ranks; the job is named by RDZV_ID, which is also the default run directory
# outputs/<RDZV_ID> (put it on a shared file system, or pass hydra.run.dir=/shared/...).
#
#   # on every node (node0 is reachable from all of them):
#   NNODES=2 NPROC=8 MASTER_ADDR=node0 RDZV_ID=job42 bash launch/multinode.sh comm=int8
#
# Environment:
#   NNODES         number of nodes, or MIN:MAX for an elastic job (required)
#   MASTER_ADDR    host of the rendezvous store (required); MASTER_PORT (default 29500)
#   RDZV_ID        job id, the same on every node (required unless NODE_RANK is set)
#   NODE_RANK      optional: 0 makes this node host the rendezvous store (is_host=true),
#                  any other value makes it a client; ranks still come from the rendezvous.
#                  Without RDZV_ID the id defaults to thinwire-<MASTER_ADDR>-<MASTER_PORT>.
#   NPROC          workers per node (default: number of GPUs nvidia-smi lists, else 1)
#   PYTHON         the interpreter with thinwire installed (default: the active venv's python,
#                  else the repo's .venv/bin/python that launch/setup_env.sh made, else python)
#   TORCHRUN_ARGS  extra torchrun options, space-separated (e.g. "--max-restarts=3")
#   DRY_RUN=1      print the command instead of running it
# Arguments are Hydra overrides for the trainer, passed through unchanged.
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

die() { echo "multinode.sh: error: $*" >&2; exit 2; }

[[ -n "${NNODES:-}" ]] || die "NNODES is not set (number of nodes, or MIN:MAX)"
[[ -n "${MASTER_ADDR:-}" ]] || die "MASTER_ADDR is not set (host of the rendezvous store)"
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${RDZV_ID:-}" ]]; then
    [[ -n "${NODE_RANK:-}" ]] || die "set RDZV_ID (the same job id on every node) or NODE_RANK"
    RDZV_ID="thinwire-${MASTER_ADDR}-${MASTER_PORT}"
fi
NPROC=${NPROC:-$(default_nproc)}
PYTHON=${PYTHON:-$(default_python)}
read -r -a extra <<< "${TORCHRUN_ARGS:-}"
if [[ -n "${NODE_RANK:-}" ]]; then
    [[ "$NODE_RANK" == 0 ]] && host=true || host=false
    extra+=("--rdzv-conf=is_host=$host")
fi

cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC"
     --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID"
     "${extra[@]}" -m thinwire.train "$@")

run_or_print "${cmd[@]}"
